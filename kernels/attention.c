/* Causal multi-head self-attention. attention_rows is the forward pass of one head over some
 * query rows of one sequence, wherever its keys and values live (the window's own qkv rows in
 * training and evaluation, a key/value cache in decoding); causal_softmax_row is the attention
 * pattern every path uses. Training goes one (batch, head) item at a time, so threads can split
 * the B*NH items and each writes only its own slice of the output. Scores and their gradients
 * live in a (T,T) scratch per thread; the backward pass recomputes the attention weights from
 * q, k and the cached per-row log-sum-exp instead of storing B*NH*T*T floats. Training's
 * products go through OpenBLAS on strided views of qkv (row stride 3C); block b of query rows
 * uses rows [i0,i1) and columns [0,i1) of the scratch. Decoding's products are rowdot.c's
 * fixed-order ones, a row at a time. */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

/* Causality in blocks: rows [i0,i1) only see keys [0,i1), so every product below is done per
 * block of ATT_BLOCK query rows over the first i1 keys -- 5/8 of the full T x T work at
 * T = 128 -- instead of computing the masked upper triangle. Entries of att/datt right of the
 * diagonal inside a block are zeros; entries right of the block are never read. */
#define ATT_BLOCK 32

/* The attention pattern, one row: softmax over keys j <= last of the scaled scores row[j]
 * (in place), zeros for last < j < end; returns the row's log-sum-exp. Training, evaluation
 * and decoding all weigh their keys through this function. */
static inline float causal_softmax_row(float *row, int last, int end) {
    float mx = row[0];
    for (int j = 1; j <= last; j++) mx = row[j] > mx ? row[j] : mx;
    float sum = 0.0f;
    for (int j = 0; j <= last; j++) { row[j] = mt_expf(row[j] - mx); sum += row[j]; }
    float inv = 1.0f / sum;
    for (int j = 0; j <= last; j++) row[j] *= inv;
    for (int j = last + 1; j < end; j++) row[j] = 0.0f;
    return mx + logf(sum);
}

/* Query rows at positions [i0,i1) (pointers q, att at position p0's row): att rows get the
 * weights over keys [0,i1), scale * q . k softmaxed with the causal pattern. If lse_out is
 * given (indexed from p0) it is written (forward); otherwise lse_in (indexed from 0, the
 * backward pass's whole sequence) recomputes the weights from the cached log-sum-exp. */
MT_HOT static void causal_weights(float *att, int ldatt, float *lse_out, const float *lse_in,
                                  const float *q, int ldq, const float *k, int ldk, int p0,
                                  int i0, int i1, int hs, float scale) {
    float *a = att + (size_t)(i0 - p0) * ldatt;
    /* a (n, i1) = scale * q[i0:i1] (n,hs) @ k[0:i1] (i1,hs)^T */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i1 - i0, i1, hs, scale,
                      q + (size_t)(i0 - p0) * ldq, ldq, k, ldk, 0.0f, a, ldatt);
    for (int i = i0; i < i1; i++) {
        float *row = a + (size_t)(i - i0) * ldatt;
        if (lse_out) {
            lse_out[i - p0] = causal_softmax_row(row, i, i1);
        } else {
            float l = lse_in[i];
            for (int j = 0; j <= i; j++) row[j] = mt_expf(row[j] - l);
            for (int j = i + 1; j < i1; j++) row[j] = 0.0f;
        }
    }
}

/* ---- options: rotary position embedding, the Ulam pattern ---------------------------------- */

void rope_rows(float *x, int ld, int p0, int n, const mt_attn *o, int inverse) {
    int H = o->half;
    for (int r = 0; r < n; r++) {
        const float *c = o->rope + (size_t)(p0 + r) * 2 * H, *sn = c + H;
        float *a = x + (size_t)r * ld, *b = a + H;
        if (!inverse)
            for (int i = 0; i < H; i++) {
                float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] - x2 * sn[i];
                b[i] = x2 * c[i] + x1 * sn[i];
            }
        else
            for (int i = 0; i < H; i++) {
                float x1 = a[i], x2 = b[i];
                a[i] = x1 * c[i] + x2 * sn[i];
                b[i] = x2 * c[i] - x1 * sn[i];
            }
    }
}

/* The Ulam pattern's keys of query position i, increasing: i - p for the primes p > w with
 * p <= i, then max(0, i-w)..i. Returns their count (at most i+1). */
static int ulam_keys(int *keys, int i, const mt_attn *o) {
    int n = 0, w = o->window;
    for (int t = o->nprimes - 1; t >= 0 && o->primes[t] > w; t--)
        if (o->primes[t] <= i) keys[n++] = i - o->primes[t];
    for (int j = i - w < 0 ? 0 : i - w; j <= i; j++) keys[n++] = j;
    return n;
}

/* One query row at position i under the Ulam pattern: only its keys' scores, weights and
 * values are touched. att: room for i+1 floats; keys: i+1 ints. */
MT_HOT static void ulam_row(float *y, float *lse, const float *q, const float *k, int ldk,
                            const float *v, int ldv, int i, int hs, float scale, float *att,
                            int *keys, const mt_attn *o) {
    int nk = ulam_keys(keys, i, o);
    for (int t = 0; t < nk; t++) att[t] = scale * dot_fixed(q, k + (size_t)keys[t] * ldk, hs);
    float l = causal_softmax_row(att, nk - 1, nk);
    if (lse) *lse = l;
    for (int d = 0; d < hs; d++) y[d] = 0.0f;
    for (int t = 0; t < nk; t++) fma_row(y, att[t], v + (size_t)keys[t] * ldv, hs);
}

/* The backward pass of ulam_row for query rows 0..T-1 of one head (strides ld for q, k, v and
 * their gradients, ldy for dy), adding into dq, dk, dv in row order. */
MT_HOT static void ulam_backward(float *dq, float *dk, float *dv, const float *dy, int ldy,
                                 const float *q, const float *k, const float *v, int ld,
                                 const float *lse, int T, int hs, float scale, float *a,
                                 float *d, int *keys, const mt_attn *o) {
    for (int i = 0; i < T; i++) {
        const float *qi = q + (size_t)i * ld, *dyi = dy + (size_t)i * ldy;
        int nk = ulam_keys(keys, i, o);
        float dot = 0.0f;
        for (int t = 0; t < nk; t++) {
            size_t j = (size_t)keys[t] * ld;
            a[t] = mt_expf(scale * dot_fixed(qi, k + j, hs) - lse[i]);
            d[t] = dot_fixed(dyi, v + j, hs);
            dot += a[t] * d[t];
        }
        for (int t = 0; t < nk; t++) {
            size_t j = (size_t)keys[t] * ld;
            float ds = a[t] * (d[t] - dot) * scale;
            fma_row(dq + (size_t)i * ld, ds, k + j, hs);
            fma_row(dk + j, ds, qi, hs);
            fma_row(dv + j, a[t], dyi, hs);
        }
    }
}

/* Decoding's row: the same weights from fixed-order products (rowdot.c), so the result
 * depends on this row's query and its keys/values alone. att has room for last+1 floats. */
MT_HOT static void attention_row_fixed(float *y, float *lse, const float *q, const float *k,
                                       int ldk, const float *v, int ldv, int last, int hs,
                                       float scale, float *att) {
    dots_fixed(att, q, k, ldk, last + 1, hs, scale);
    float l = causal_softmax_row(att, last, last + 1);
    if (lse) *lse = l;
    weighted_sum_fixed(y, att, v, ldv, last + 1, hs);
}

void attention_rows(float *y, int ldy, float *lse, float *q, int ldq, float *k,
                    int ldk, const float *v, int ldv, int p0, int n, int hs, int blas,
                    float *att, int ldatt, const mt_attn *o) {
    float scale = 1.0f / sqrtf((float)hs);
    if (o && o->rope) {
        rope_rows(q, ldq, p0, n, o, 0);
        rope_rows(k + (size_t)p0 * ldk, ldk, p0, n, o, 0);
    }
    if (o && o->ulam) {
        int *keys = (int *)(att + p0 + n);   /* att's scratch has room for 2 (p0+n) floats */
        for (int r = 0; r < n; r++)
            ulam_row(y + (size_t)r * ldy, lse ? lse + r : NULL, q + (size_t)r * ldq, k, ldk, v,
                     ldv, p0 + r, hs, scale, att, keys, o);
        return;
    }
    if (!blas) {
        for (int r = 0; r < n; r++)
            attention_row_fixed(y + (size_t)r * ldy, lse ? lse + r : NULL, q + (size_t)r * ldq,
                                k, ldk, v, ldv, p0 + r, hs, scale, att);
        return;
    }
    int end = p0 + n;
    for (int i0 = p0; i0 < end; i0 += ATT_BLOCK) {
        int i1 = end - i0 < ATT_BLOCK ? end : i0 + ATT_BLOCK;
        causal_weights(att, ldatt, lse, NULL, q, ldq, k, ldk, p0, i0, i1, hs, scale);
        /* y[i0:i1] (n,hs) = att[i0:i1, 0:i1] (n,i1) @ v[0:i1] (i1,hs) */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i1 - i0, hs, i1, 1.0f,
                          att + (size_t)(i0 - p0) * ldatt, ldatt, v, ldv, 0.0f,
                          y + (size_t)(i0 - p0) * ldy, ldy);
    }
}

/* qkv (B,T,3C) -> out (B,T,C) columns h*hs..(h+1)*hs of batch b; lse (B,NH,T). */
void attention_forward_item(float *out, float *lse, float *qkv, int b, int h,
                            int T, int C, int NH, float *att, const mt_attn *o) {
    int hs = C / NH;
    float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * hs;
    attention_rows(out + (size_t)b * T * C + (size_t)h * hs, C, lse + ((size_t)b * NH + h) * T,
                   q, 3 * C, q + C, 3 * C, q + 2 * C, 3 * C, 0, T, hs, 1, att, T, o);
}

static void dense_backward(float *dq, float *dk, float *dv, const float *dy, int C,
                           const float *q, const float *k, const float *v, int ld,
                           const float *lse, int T, int hs, float scale, float *att,
                           float *datt);

/* dout (B,T,C); adds into dqkv (B,T,3C) the q,k,v gradients of item (b,h). Blocks are
 * visited in order, so the sums into dk and dv have a fixed order. */
void attention_backward_item(float *dqkv, const float *dout, const float *qkv, const float *lse,
                             int b, int h, int T, int C, int NH, float *att, float *datt,
                             const mt_attn *o) {
    int hs = C / NH, ld = 3 * C;
    size_t base = (size_t)b * T * 3 * C + (size_t)h * hs;
    const float *q = qkv + base, *k = q + C, *v = q + 2 * C;   /* turned, if rotary */
    float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
    const float *dy = dout + (size_t)b * T * C + (size_t)h * hs;
    float scale = 1.0f / sqrtf((float)hs);
    if (o && o->ulam)
        ulam_backward(dq, dk, dv, dy, C, q, k, v, ld, lse + ((size_t)b * NH + h) * T, T, hs,
                      scale, att, datt, (int *)(datt + T), o);
    else
        dense_backward(dq, dk, dv, dy, C, q, k, v, ld, lse + ((size_t)b * NH + h) * T, T, hs,
                       scale, att, datt);
    if (o && o->rope) {   /* gradients of the turned q, k -> of the q, k before the turn */
        rope_rows(dq, ld, 0, T, o, 1);
        rope_rows(dk, ld, 0, T, o, 1);
    }
}

/* The dense pattern's backward pass over query rows 0..T-1 of one head; att, datt (T,T). */
static void dense_backward(float *dq, float *dk, float *dv, const float *dy, int C,
                           const float *q, const float *k, const float *v, int ld,
                           const float *lse, int T, int hs, float scale, float *att,
                           float *datt) {
    for (int i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        int i1 = T - i0 < ATT_BLOCK ? T : i0 + ATT_BLOCK, n = i1 - i0;
        float *a = att + (size_t)i0 * T, *d = datt + (size_t)i0 * T;
        causal_weights(att, T, NULL, lse, q, ld, k, ld, 0, i0, i1, hs, scale);
        /* dv[0:i1] (i1,hs) += a (n,i1)^T @ dy[i0:i1] (n,hs);  d (n,i1) = dy[i0:i1] @ v[0:i1]^T */
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, i1, hs, n, 1.0f, a, T,
                          dy + (size_t)i0 * C, C, 1.0f, dv, ld);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, i1, hs, 1.0f,
                          dy + (size_t)i0 * C, C, v, ld, 0.0f, d, T);
        /* Softmax backward per row: dS_ij = a_ij (d_ij - sum_k a_ik d_ik) * scale, j <= i. */
        for (int i = 0; i < n; i++) {
            const float *ar = a + (size_t)i * T;
            float *dr = d + (size_t)i * T;
            int last = i0 + i;
            float dot = 0.0f;
            for (int j = 0; j <= last; j++) dot += ar[j] * dr[j];
            for (int j = 0; j <= last; j++) dr[j] = ar[j] * (dr[j] - dot) * scale;
            for (int j = last + 1; j < i1; j++) dr[j] = 0.0f;
        }
        /* dq[i0:i1] (n,hs) += dS (n,i1) @ k[0:i1];  dk[0:i1] (i1,hs) += dS^T @ q[i0:i1] */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, i1, 1.0f, d, T, k,
                          ld, 1.0f, dq + (size_t)i0 * ld, ld);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, i1, hs, n, 1.0f, d, T,
                          q + (size_t)i0 * ld, ld, 1.0f, dk, ld);
    }
}

int attention_forward(float *out, float *lse, const float *qkv, int B, int T, int C, int NH) {
    float *att = malloc(sizeof(float) * (size_t)T * T);
    if (!att) return MT_ENOMEM;
    for (int i = 0; i < B * NH; i++)
        attention_forward_item(out, lse, (float *)qkv, i / NH, i % NH, T, C, NH, att, NULL);
    free(att);
    return MT_OK;
}

int attention_backward(float *dqkv, const float *dout, const float *qkv, const float *lse,
                       int B, int T, int C, int NH) {
    float *att = malloc(sizeof(float) * (size_t)T * T * 2);
    if (!att) return MT_ENOMEM;
    for (int i = 0; i < B * NH; i++)
        attention_backward_item(dqkv, dout, qkv, lse, i / NH, i % NH, T, C, NH, att,
                                att + (size_t)T * T, NULL);
    free(att);
    return MT_OK;
}
