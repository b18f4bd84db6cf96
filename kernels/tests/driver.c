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
 * 3. decoding: the fixed-order linear layer's AVX2 and portable paths agree bit for bit, and
 *    attention's several-keys products give one key at a time's floats (odd
 *    sizes, columns split 3 ways); a sequence decoded in a batch of 5 slots (others prefilled,
 *    stepped and reset, contexts sliding) on THREADS kernel threads gets bitwise the logits it
 *    gets alone on one thread.
 * Exit 0 when all checks pass, 1 otherwise (sanitizer reports abort the run on their own). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "mt_internal.h"   /* the kernel API and linear_fixed* (built with the kernel) */

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

/* ---- 3. decoding ------------------------------------------------------------------------------ */

static void test_linear_fixed(void) {
    enum { N = 13, IC = 37, OC = 23 };   /* tiles of 4, 3, 2 and 1 rows; edge columns */
    float *x = fvec(N * IC), *w = fvec(OC * IC), *bias = fvec(OC), *add = fvec(N * OC);
    float *a = fvec(N * OC), *b = fvec(N * OC);
    for (int i = 0; i < N * IC; i++) x[i] = uniform();
    for (int i = 0; i < OC * IC; i++) w[i] = uniform();
    for (int i = 0; i < OC; i++) bias[i] = uniform();
    for (int i = 0; i < N * OC; i++) add[i] = uniform();
    for (int rows = 1; rows <= N; rows++) {
        linear_fixed_portable(a, x, w, bias, add, rows, IC, OC, 0, OC);
        for (int p = 0; p < 3; p++)   /* columns in three parts, as decoding's threads do */
            linear_fixed(b, x, w, bias, add, rows, IC, OC, OC * p / 3, OC * (p + 1) / 3);
        CHECK(memcmp(a, b, sizeof(float) * (size_t)rows * OC) == 0,
              "linear_fixed: AVX2 and portable paths differ (%d rows)", rows);
        /* each row alone gives what it gave among the others */
        for (int r = 0; r < rows; r++) {
            linear_fixed(b, x + (size_t)r * IC, w, bias, add + (size_t)r * OC, 1, IC, OC, 0, OC);
            CHECK(memcmp(a + (size_t)r * OC, b, sizeof(float) * OC) == 0,
                  "linear_fixed: row %d alone differs from its batch of %d", r, rows);
        }
    }
    free(x); free(w); free(bias); free(add); free(a); free(b);
}

/* Decoding attention's several-keys forms give the floats of one key at a time. */
static void test_attention_fixed(void) {
    enum { NK = 13, LD = 150 };
    int sizes[] = {5, 37, 64, 130};
    float *q = fvec(LD), *k = fvec(NK * LD), *a = fvec(NK), *b = fvec(NK);
    float *y = fvec(LD), *z = fvec(LD);
    for (int i = 0; i < NK * LD; i++) k[i] = uniform();
    for (int i = 0; i < LD; i++) q[i] = uniform();
    for (int s = 0; s < 4; s++) {
        int n = sizes[s];
        for (int nk = 1; nk <= NK; nk++) {
            dots_fixed(a, q, k, LD, nk, n, 0.125f);
            for (int j = 0; j < nk; j++) b[j] = 0.125f * dot_fixed(q, k + (size_t)j * LD, n);
            CHECK(memcmp(a, b, sizeof(float) * nk) == 0,
                  "dots_fixed differs from dot_fixed key by key (n %d, %d keys)", n, nk);
            weighted_sum_fixed(y, a, k, LD, nk, n);
            for (int d = 0; d < n; d++) z[d] = 0.0f;
            for (int j = 0; j < nk; j++) fma_row(z, a[j], k + (size_t)j * LD, n);
            CHECK(memcmp(y, z, sizeof(float) * n) == 0,
                  "weighted_sum_fixed differs from fma_row key by key (n %d, %d keys)", n, nk);
        }
    }
    free(q); free(k); free(a); free(b); free(y); free(z);
}

/* A decoding model: init weights scaled up so logits spread over several units. */
static mt_model *decode_model(const mt_config *cfg, int threads, float **arenas) {
    size_t n = 0;
    mt_model *m = NULL;
    if (mt_num_params(cfg, &n) != MT_OK) return NULL;
    for (int i = 0; i < 4; i++) arenas[i] = fvec(n);   /* params, grads; two spare (freed alike) */
    if (mt_model_new(cfg, arenas[0], arenas[1], threads, &m) != MT_OK) return NULL;
    if (mt_model_set_parts(m, threads) != MT_OK || mt_model_init(m, 7) != MT_OK) return NULL;
    for (size_t i = 0; i < n; i++) arenas[0][i] *= 10.0f;
    return m;
}

static void test_decode(int threads) {
    const mt_config cfg = {.vocab_size = 97, .max_seq_len = 16, .d_model = 36, .n_layers = 2,
                           .n_heads = 4, .d_ff = 70};
    enum { STEPS = 40, V = 97, SLOTS = 5 };
    float *ar1[4], *arn[4];
    mt_model *m1 = decode_model(&cfg, 1, ar1), *mn = decode_model(&cfg, threads, arn);
    mt_batch *alone = NULL, *batch = NULL;
    if (m1) mt_batch_new(m1, 1, 0, &alone);
    if (mn) mt_batch_new(mn, SLOTS, 0, &batch);
    CHECK(alone && batch, "decode: model or batch creation failed");
    if (!alone || !batch) return;
    float *la = fvec(V), *lb = fvec((size_t)SLOTS * V);
    int32_t ids[SLOTS * 16], slots[SLOTS], counts[SLOTS];
    lcg_state = 5;
    int same = 1;
    for (int step = 0; step < STEPS; step++) {
        int32_t tok = (int32_t)(lcg() % V);
        int32_t one = 0;
        int32_t *target_ids = step == 0 ? ids : &tok;
        int32_t target_n = step == 0 ? 5 : 1;
        if (step == 0)
            for (int i = 0; i < 5; i++) ids[i] = (int32_t)(lcg() % V);
        CHECK(mt_batch_step(alone, 1, &one, &target_n, target_ids, la) == MT_OK,
              "decode: step alone failed");
        /* the batch: the target in slot 2 first in the list, then the others */
        int32_t *p = ids;
        int nseq = 0;
        slots[nseq] = 2; counts[nseq] = target_n;
        memmove(p, target_ids, sizeof(int32_t) * (size_t)target_n);
        p += target_n; nseq++;
        for (int s = 0; s < SLOTS; s++) {
            if (s == 2) continue;
            int n = 1 + (int)(lcg() % 3);
            if (step == 0 || lcg() % 8 == 0) {
                mt_batch_reset(batch, s);
                n = 1 + (int)(lcg() % 16);
            }
            for (int i = 0; i < n; i++) p[i] = (int32_t)(lcg() % V);
            slots[nseq] = s; counts[nseq] = n; p += n; nseq++;
        }
        CHECK(mt_batch_step(batch, nseq, slots, counts, ids, lb) == MT_OK,
              "decode: batch step failed");
        same &= memcmp(la, lb, sizeof(float) * V) == 0;
    }
    CHECK(same, "decode: the sequence's logits in a batch of %d on %d threads differ from "
          "alone", SLOTS, threads);
    uint64_t slides_alone = 0, slides_batch = 0;
    mt_batch_slides(alone, 0, &slides_alone);
    mt_batch_slides(batch, 2, &slides_batch);
    CHECK(slides_alone >= 2 && slides_alone == slides_batch,
          "decode: slides %llu alone, %llu in the batch",
          (unsigned long long)slides_alone, (unsigned long long)slides_batch);
    int32_t bad_slots[2] = {1, 1}, bad_counts[2] = {1, 1}, bad_ids[2] = {0, 0};
    CHECK(mt_batch_step(batch, 2, bad_slots, bad_counts, bad_ids, lb) == MT_EINVAL,
          "decode: a slot twice in one step was accepted");
    printf("driver: decoding on %d threads: %d steps in a batch of %d bitwise equal to alone, "
           "%llu slides\n", threads, STEPS, SLOTS, (unsigned long long)slides_alone);
    mt_batch_free(alone);
    mt_batch_free(batch);
    mt_model_free(m1);
    mt_model_free(mn);
    for (int i = 0; i < 4; i++) { free(ar1[i]); free(arn[i]); }
    free(la);
    free(lb);
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    if (threads < 2 || threads > 64) {
        fprintf(stderr, "usage: driver [THREADS in 2..64]\n");
        return 2;
    }
    test_optimizer(threads);
    test_model(threads);
    test_linear_fixed();
    test_attention_fixed();
    test_decode(threads);
    if (failures) {
        fprintf(stderr, "driver: %d check(s) failed\n", failures);
        return 1;
    }
    printf("driver: all checks passed\n");
    return 0;
}
