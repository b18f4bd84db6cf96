/* The optimizer: the global gradient norm and clipping as torch.nn.utils.clip_grad_norm_, AdamW
 * exactly as torch.optim.AdamW (single-tensor path), over flat float32 arrays, on the model's
 * thread pool (threads.c).
 *
 * Threading: a call runs one pool task on the model's work parts; part t takes the t-th of
 * nparts contiguous ranges and writes only that range, so clipping and AdamW are bitwise
 * independent of the part count. The norm is a sum of squares in double over fixed blocks of
 * OPT_BLOCK floats: each part fills the partial sums of its blocks, and the caller adds the
 * partials in block order. The block grid does not depend on the parts, so neither does the
 * norm.
 */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

/* Floats per partial sum of the norm: small enough to split 33.8M parameters over many threads,
 * large enough that the partial array (n / OPT_BLOCK doubles) is negligible. */
#define OPT_BLOCK 8192
/* Floats clipped then updated at a time: the clipped gradients are read back from L1. */
#define OPT_CHUNK 2048

/* [*lo, *hi) = the part-th of nparts contiguous, nearly equal ranges of [0, n). */
static void split_range(int64_t n, int part, int nparts, int64_t *lo, int64_t *hi) {
    *lo = n * part / nparts;
    *hi = n * (part + 1) / nparts;
}

/* ---- gradient norm ---------------------------------------------------------------------------- */

static int64_t norm_blocks(int64_t n) { return n <= 0 ? 0 : (n + OPT_BLOCK - 1) / OPT_BLOCK; }

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

typedef struct {
    double *partials;
    const float *grad;
    int64_t n;
} sumsq_job;

static void sumsq_task(void *ctx, int tid, int nt) {
    sumsq_job *j = ctx;
    int64_t b0, b1;
    split_range(norm_blocks(j->n), tid, nt, &b0, &b1);
    for (int64_t b = b0; b < b1; b++) {
        int64_t lo = b * OPT_BLOCK, hi = lo + OPT_BLOCK < j->n ? lo + OPT_BLOCK : j->n;
        j->partials[b] = sumsq_block(j->grad + lo, hi - lo);
    }
}

int mt_grad_norm(mt_model *model, const float *grad, int64_t n, double *out) {
    if (!model || (!grad && n > 0) || n < 0 || !out) return MT_EINVAL;
    int64_t nb = norm_blocks(n);
    double *partials = nb ? malloc((size_t)nb * sizeof(double)) : NULL;
    if (nb && !partials) return MT_ENOMEM;
    if (mt_model_enter(model) != MT_OK) {
        free(partials);
        return MT_EBUSY;
    }
    sumsq_job j = {partials, grad, n};
    if (nb) pool_run_parts(model->pool, sumsq_task, &j, model->parts);
    mt_model_leave(model);
    double s = 0.0;
    for (int64_t b = 0; b < nb; b++) s += partials[b];
    free(partials);
    *out = sqrt(s);
    return MT_OK;
}

/* ---- clip + AdamW ----------------------------------------------------------------------------- */

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

static adamw_scalars adamw_prepare(const mt_adamw *h) {
    adamw_scalars s;
    s.decay_factor = (float)(1.0 - h->lr * h->weight_decay);
    s.one_minus_b1 = (float)(1.0 - h->beta1);
    s.beta2 = (float)h->beta2;
    s.one_minus_b2 = (float)(1.0 - h->beta2);
    s.neg_step_size = (float)(-(h->lr / (1.0 - pow(h->beta1, (double)h->step))));
    s.bc2_sqrt = (float)sqrt(1.0 - pow(h->beta2, (double)h->step));
    s.eps = (float)h->eps;
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

typedef struct {
    float *param, *grad, *m, *v;
    int64_t n;
    const int64_t *seg_bounds;
    const unsigned char *seg_decay;
    int nseg;
    adamw_scalars s;
    int clip;         /* scale the gradients by clip_factor first */
    float clip_factor;
} optim_job;

/* Clip then update [lo, hi), OPT_CHUNK floats at a time, segment by segment. */
static void optim_range(const optim_job *j, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    /* First segment containing lo: the last k with seg_bounds[k] <= lo (binary search). */
    int a = 0, b = j->nseg - 1;
    while (a < b) {
        int mid = (a + b + 1) / 2;
        if (j->seg_bounds[mid] <= lo) a = mid; else b = mid - 1;
    }
    for (int k = a; k < j->nseg && j->seg_bounds[k] < hi; k++) {
        int64_t s0 = j->seg_bounds[k] > lo ? j->seg_bounds[k] : lo;
        int64_t s1 = j->seg_bounds[k + 1] < hi ? j->seg_bounds[k + 1] : hi;
        for (int64_t c0 = s0; c0 < s1; c0 += OPT_CHUNK) {
            int64_t len = s1 - c0 < OPT_CHUNK ? s1 - c0 : OPT_CHUNK;
            if (j->clip)
                for (int64_t i = c0; i < c0 + len; i++) j->grad[i] *= j->clip_factor;
            adamw_slice(j->param + c0, j->grad + c0, j->m + c0, j->v + c0, len, &j->s,
                        j->seg_decay[k] != 0);
        }
    }
}

static void optim_task(void *ctx, int tid, int nt) {
    const optim_job *j = ctx;
    int64_t lo, hi;
    split_range(j->n, tid, nt, &lo, &hi);
    optim_range(j, lo, hi);
}

static int segments_ok(int64_t n, const int64_t *seg_bounds, const unsigned char *seg_decay,
                       int nseg) {
    if (n < 0 || nseg < 1 || !seg_bounds || !seg_decay) return 0;
    if (seg_bounds[0] != 0 || seg_bounds[nseg] != n) return 0;
    for (int k = 0; k < nseg; k++)
        if (seg_bounds[k + 1] < seg_bounds[k]) return 0;
    return 1;
}

static int hyper_ok(const mt_adamw *h) {
    return h && h->step >= 1 && h->lr >= 0 && h->beta1 >= 0 && h->beta1 < 1 &&
           h->beta2 >= 0 && h->beta2 < 1 && h->eps >= 0 && h->weight_decay >= 0;
}

int mt_optim_step(mt_model *model, float *param, float *grad, float *const *state, int nstate,
                  int64_t n, const int64_t *seg_bounds, const unsigned char *seg_decay,
                  int nseg, const mt_adamw *hyper, double norm, double max_norm) {
    if (!model || !state || nstate != MT_ADAMW_STATES || !hyper_ok(hyper) ||
        !segments_ok(n, seg_bounds, seg_decay, nseg))
        return MT_EINVAL;
    if (n > 0 && (!param || !grad || !state[0] || !state[1])) return MT_EINVAL;
    /* torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when below 1. A
     * non-finite norm leaves the gradients as they are, for the caller to report. */
    double coef = max_norm / (norm + 1e-6);
    optim_job j = {param, grad, state[0], state[1], n, seg_bounds, seg_decay, nseg,
                   adamw_prepare(hyper), max_norm > 0 && isfinite(norm) && coef < 1.0,
                   (float)coef};
    if (mt_model_enter(model) != MT_OK) return MT_EBUSY;
    if (n > 0) pool_run_parts(model->pool, optim_task, &j, model->parts);
    mt_model_leave(model);
    return MT_OK;
}
