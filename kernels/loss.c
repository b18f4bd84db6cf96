/* The output layer (untied lm_head, no bias) with a fused, chunked softmax + cross-entropy.
 *
 * The [B*T, V] logits are never materialised in training: rows are processed in chunks of R
 * rows through one shared (R,V) buffer. Per chunk, every thread
 *   1. computes its vocabulary slice of the chunk's logits (one GEMM, M = R rows),
 *   2. turns its rows into losses and, in place, E = exp(logits - row max) (dlogits are
 *      E scaled per row minus the onehot; the scaling is applied to the small operands),
 *   3. adds its vocabulary slice of dW_lm (summing over the chunk's rows) and writes its
 *      column slice of dlnf,
 * with a barrier after each step. Chunks are visited in order, so each dW_lm element is a sum
 * in a fixed order whatever the thread count. */
#include <math.h>
#include <string.h>
#include "mt_internal.h"

/* Max of x[0..n) with 16 independent lanes (vectorisable; max is order-independent). */
static inline __attribute__((always_inline)) float row_max(const float *x, int n) {
    float m[16];
    for (int k = 0; k < 16; k++) m[k] = -INFINITY;
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) m[k] = x[i + k] > m[k] ? x[i + k] : m[k];
    float r = -INFINITY;
    for (int k = 0; k < 16; k++) r = m[k] > r ? m[k] : r;
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

/* x[i] = exp(x[i] - mx) in place; returns the sum (16 lanes, then lanes in order). */
static inline __attribute__((always_inline)) float exp_sum_inplace(float *x, int n, float mx) {
    float s[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++) { float e = mt_expf(x[i + k] - mx); x[i + k] = e; s[k] += e; }
    float r = 0.0f;
    for (int k = 0; k < 16; k++) r += s[k];
    for (; i < n; i++) { float e = mt_expf(x[i] - mx); x[i] = e; r += e; }
    return r;
}

/* logits (R,V); losses (R); targets (R) in [0,V). */
MT_HOT void softmax_xent_rows(float *logits, float *losses, const int32_t *targets, int R, int V,
                       float grad_scale, int want_grad) {
    for (int r = 0; r < R; r++) {
        float *x = logits + (size_t)r * V;
        int tgt = targets[r];
        float mx = row_max(x, V);
        float xt = x[tgt];
        float sum = exp_sum_inplace(x, V, mx);
        float lse = mx + logf(sum);
        losses[r] = lse - xt;
        if (want_grad) {
            float s = grad_scale / sum;
            for (int i = 0; i < V; i++) x[i] *= s;
            x[tgt] -= grad_scale;
        }
    }
}

/* Rows of logits (R,V) become E = exp(logit - row max) in place; losses[r] = lse - logit[t];
 * inv[r] = 1 / sum_j E[r,j], so softmax = E * inv. */
MT_HOT static void softmax_rows_unnormalised(float *logits, float *losses, float *inv,
                                             const int32_t *targets, int R, int V) {
    for (int r = 0; r < R; r++) {
        float *x = logits + (size_t)r * V;
        float mx = row_max(x, V);
        float xt = x[targets[r]];
        float sum = exp_sum_inplace(x, V, mx);
        losses[r] = mx + logf(sum) - xt;
        inv[r] = 1.0f / sum;
    }
}

/* dlogits = diag(s) E - g onehot(t) with s_r = g / sum_r, g = grad_scale, is never written out:
 *   dW_lm  += E^T (diag(s) x) - g sum_{r: t_r = j} x_r   (rows j of the onehot term)
 *   dlnf_r  = s_r (E W_lm)_r - g W_lm[t_r]
 * so the (R,V) chunk is not rescaled in place (one pass over it saved); only the (R,C) rows of
 * x are scaled, into xs. E W_lm is summed over the vocabulary: each thread multiplies its own
 * vocabulary slice into a partial (R,C) (no thread packs the whole (R,V) chunk), and the
 * partials are added per row in thread order. The chunk buffer holds R*(V+C+1+C*nt) floats:
 * E, xs, s, partials. */
void output_layer_chunked(mt_model *m, int tid, int nt, const float *lnf, const float *wlm,
                          float *dwlm, float *dlnf, const int32_t *targets, float *losses,
                          float *chunk, int R, int N, int C, int V, float grad_scale) {
    int v0, v1;
    float *xs = chunk + (size_t)R * V, *sc = xs + (size_t)R * C;
    mt_tick(m, tid, TK_OUTPUT);
    mt_split(V, tid, nt, 16, &v0, &v1);
    for (int c0 = 0; c0 < N; c0 += R) {
        int rows = N - c0 < R ? N - c0 : R;
        const float *x = lnf + (size_t)c0 * C;
        const int32_t *tg = targets + c0;
        /* chunk[:, v0:v1] (rows, v1-v0) = x (rows,C) @ wlm[v0:v1] (v1-v0,C)^T */
        if (v1 > v0)
            scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, v1 - v0, C, 1.0f,
                              x, C, wlm + (size_t)v0 * C, C, 0.0f, chunk + v0, V);
        mt_sync(m, tid);
        int r0, r1;
        mt_split(rows, tid, nt, 1, &r0, &r1);
        softmax_rows_unnormalised(chunk + (size_t)r0 * V, losses + c0 + r0, sc + r0, tg + r0,
                                  r1 - r0, V);
        if (dlnf)
            for (int r = r0; r < r1; r++) {
                float s = grad_scale * sc[r];
                sc[r] = s;
                for (int k = 0; k < C; k++) xs[(size_t)r * C + k] = x[(size_t)r * C + k] * s;
            }
        mt_sync(m, tid);
        if (dlnf) {
            if (v1 > v0) {
                /* dwlm[v0:v1] (v1-v0,C) += E[:, v0:v1]^T @ xs (rows,C), then the onehot term
                 * for the targets in this slice, rows in order */
                scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, v1 - v0, C, rows,
                                  1.0f, chunk + v0, V, xs, C, 1.0f, dwlm + (size_t)v0 * C, C);
                for (int r = 0; r < rows; r++) {
                    int t = tg[r];
                    if (t < v0 || t >= v1) continue;
                    float *d = dwlm + (size_t)t * C;
                    const float *xr = x + (size_t)r * C;
                    for (int k = 0; k < C; k++) d[k] -= grad_scale * xr[k];
                }
            }
            /* part[tid] (rows,C) = E[:, v0:v1] (rows, v1-v0) @ wlm[v0:v1] (v1-v0, C) */
            float *part = sc + R + (size_t)tid * R * C;
            if (v1 > v0)
                scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, C, v1 - v0,
                                  1.0f, chunk + v0, V, wlm + (size_t)v0 * C, C, 0.0f, part, C);
            else
                memset(part, 0, sizeof(float) * (size_t)rows * C);
            mt_sync(m, tid);
            /* dlnf rows (own rows of the chunk) = s_r * sum_t part[t]_r - g * wlm[t_r] */
            for (int r = r0; r < r1; r++) {
                float *o = dlnf + (size_t)(c0 + r) * C;
                const float *w = wlm + (size_t)tg[r] * C;
                const float *p0 = sc + R + (size_t)r * C;
                for (int k = 0; k < C; k++) o[k] = p0[k];
                for (int t = 1; t < nt; t++) {
                    const float *pt = p0 + (size_t)t * R * C;
                    for (int k = 0; k < C; k++) o[k] += pt[k];
                }
                for (int k = 0; k < C; k++) o[k] = o[k] * sc[r] - grad_scale * w[k];
            }
            mt_sync(m, tid);
        }
    }
}
