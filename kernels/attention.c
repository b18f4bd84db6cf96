/* Causal multi-head self-attention, one (batch, head) item at a time, so threads can split
 * the B*NH items and each writes only its own slice of the output. Scores and their
 * gradients live in a (T,T) scratch per thread; the backward pass recomputes the attention
 * weights from q, k and the cached per-row log-sum-exp instead of storing B*NH*T*T floats.
 * Products go through OpenBLAS on strided views of qkv (row stride 3C). The scratch is
 * (T,T) row-major; block b of query rows uses rows [i0,i1) and columns [0,i1) of it. */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

/* Causality in blocks: rows [i0,i1) only see keys [0,i1), so every product below is done per
 * block of ATT_BLOCK query rows over the first i1 keys -- 5/8 of the full T x T work at
 * T = 128 -- instead of computing the masked upper triangle. Entries of att/datt right of the
 * diagonal inside a block are zeros; entries right of the block are never read. */
#define ATT_BLOCK 32

/* Rows [i0,i1) of att (T,T): softmax over j <= i of scale * q_i . k_j, zeros for i < j < i1.
 * If lse_out is given it is written (forward); otherwise lse_in recomputes the weights. */
MT_HOT static void causal_weights(float *att, float *lse_out, const float *lse_in, const float *q,
                                  const float *k, int i0, int i1, int T, int hs, int ld,
                                  float scale) {
    /* att[i0:i1, 0:i1] = scale * q[i0:i1] (n,hs) @ k[0:i1] (i1,hs)^T */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, i1 - i0, i1, hs, scale,
                      q + (size_t)i0 * ld, ld, k, ld, 0.0f, att + (size_t)i0 * T, T);
    for (int i = i0; i < i1; i++) {
        float *row = att + (size_t)i * T;
        if (lse_out) {
            float mx = row[0];
            for (int j = 1; j <= i; j++) mx = row[j] > mx ? row[j] : mx;
            float sum = 0.0f;
            for (int j = 0; j <= i; j++) { row[j] = mt_expf(row[j] - mx); sum += row[j]; }
            float inv = 1.0f / sum;
            for (int j = 0; j <= i; j++) row[j] *= inv;
            lse_out[i] = mx + logf(sum);
        } else {
            float l = lse_in[i];
            for (int j = 0; j <= i; j++) row[j] = mt_expf(row[j] - l);
        }
        for (int j = i + 1; j < i1; j++) row[j] = 0.0f;
    }
}

/* qkv (B,T,3C) -> out (B,T,C) columns h*hs..(h+1)*hs of batch b; lse (B,NH,T). */
void attention_forward_item(float *out, float *lse, const float *qkv, int b, int h,
                            int T, int C, int NH, float *att) {
    int hs = C / NH;
    const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * hs;
    const float *k = q + C, *v = q + 2 * C;
    float *y = out + (size_t)b * T * C + (size_t)h * hs;
    float scale = 1.0f / sqrtf((float)hs);
    for (int i0 = 0; i0 < T; i0 += ATT_BLOCK) {
        int i1 = T - i0 < ATT_BLOCK ? T : i0 + ATT_BLOCK;
        causal_weights(att, lse + ((size_t)b * NH + h) * T, NULL, q, k, i0, i1, T, hs, 3 * C,
                       scale);
        /* y[i0:i1] (n,hs) = att[i0:i1, 0:i1] (n,i1) @ v[0:i1] (i1,hs) */
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, i1 - i0, hs, i1, 1.0f,
                          att + (size_t)i0 * T, T, v, 3 * C, 0.0f, y + (size_t)i0 * C, C);
    }
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
        causal_weights(att, NULL, lse + ((size_t)b * NH + h) * T, q, k, i0, i1, T, hs, ld,
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
