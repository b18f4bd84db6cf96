/* Causal multi-head self-attention, one (batch, head) item at a time, so threads can split
 * the B*NH items and each writes only its own slice of the output. Scores and their
 * gradients live in a (T,T) scratch per thread; the backward pass recomputes the attention
 * weights from q, k and the cached per-row log-sum-exp instead of storing B*NH*T*T floats.
 * Products go through OpenBLAS on strided views of qkv (row stride 3C). */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

/* att (T,T) = softmax over j <= i of scale * q_i . k_j, zeros above the diagonal.
 * If lse is given it is written (forward); otherwise lse_in is used to recompute. */
MT_HOT static void causal_weights(float *att, float *lse_out, const float *lse_in, const float *q,
                           const float *k, int T, int hs, int ld, float scale) {
    /* att (T,T) = scale * q (T,hs) @ k (T,hs)^T; the upper triangle is computed and then
     * overwritten: one GEMM call beats T small ones at these sizes. */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, scale, q, ld, k, ld,
                0.0f, att, T);
    for (int i = 0; i < T; i++) {
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
        for (int j = i + 1; j < T; j++) row[j] = 0.0f;
    }
}

/* qkv (B,T,3C) -> out (B,T,C) columns h*hs..(h+1)*hs of batch b; lse (B,NH,T). */
void attention_forward_item(float *out, float *lse, const float *qkv, int b, int h,
                            int T, int C, int NH, float *att) {
    int hs = C / NH;
    const float *q = qkv + (size_t)b * T * 3 * C + (size_t)h * hs;
    const float *k = q + C, *v = q + 2 * C;
    float scale = 1.0f / sqrtf((float)hs);
    causal_weights(att, lse + ((size_t)b * NH + h) * T, NULL, q, k, T, hs, 3 * C, scale);
    /* out (T,hs) = att (T,T) @ v (T,hs) */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, att, T, v, 3 * C,
                0.0f, out + (size_t)b * T * C + (size_t)h * hs, C);
}

/* dout (B,T,C); adds into dqkv (B,T,3C) the q,k,v gradients of item (b,h). */
void attention_backward_item(float *dqkv, const float *dout, const float *qkv, const float *lse,
                             int b, int h, int T, int C, int NH, float *att, float *datt) {
    int hs = C / NH;
    size_t base = (size_t)b * T * 3 * C + (size_t)h * hs;
    const float *q = qkv + base, *k = q + C, *v = q + 2 * C;
    float *dq = dqkv + base, *dk = dq + C, *dv = dq + 2 * C;
    const float *dy = dout + (size_t)b * T * C + (size_t)h * hs;
    float scale = 1.0f / sqrtf((float)hs);
    causal_weights(att, NULL, lse + ((size_t)b * NH + h) * T, q, k, T, hs, 3 * C, scale);
    /* dv (T,hs) += att^T @ dy;  datt (T,T) = dy @ v^T */
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, att, T, dy, C,
                1.0f, dv, 3 * C);
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, T, T, hs, 1.0f, dy, C, v, 3 * C,
                0.0f, datt, T);
    /* Softmax backward per row: dS_ij = att_ij (datt_ij - sum_k att_ik datt_ik), times the
     * score scale; written over datt (zeros above the diagonal). */
    for (int i = 0; i < T; i++) {
        const float *a = att + (size_t)i * T;
        float *d = datt + (size_t)i * T;
        float dot = 0.0f;
        for (int j = 0; j <= i; j++) dot += a[j] * d[j];
        for (int j = 0; j <= i; j++) d[j] = a[j] * (d[j] - dot) * scale;
        for (int j = i + 1; j < T; j++) d[j] = 0.0f;
    }
    /* dq (T,hs) += dS @ k;  dk (T,hs) += dS^T @ q */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, T, hs, T, 1.0f, datt, T, k, 3 * C,
                1.0f, dq, 3 * C);
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, T, hs, T, 1.0f, datt, T, q, 3 * C,
                1.0f, dk, 3 * C);
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
