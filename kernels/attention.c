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

/* Decoding's row: the same weights from fixed-order products (rowdot.c), so the result
 * depends on this row's query and its keys/values alone. att has room for last+1 floats. */
MT_HOT static void attention_row_fixed(float *y, float *lse, const float *q, const float *k,
                                       int ldk, const float *v, int ldv, int last, int hs,
                                       float scale, float *att) {
    for (int j = 0; j <= last; j++) att[j] = scale * dot_fixed(q, k + (size_t)j * ldk, hs);
    float l = causal_softmax_row(att, last, last + 1);
    if (lse) *lse = l;
    for (int d = 0; d < hs; d++) y[d] = 0.0f;
    for (int j = 0; j <= last; j++) fma_row(y, att[j], v + (size_t)j * ldv, hs);
}

void attention_rows(float *y, int ldy, float *lse, const float *q, int ldq, const float *k,
                    int ldk, const float *v, int ldv, int p0, int n, int hs, int blas,
                    float *att, int ldatt) {
    float scale = 1.0f / sqrtf((float)hs);
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
void attention_forward_item(float *out, float *lse, const float *qkv, int b, int h,
                            int T, int C, int NH, float *att) {
    int hs = C / NH;
    const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * hs;
    attention_rows(out + (size_t)b * T * C + (size_t)h * hs, C, lse + ((size_t)b * NH + h) * T,
                   q, 3 * C, q + C, 3 * C, q + 2 * C, 3 * C, 0, T, hs, 1, att, T);
}

/* dout (B,T,C); adds into dqkv (B,T,3C) the q,k,v gradients of item (b,h). Blocks are
 * visited in order, so the sums into dk and dv have a fixed order. */
void attention_backward_item(float *dqkv, const float *dout, const float *qkv, const float *lse,
                             int b, int h, int T, int C, int NH, float *att, float *datt) {
    int hs = C / NH, ld = 3 * C;
    size_t base = (size_t)b * T * 3 * C + (size_t)h * hs;
    const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
    float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
    const float *dy = dout + (size_t)b * T * C + (size_t)h * hs;
    float scale = 1.0f / sqrtf((float)hs);
    for (int i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        int i1 = T - i0 < ATT_BLOCK ? T : i0 + ATT_BLOCK, n = i1 - i0;
        float *a = att + (size_t)i0 * T, *d = datt + (size_t)i0 * T;
        causal_weights(att, T, NULL, lse + ((size_t)b * NH + h) * T, q, ld, k, ld, 0, i0, i1, hs,
                       scale);
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
        attention_forward_item(out, lse, qkv, i / NH, i % NH, T, C, NH, att);
    free(att);
    return MT_OK;
}

int attention_backward(float *dqkv, const float *dout, const float *qkv, const float *lse,
                       int B, int T, int C, int NH) {
    float *att = malloc(sizeof(float) * (size_t)T * T * 2);
    if (!att) return MT_ENOMEM;
    for (int i = 0; i < B * NH; i++)
        attention_backward_item(dqkv, dout, qkv, lse, i / NH, i % NH, T, C, NH, att,
                                att + (size_t)T * T);
    free(att);
    return MT_OK;
}
