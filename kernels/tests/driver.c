/* A C test driver for the kernel's threaded paths, built directly with gcc (no Python) so it can
 * run under ThreadSanitizer and AddressSanitizer + UndefinedBehaviorSanitizer
 * (scripts/sanitize.sh builds and runs it).
 *
 *   driver THREADS     (THREADS >= 2; default 4)
 *
 * 1. optimizer: clip + AdamW on synthetic gradients on a model's pool of THREADS threads,
 *    whole and in shards as MPI workers take them; every result must be bitwise equal to the
 *    single-threaded one.
 * 2. model: a tiny model trains 3 steps (forward+backward on THREADS kernel threads, clip, AdamW
 *    on THREADS threads), twice; both runs must agree bit for bit, and with a 1-thread run to
 *    float tolerance. Also the forward-only loss and the counters.
 * Exit 0 when all checks pass, 1 otherwise (sanitizer reports abort the run on their own). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mpitrain_kernel.h"

static int failures = 0;

#define CHECK(cond, ...)                                   \
    do {                                                   \
        if (!(cond)) {                                     \
            fprintf(stderr, "driver: FAIL: " __VA_ARGS__); \
            fprintf(stderr, "\n");                         \
            failures++;                                    \
        }                                                  \
    } while (0)

static uint64_t lcg_state = 12345;
static uint32_t lcg(void) {
    lcg_state = lcg_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint32_t)(lcg_state >> 33);
}
static float uniform(void) { return (float)lcg() / 2147483648.0f - 1.0f; } /* [-1, 1) */

static float *fvec(size_t n) {
    float *p = calloc(n ? n : 1, sizeof(float));
    if (!p) { fprintf(stderr, "driver: out of memory\n"); exit(2); }
    return p;
}

/* ---- 1. optimizer ----------------------------------------------------------------------------- */

static const mt_config OPT_CFG = {.vocab_size = 97, .max_seq_len = 16, .d_model = 32,
                                  .n_layers = 2, .n_heads = 4, .d_ff = 64};

/* Three clip + AdamW steps on synthetic gradients over n floats, on a model whose pool has
 * `threads` threads split into as many parts, the arrays updated in `shards` ranges (as MPI
 * workers update their slices). Segments of uneven sizes around the norm's block size (8192)
 * so ranges cut through them. */
static void optimizer_run(int threads, int shards, float *p, float *m, float *v, double *norms) {
    static const int64_t bounds[] = {0, 5000, 5003, 20000, 20001, 41000};
    static const unsigned char decay[] = {1, 0, 1, 0, 1};
    enum { NSEG = 5 };
    const int64_t n = bounds[NSEG];
    size_t np;
    CHECK(mt_num_params(&OPT_CFG, &np) == MT_OK, "mt_num_params refused a valid config");
    float *params = fvec(np), *grads = fvec(np), *g = fvec((size_t)n);
    mt_model *model = NULL;
    if (mt_model_new(&OPT_CFG, params, grads, threads, &model) != MT_OK ||
        mt_model_set_parts(model, threads) != MT_OK) {
        fprintf(stderr, "driver: no model on %d threads\n", threads);
        exit(2);
    }
    mt_adamw hyper = {.lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                      .weight_decay = 0.1, .step = 1};
    lcg_state = 777;
    for (int64_t i = 0; i < n; i++) { p[i] = uniform(); m[i] = v[i] = 0.0f; }
    for (int step = 1; step <= 3; step++) {
        for (int64_t i = 0; i < n; i++) g[i] = 0.05f * uniform();
        CHECK(mt_grad_norm(model, g, n, &norms[step - 1]) == MT_OK, "mt_grad_norm failed");
        hyper.step = step;
        for (int k = 0; k < shards; k++) {
            int64_t lo = n * k / shards, hi = n * (k + 1) / shards;
            /* this shard's segments, rebased to lo */
            int64_t sb[NSEG + 1];
            unsigned char sd[NSEG];
            int ns = 0;
            sb[0] = 0;
            for (int j = 0; j < NSEG; j++) {
                int64_t a = bounds[j] > lo ? bounds[j] : lo;
                int64_t b = bounds[j + 1] < hi ? bounds[j + 1] : hi;
                if (a < b) { sb[ns + 1] = b - lo; sd[ns] = decay[j]; ns++; }
            }
            if (ns == 0) { sb[1] = 0; sd[0] = 0; ns = 1; }
            float *state[2] = {m + lo, v + lo};
            CHECK(mt_optim_step(model, p + lo, g + lo, state, 2, hi - lo, sb, sd, ns, &hyper,
                                norms[step - 1], 1.0) == MT_OK,
                  "mt_optim_step refused valid arguments");
        }
    }
    hyper.step = 0;
    float *state[2] = {m, v};
    CHECK(mt_optim_step(model, p, g, state, 2, n, bounds, decay, NSEG, &hyper, 0.0, 0.0) ==
              MT_EINVAL, "step 0 must be refused");
    hyper.step = 1;
    CHECK(mt_optim_step(model, p, g, state, 1, n, bounds, decay, NSEG, &hyper, 0.0, 0.0) ==
              MT_EINVAL, "one state array must be refused");
    mt_model_free(model);
    free(params); free(grads); free(g);
}

static void test_optimizer(int threads) {
    const int64_t n = 41000;
    float *p1 = fvec(n), *m1 = fvec(n), *v1 = fvec(n);
    float *p2 = fvec(n), *m2 = fvec(n), *v2 = fvec(n);
    double norms1[3], norms2[3];
    optimizer_run(1, 1, p1, m1, v1, norms1);
    for (int shards = 1; shards <= 3; shards += 2) {
        optimizer_run(threads, shards, p2, m2, v2, norms2);
        CHECK(memcmp(norms1, norms2, sizeof norms1) == 0, "optimizer (%d shards): norms differ",
              shards);
        CHECK(memcmp(p1, p2, n * sizeof(float)) == 0, "optimizer (%d shards): params differ",
              shards);
        CHECK(memcmp(m1, m2, n * sizeof(float)) == 0 && memcmp(v1, v2, n * sizeof(float)) == 0,
              "optimizer (%d shards): moments differ", shards);
    }
    CHECK(norms1[0] > 1.0, "the first step should have been clipped (norm %g)", norms1[0]);
    free(p1); free(m1); free(v1); free(p2); free(m2); free(v2);
    printf("driver: optimizer on %d threads (whole and in 3 shards): bitwise equal to 1 thread\n",
           threads);
}

/* ---- 2. the model's threaded step ---------------------------------------------------------- */

typedef struct {
    float *p, *g, *m, *v;     /* parameters, gradients, AdamW's two moments */
    float *g_first;  /* gradients of step 1 (same parameters in every run) */
    double losses[3];
    double eval_loss;
} model_run;

/* partitioned: the thread-mode step (mt_forward_backward_parts), window t*B/threads onwards to
 * thread t, so with more threads than windows some parts are empty. */
static int model_train(const mt_config *cfg, int threads, int partitioned, model_run *r) {
    enum { B = 6, T = 16 };
    size_t n;
    int nt;
    if (mt_num_params(cfg, &n) != MT_OK || mt_num_tensors(cfg, &nt) != MT_OK) return -1;
    int64_t *bounds = calloc((size_t)nt + 1, sizeof(int64_t));
    unsigned char *decay = calloc((size_t)nt, 1);
    for (int i = 0; i < nt; i++) {
        char name[128];
        size_t off;
        int ndim, shape[2];
        if (mt_tensor_info(cfg, i, name, sizeof name, &off, &ndim, shape) != 0) return -1;
        bounds[i] = (int64_t)off;
        decay[i] = ndim >= 2;
    }
    bounds[nt] = (int64_t)n;
    r->p = fvec(n); r->g = fvec(n); r->m = fvec(n); r->v = fvec(n); r->g_first = fvec(n);
    mt_model *model = NULL;
    if (mt_model_new(cfg, r->p, r->g, threads, &model) != MT_OK) return -1;
    float *state[2] = {r->m, r->v};
    mt_adamw hyper = {.lr = 3e-3, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8,
                      .weight_decay = 0.01, .step = 1};
    /* Split the step `threads` ways even on a machine with fewer CPUs (the default would use
     * min(threads, CPUs) parts and let the rest sleep, which hides races from the sanitizer). */
    if (mt_model_set_parts(model, threads) != 0) return -1;
    if (mt_model_init(model, 42) != MT_OK) return -1;
    int32_t offsets[65];
    for (int t = 0; t <= threads; t++) offsets[t] = (int32_t)(t * B / threads);
    int32_t inputs[B * T], targets[B * T];
    lcg_state = 99;
    for (int i = 0; i < B * T; i++) {
        inputs[i] = (int32_t)(lcg() % (uint32_t)cfg->vocab_size);
        targets[i] = (int32_t)(lcg() % (uint32_t)cfg->vocab_size);
    }
    int rc = 0;
    for (int step = 1; step <= 3 && rc == 0; step++) {
        rc = partitioned
                 ? mt_forward_backward_parts(model, inputs, targets, B, T, 1.0f / (B * T), 0,
                                             offsets, threads, &r->losses[step - 1])
                 : mt_forward_backward(model, inputs, targets, B, T, 1.0f / (B * T), 0,
                                       &r->losses[step - 1]);
        if (rc == 0 && step == 1) memcpy(r->g_first, r->g, n * sizeof(float));
        double norm = 0.0;
        hyper.step = step;
        if (rc == 0) rc = mt_grad_norm(model, r->g, (int64_t)n, &norm);
        if (rc == 0) rc = mt_optim_step(model, r->p, r->g, state, 2, (int64_t)n, bounds, decay,
                                        nt, &hyper, norm, 1.0);
    }
    if (rc == 0) rc = mt_loss(model, inputs, targets, B, T, &r->eval_loss);
    uint64_t calls = 0, windows = 0;
    mt_counters(model, &calls, &windows);
    CHECK(calls == 3 && windows == 3 * B, "counters: %llu calls, %llu windows",
          (unsigned long long)calls, (unsigned long long)windows);
    mt_model_free(model);
    free(bounds);
    free(decay);
    return rc;
}

static void model_run_free(model_run *r) {
    free(r->p); free(r->g); free(r->m); free(r->v); free(r->g_first);
}

static double max_abs(const float *x, size_t n) {
    double w = 0.0;
    for (size_t i = 0; i < n; i++) w = fmax(w, fabs((double)x[i]));
    return w;
}

static double max_abs_diff(const float *x, const float *y, size_t n) {
    double w = 0.0;
    for (size_t i = 0; i < n; i++) w = fmax(w, fabs((double)x[i] - y[i]));
    return w;
}

static void test_model(int threads) {
    const mt_config cfg = {.vocab_size = 97, .max_seq_len = 16, .d_model = 32, .n_layers = 2,
                           .n_heads = 4, .d_ff = 64};
    size_t n = 0;
    CHECK(mt_num_params(&cfg, &n) == MT_OK, "mt_num_params refused a valid config");
    model_run a, b, one, part;
    CHECK(model_train(&cfg, threads, 0, &a) == 0, "model run on %d threads failed", threads);
    CHECK(model_train(&cfg, threads, 0, &b) == 0, "second model run on %d threads failed", threads);
    CHECK(model_train(&cfg, 1, 0, &one) == 0, "model run on 1 thread failed");
    CHECK(model_train(&cfg, threads, 1, &part) == 0, "partitioned run on %d threads failed",
          threads);
    if (failures) return;
    CHECK(memcmp(a.losses, b.losses, sizeof a.losses) == 0 && a.eval_loss == b.eval_loss,
          "repeated %d-thread runs: losses differ", threads);
    CHECK(memcmp(a.p, b.p, n * sizeof(float)) == 0 && memcmp(a.g, b.g, n * sizeof(float)) == 0,
          "repeated %d-thread runs: params or grads differ", threads);
    /* Different thread counts may sum in a different order: float tolerance only. Step-1
     * gradients to 1e-5 of their largest entry; parameters after 3 AdamW steps (lr 3e-3) to
     * 1e-4, because AdamW's m/sqrt(v) turns tiny gradient differences of near-zero entries into
     * differences of a fraction of lr. */
    double gdiff = max_abs_diff(a.g_first, one.g_first, n), gmax = max_abs(one.g_first, n);
    CHECK(gdiff <= 1e-5 * gmax, "step-1 grads: %d threads vs 1 differ by %g (max |g| %g)",
          threads, gdiff, gmax);
    double worst = max_abs_diff(a.p, one.p, n);
    CHECK(worst < 1e-4, "params after 3 steps: %d threads vs 1 differ by %g", threads, worst);
    for (int s = 0; s < 3; s++)
        CHECK(fabs(a.losses[s] - one.losses[s]) < 1e-5 * fabs(one.losses[s]),
              "loss of step %d: %.9g (%d threads) vs %.9g (1 thread)", s + 1, a.losses[s],
              threads, one.losses[s]);
    CHECK(a.losses[2] < a.losses[0], "loss did not fall: %g -> %g", a.losses[0], a.losses[2]);
    double pdiff = max_abs_diff(part.p, one.p, n);
    CHECK(pdiff < 1e-4, "params after 3 partitioned steps: %d parts vs 1 thread differ by %g",
          threads, pdiff);
    for (int s = 0; s < 3; s++)
        CHECK(fabs(part.losses[s] - one.losses[s]) < 1e-5 * fabs(one.losses[s]),
              "partitioned loss of step %d: %.9g vs %.9g (1 thread)", s + 1, part.losses[s],
              one.losses[s]);
    printf("driver: model on %d threads: losses %.6f %.6f %.6f, eval %.6f; repeat bitwise equal, "
           "vs 1 thread: max |dgrad| %.2g (max |g| %.2g), max |dparam| %.2g\n", threads, a.losses[0],
           a.losses[1], a.losses[2], a.eval_loss, gdiff, gmax, worst);
    model_run_free(&a);
    model_run_free(&b);
    model_run_free(&one);
    model_run_free(&part);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    if (threads < 2 || threads > 64) {
        fprintf(stderr, "usage: driver [THREADS in 2..64]\n");
        return 2;
    }
    test_optimizer(threads);
    test_model(threads);
    if (failures) {
        fprintf(stderr, "driver: %d check(s) failed\n", failures);
        return 1;
    }
    printf("driver: all checks passed\n");
    return 0;
}
