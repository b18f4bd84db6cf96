/* The kernel's thread pool: n-1 persistent pthreads plus the caller, SPMD tasks, and a barrier
 * built from C11 atomics that sleeps on a futex when it has to wait.
 *
 * Why this shape: a training step is a few dozen phases separated by barriers; each thread
 * writes only the rows/columns it owns, so no locks and no float atomics are needed, and the
 * result does not depend on timing. Waiting threads spin only briefly (and not at all when the
 * pool has more threads than CPUs), then sleep in the kernel, so an oversubscribed machine
 * (12 threads on 2 cores, or Node Zero waiting beside workers) loses no cycles to spinning. */
#define _GNU_SOURCE
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include "mt_internal.h"

struct mt_pool {
    int n;                      /* threads including the caller (tid 0) */
    int spin;                   /* polls before sleeping; 0 when oversubscribed */
    pthread_t *threads;         /* n-1 workers */
    _Atomic uint32_t job;       /* (sequence << ACTIVE_BITS) | active threads (futex word) */
    int active;                 /* threads taking part in the current task (tid < active) */
    _Atomic int quit;
    mt_task fn;
    void *ctx;
    _Atomic uint32_t bar_count; /* arrivals at the current barrier */
    _Atomic uint32_t bar_gen;   /* bumped when a barrier opens (futex word) */
};

#define ACTIVE_BITS 11 /* pools have at most 1024 threads */
#define ACTIVE_MASK ((1u << ACTIVE_BITS) - 1)

typedef struct {
    mt_pool *pool;
    int tid;
} worker_arg;

static void futex_wait(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_all(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Returns once *word != old: a short poll, then futex sleeps (spurious wake-ups re-check). */
static void wait_for_change(const mt_pool *p, _Atomic uint32_t *word, uint32_t old) {
    for (int i = 0; i < p->spin; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != old) return;
        cpu_relax();
    }
    while (atomic_load_explicit(word, memory_order_acquire) == old) futex_wait(word, old);
}

void pool_barrier(mt_pool *p) {
    int n = p->active;
    if (n == 1) return;
    uint32_t gen = atomic_load_explicit(&p->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == (uint32_t)n - 1) {
        /* Last to arrive: reset the count before opening, so early leavers count afresh. */
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&p->bar_gen, 1, memory_order_release);
        futex_wake_all(&p->bar_gen);
    } else {
        wait_for_change(p, &p->bar_gen, gen);
    }
}

static void *worker_main(void *argp) {
    worker_arg *arg = argp;
    mt_pool *p = arg->pool;
    int tid = arg->tid;
    free(arg);
    uint32_t seen = 0;
    for (;;) {
        wait_for_change(p, &p->job, seen);
        seen = atomic_load_explicit(&p->job, memory_order_acquire);
        if (atomic_load_explicit(&p->quit, memory_order_acquire)) return NULL;
        /* A task that does not include this thread: back to sleep. The caller waits for the
         * active threads only, so a generation this thread slept through never included it. */
        int active = (int)(seen & ACTIVE_MASK);
        if (tid >= active) continue;
        p->fn(p->ctx, tid, active);
        pool_barrier(p);  /* completion: the caller leaves pool_run only after this */
    }
}

int mt_cpu_count(void) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

mt_pool *pool_create(int nthreads) {
    if (nthreads < 1) return NULL;
    mt_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->n = nthreads;
    p->active = nthreads;
    p->spin = nthreads <= mt_cpu_count() ? 4000 : 0;
    p->threads = calloc((size_t)nthreads, sizeof(pthread_t));
    if (!p->threads) { free(p); return NULL; }
    for (int t = 1; t < nthreads; t++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (arg) { arg->pool = p; arg->tid = t; }
        if (!arg || pthread_create(&p->threads[t], NULL, worker_main, arg) != 0) {
            free(arg);
            p->n = t;  /* shut down the ones that started */
            pool_destroy(p);
            return NULL;
        }
    }
    return p;
}

void pool_destroy(mt_pool *p) {
    if (!p) return;
    atomic_store_explicit(&p->quit, 1, memory_order_release);
    atomic_fetch_add_explicit(&p->job, 1u << ACTIVE_BITS, memory_order_release);
    futex_wake_all(&p->job);
    for (int t = 1; t < p->n; t++) pthread_join(p->threads[t], NULL);
    free(p->threads);
    free(p);
}

int pool_size(const mt_pool *p) { return p->n; }

void pool_run_parts(mt_pool *p, mt_task fn, void *ctx, int active) {
    if (active < 1) active = 1;
    if (active > p->n) active = p->n;
    p->fn = fn;
    p->ctx = ctx;
    p->active = active;
    if (active > 1) {
        uint32_t seq = (atomic_load_explicit(&p->job, memory_order_relaxed) >> ACTIVE_BITS) + 1;
        atomic_store_explicit(&p->job, (seq << ACTIVE_BITS) | (uint32_t)active,
                              memory_order_release);
        futex_wake_all(&p->job);
    }
    fn(ctx, 0, active);
    pool_barrier(p);
}

void pool_run(mt_pool *p, mt_task fn, void *ctx) { pool_run_parts(p, fn, ctx, p->n); }
