/* The optimizer: AdamW exactly as torch.optim.AdamW (single-tensor path), the global gradient
 * norm and clipping as torch.nn.utils.clip_grad_norm_, over the flat float32 arenas.
 *
 * Threading: every function comes as a "part" (the work of one of nparts contiguous ranges, for a
 * caller's own thread pool) and as a "flat" entry point that runs the parts on nthreads threads.
 * Each part writes only its own range, so AdamW and scaling are bitwise independent of the
 * thread count. The norm is a sum of squares in double over fixed blocks of OPT_BLOCK floats:
 * a part fills the partial sums of its blocks, and the partials are added in block order by one
 * thread. The block grid does not depend on the thread count, so neither does the norm.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include "mpitrain_kernel.h"

/* Floats per partial sum of the norm: small enough to split 33.8M parameters over many threads,
 * large enough that the partial array (n / OPT_BLOCK doubles) is negligible. */
#define OPT_BLOCK 8192
/* Threads a flat entry point will start at most (more are refused by the Python wrapper). */
#define OPT_MAX_THREADS 256

/* [*lo, *hi) = the part-th of nparts contiguous, nearly equal ranges of [0, n). */
static void split_range(int64_t n, int part, int nparts, int64_t *lo, int64_t *hi) {
    *lo = n * part / nparts;
    *hi = n * (part + 1) / nparts;
}

/* ---- AdamW ---------------------------------------------------------------------------------- */

/* Scalars of one AdamW step, rounded to float where PyTorch rounds them (a Python float meets a
 * float32 tensor). */
typedef struct {
    float decay_factor;   /* 1 - lr * weight_decay */
    float one_minus_b1;   /* lerp weight of the first moment */
    float beta2, one_minus_b2;
    float neg_step_size;  /* -lr / (1 - beta1^step) */
    float bc2_sqrt;       /* sqrt(1 - beta2^step) */
    float eps;
} adamw_scalars;

static adamw_scalars adamw_prepare(double lr, double beta1, double beta2, double eps,
                                   double weight_decay, int64_t step) {
    adamw_scalars s;
    s.decay_factor = (float)(1.0 - lr * weight_decay);
    s.one_minus_b1 = (float)(1.0 - beta1);
    s.beta2 = (float)beta2;
    s.one_minus_b2 = (float)(1.0 - beta2);
    s.neg_step_size = (float)(-(lr / (1.0 - pow(beta1, (double)step))));
    s.bc2_sqrt = (float)sqrt(1.0 - pow(beta2, (double)step));
    s.eps = (float)eps;
    return s;
}

/* One contiguous slice of n floats of one tensor (all four arrays point at its start). The
 * operation order follows torch/optim/adamw.py (_single_tensor_adamw) and the CPU kernels of
 * mul_, lerp_ (weight < 0.5: m + w * (g - m)), addcmul_, sqrt, div, add_ and addcdiv_, in one
 * pass: p * decay_factor is rounded to float before the update is added, as PyTorch's separate
 * mul_ does, and a factor of exactly 1 (no decay) leaves p unchanged. */
static void adamw_slice(float *restrict p, const float *restrict g, float *restrict m,
                        float *restrict v, int64_t n, const adamw_scalars *s, int decay) {
    const float df = decay ? s->decay_factor : 1.0f;
    const float w1 = s->one_minus_b1, b2 = s->beta2, w2 = s->one_minus_b2;
    const float nss = s->neg_step_size, bc2 = s->bc2_sqrt, eps = s->eps;
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        float mi = m[i] + w1 * (gi - m[i]);
        float vi = v[i] * b2 + w2 * gi * gi;
        float denom = sqrtf(vi) / bc2 + eps;
        float pd = p[i] * df;
        m[i] = mi;
        v[i] = vi;
        p[i] = pd + nss * mi / denom;
    }
}

/* The segments are [seg_bounds[k], seg_bounds[k+1]) for k < nseg, covering [0, n); decay flag
 * seg_decay[k] says whether segment k takes weight decay (PyTorch practice: tensors of 2+ dims). */
static void adamw_range(float *param, const float *grad, float *m, float *v, int64_t lo,
                        int64_t hi, const int64_t *seg_bounds, const unsigned char *seg_decay,
                        int nseg, const adamw_scalars *s) {
    if (lo >= hi) return;
    /* First segment containing lo: the last k with seg_bounds[k] <= lo (binary search). */
    int a = 0, b = nseg - 1;
    while (a < b) {
        int mid = (a + b + 1) / 2;
        if (seg_bounds[mid] <= lo) a = mid; else b = mid - 1;
    }
    for (int k = a; k < nseg && seg_bounds[k] < hi; k++) {
        int64_t s0 = seg_bounds[k] > lo ? seg_bounds[k] : lo;
        int64_t s1 = seg_bounds[k + 1] < hi ? seg_bounds[k + 1] : hi;
        if (s1 > s0)
            adamw_slice(param + s0, grad + s0, m + s0, v + s0, s1 - s0, s, seg_decay[k] != 0);
    }
}

static int adamw_args_ok(int64_t n, const int64_t *seg_bounds, int nseg, int64_t step) {
    if (n < 0 || nseg < 1 || step < 1) return 0;
    if (seg_bounds[0] != 0 || seg_bounds[nseg] != n) return 0;
    for (int k = 0; k < nseg; k++)
        if (seg_bounds[k + 1] < seg_bounds[k]) return 0;
    return 1;
}

int adamw_part(float *param, const float *grad, float *m, float *v, int64_t n,
               const int64_t *seg_bounds, const unsigned char *seg_decay, int nseg,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               int64_t step, int part, int nparts) {
    if (!adamw_args_ok(n, seg_bounds, nseg, step) || nparts < 1 || part < 0 || part >= nparts)
        return -1;
    adamw_scalars s = adamw_prepare(lr, beta1, beta2, eps, weight_decay, step);
    int64_t lo, hi;
    split_range(n, part, nparts, &lo, &hi);
    adamw_range(param, grad, m, v, lo, hi, seg_bounds, seg_decay, nseg, &s);
    return 0;
}

/* ---- gradient norm and scaling --------------------------------------------------------------- */

int64_t optim_norm_blocks(int64_t n) {
    return n <= 0 ? 0 : (n + OPT_BLOCK - 1) / OPT_BLOCK;
}

/* Sum of squares of x[0..n) in double, in a fixed order: 8 interleaved lanes (so the compiler
 * can keep several sums in flight), then the lanes in order. Each square is exact in double. */
static double sumsq_block(const float *x, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            double d = (double)x[i + l];
            acc[l] += d * d;
        }
    for (int l = 0; i < n; i++, l++) {
        double d = (double)x[i];
        acc[l] += d * d;
    }
    double s = 0.0;
    for (int l = 0; l < 8; l++) s += acc[l];
    return s;
}

void grad_sumsq_part(double *partials, const float *grad, int64_t n, int part, int nparts) {
    int64_t b0, b1;
    split_range(optim_norm_blocks(n), part, nparts, &b0, &b1);
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = b * OPT_BLOCK, hi = lo + OPT_BLOCK < n ? lo + OPT_BLOCK : n;
        partials[b] = sumsq_block(grad + lo, hi - lo);
    }
}

double optim_sum_partials(const double *partials, int64_t nblocks) {
    double s = 0.0;
    for (int64_t b = 0; b < nblocks; b++) s += partials[b];
    return s;
}

void scale_part(float *x, int64_t n, float factor, int part, int nparts) {
    int64_t lo, hi;
    split_range(n, part, nparts, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) x[i] *= factor;
}

double clip_coefficient(double norm, double max_norm) {
    /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to at most 1.
     * A NaN norm gives a NaN coefficient; the callers then leave the gradients untouched. */
    return max_norm / (norm + 1e-6);
}

/* ---- running parts on threads ----------------------------------------------------------------- */

typedef struct {
    void (*fn)(void *ctx, int part, int nparts);
    void *ctx;
    int part, nparts;
} opt_task;

static void *opt_trampoline(void *arg) {
    opt_task *t = arg;
    t->fn(t->ctx, t->part, t->nparts);
    return NULL;
}

/* Runs fn(ctx, part, n) for part = 0..n-1, part 0 on the calling thread. A thread that cannot be
 * started has its part run here instead: each part's result does not depend on who runs it. */
static void run_parts(int n, void (*fn)(void *, int, int), void *ctx) {
    if (n < 1) n = 1;
    if (n > OPT_MAX_THREADS) n = OPT_MAX_THREADS;
    pthread_t th[OPT_MAX_THREADS];
    opt_task tasks[OPT_MAX_THREADS];
    int started[OPT_MAX_THREADS];
    for (int k = 1; k < n; k++) {
        tasks[k] = (opt_task){fn, ctx, k, n};
        started[k] = pthread_create(&th[k], NULL, opt_trampoline, &tasks[k]) == 0;
    }
    fn(ctx, 0, n);
    for (int k = 1; k < n; k++) {
        if (started[k]) pthread_join(th[k], NULL);
        else fn(ctx, k, n);
    }
}

typedef struct {
    float *param, *m, *v;
    const float *grad;
    int64_t n;
    const int64_t *seg_bounds;
    const unsigned char *seg_decay;
    int nseg;
    adamw_scalars s;
} adamw_job;

static void adamw_job_part(void *ctx, int part, int nparts) {
    adamw_job *j = ctx;
    int64_t lo, hi;
    split_range(j->n, part, nparts, &lo, &hi);
    adamw_range(j->param, j->grad, j->m, j->v, lo, hi, j->seg_bounds, j->seg_decay, j->nseg, &j->s);
}

int adamw_step_flat(float *param, const float *grad, float *m, float *v, int64_t n,
                    const int64_t *seg_bounds, const unsigned char *seg_decay, int nseg,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step, int nthreads) {
    if (!adamw_args_ok(n, seg_bounds, nseg, step)) return -1;
    adamw_job j = {param, m, v, grad, n, seg_bounds, seg_decay, nseg,
                   adamw_prepare(lr, beta1, beta2, eps, weight_decay, step)};
    run_parts(nthreads, adamw_job_part, &j);
    return 0;
}

typedef struct {
    double *partials;
    const float *grad;
    int64_t n;
} sumsq_job;

static void sumsq_job_part(void *ctx, int part, int nparts) {
    sumsq_job *j = ctx;
    grad_sumsq_part(j->partials, j->grad, j->n, part, nparts);
}

double grad_norm_flat(const float *grad, int64_t n, int nthreads) {
    int64_t nb = optim_norm_blocks(n);
    if (nb == 0) return 0.0;
    double *partials = malloc((size_t)nb * sizeof(double));
    if (!partials) return -1.0;
    sumsq_job j = {partials, grad, n};
    run_parts(nthreads, sumsq_job_part, &j);
    double norm = sqrt(optim_sum_partials(partials, nb));
    free(partials);
    return norm;
}

typedef struct {
    float *x;
    int64_t n;
    float factor;
} scale_job;

static void scale_job_part(void *ctx, int part, int nparts) {
    scale_job *j = ctx;
    scale_part(j->x, j->n, j->factor, part, nparts);
}

void scale_flat(float *x, int64_t n, float factor, int nthreads) {
    scale_job j = {x, n, factor};
    run_parts(nthreads, scale_job_part, &j);
}

double clip_grad_norm_flat(float *grad, int64_t n, double max_norm, int nthreads) {
    double norm = grad_norm_flat(grad, n, nthreads);
    if (norm < 0.0) return norm;
    double coef = clip_coefficient(norm, max_norm);
    if (coef < 1.0) scale_flat(grad, n, (float)coef, nthreads);
    return norm;
}
