/* Element-wise and per-row layers in the llm.c style: embedding, LayerNorm, linear (matmul
 * through OpenBLAS with the [out,in] weight layout), GELU. Backward functions ADD into their
 * d-outputs. Row-range / column-range variants are what the threaded step calls; the whole-
 * tensor versions are the public, separately tested definitions. */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

/* inp, out are (N,C); mean, rstd are (N). */
MT_HOT void layernorm_forward(float *out, float *mean, float *rstd,
                       const float *inp, const float *weight, const float *bias,
                       int N, int C, float eps) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float m = 0.0f;
        for (int i = 0; i < C; i++) m += x[i];
        m /= (float)C;
        float v = 0.0f;
        for (int i = 0; i < C; i++) { float d = x[i] - m; v += d * d; }
        v /= (float)C;
        float s = 1.0f / sqrtf(v + eps);
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = s;
    }
}

/* dout, inp, dinp are (N,C); backward adds into dinp, dweight, dbias: the threaded step's two
 * pieces below, over every row and column. */
void layernorm_backward(float *dinp, float *dweight, float *dbias,
                        const float *dout, const float *inp, const float *weight,
                        const float *mean, const float *rstd, int N, int C) {
    layernorm_backward_dx(dinp, dout, inp, weight, mean, rstd, N, C);
    layernorm_backward_dparams(dweight, dbias, dout, inp, mean, rstd, N, C, 0, C);
}

/* ---- LayerNorm pieces for the threaded backward ------------------------------------------ */

/* dout, inp, dinp are (N,C): dinp += d(LN)/d(inp) . dout. */
MT_HOT void layernorm_backward_dx(float *dinp, const float *dout, const float *inp, const float *weight,
                           const float *mean, const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        const float *g = dout + (size_t)n * C;
        float *dx = dinp + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        float a = 0.0f, b = 0.0f;
        for (int i = 0; i < C; i++) {
            float dnorm = weight[i] * g[i];
            a += dnorm;
            b += dnorm * (x[i] - m) * s;
        }
        a /= (float)C;
        b /= (float)C;
        for (int i = 0; i < C; i++) {
            float xhat = (x[i] - m) * s;
            dx[i] += (weight[i] * g[i] - a - xhat * b) * s;
        }
    }
}

/* dweight[c] += sum_n xhat[n,c]*dout[n,c], dbias[c] += sum_n dout[n,c], for c in [c0,c1);
 * rows summed in order 0..N-1 whatever the thread split. */
MT_HOT void layernorm_backward_dparams(float *dweight, float *dbias, const float *dout,
                                const float *inp, const float *mean, const float *rstd,
                                int N, int C, int c0, int c1) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        const float *g = dout + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        for (int i = c0; i < c1; i++) {
            dbias[i] += g[i];
            dweight[i] += (x[i] - m) * s * g[i];
        }
    }
}

/* out (N,C) = LayerNorm(inp) from cached mean, rstd (N). */
MT_HOT void layernorm_apply(float *out, const float *inp, const float *weight, const float *bias,
                     const float *mean, const float *rstd, int N, int C) {
    for (int n = 0; n < N; n++) {
        const float *x = inp + (size_t)n * C;
        float *o = out + (size_t)n * C;
        float m = mean[n], s = rstd[n];
        for (int i = 0; i < C; i++) o[i] = (x[i] - m) * s * weight[i] + bias[i];
    }
}

/* ---- embedding ---------------------------------------------------------------------------- */

/* out (B,T,C), inp (B,T), wte (V,C), wpe (maxT,C). */
void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                     int B, int T, int C) {
    for (int n = 0; n < B * T; n++) {
        const float *e = wte + (size_t)inp[n] * C, *p = wpe + (size_t)(n % T) * C;
        float *o = out + (size_t)n * C;
        for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
    }
}

/* dout (B,T,C); adds into dwte (V,C) and dwpe (T,C), positions in order. */
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                      int B, int T, int C) {
    for (int n = 0; n < B * T; n++) {
        const float *g = dout + (size_t)n * C;
        float *de = dwte + (size_t)inp[n] * C, *dp = dwpe + (size_t)(n % T) * C;
        for (int i = 0; i < C; i++) { de[i] += g[i]; dp[i] += g[i]; }
    }
}

/* ---- linear layers through OpenBLAS --------------------------------------------------------- */

void matmul_forward_rows(float *out, const float *inp, const float *w, const float *bias,
                         const float *add, int r0, int r1, int IC, int OC) {
    if (r1 <= r0) return;
    /* Pre-fill with bias (+ residual) so the GEMM accumulates onto it: one pass, fused add. */
    float beta = 0.0f;
    if (bias || add) {
        beta = 1.0f;
        for (int n = r0; n < r1; n++) {
            float *o = out + (size_t)n * OC;
            const float *a = add ? add + (size_t)n * OC : NULL;
            if (bias && a) for (int i = 0; i < OC; i++) o[i] = a[i] + bias[i];
            else if (bias) for (int i = 0; i < OC; i++) o[i] = bias[i];
            else for (int i = 0; i < OC; i++) o[i] = a[i];
        }
    }
    /* out[r0:r1] (M,OC) = inp[r0:r1] (M,IC) @ w^T, w stored (OC,IC). */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, r1 - r0, OC, IC, 1.0f,
                inp + (size_t)r0 * IC, IC, w, IC, beta, out + (size_t)r0 * OC, OC);
}

void matmul_backward_dinp_rows(float *dinp, const float *dout, const float *w,
                               int r0, int r1, int IC, int OC) {
    if (r1 <= r0) return;
    /* dinp[r0:r1] (M,IC) = dout[r0:r1] (M,OC) @ w (OC,IC). */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, IC, OC, 1.0f,
                dout + (size_t)r0 * OC, OC, w, IC, 0.0f, dinp + (size_t)r0 * IC, IC);
}

void matmul_backward_dweight_rows(float *dw, float *dbias, const float *dout, const float *inp,
                                  int N, int IC, int OC, int o0, int o1) {
    if (o1 <= o0 || N <= 0) return;
    /* dw[o0:o1] (M,IC) += dout[:, o0:o1]^T (M,N) @ inp (N,IC). */
    scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o1 - o0, IC, N, 1.0f,
                dout + o0, OC, inp, IC, 1.0f, dw + (size_t)o0 * IC, IC);
    if (dbias)
        for (int n = 0; n < N; n++) {
            const float *g = dout + (size_t)n * OC;
            for (int o = o0; o < o1; o++) dbias[o] += g[o];
        }
}

void matmul_forward(float *out, const float *inp, const float *w, const float *bias,
                    const float *add, int N, int IC, int OC) {
    matmul_forward_rows(out, inp, w, bias, add, 0, N, IC, OC);
}

void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                     const float *inp, const float *w, int N, int IC, int OC) {
    if (N <= 0) return;
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, IC, OC, 1.0f,
                dout, OC, w, IC, 1.0f, dinp, IC);
    matmul_backward_dweight_rows(dw, dbias, dout, inp, N, IC, OC, 0, OC);
}

/* ---- GELU (tanh form) and the vectorised exp/tanh ------------------------------------------ */

#define GELU_K 0.7978845608028654f /* sqrt(2/pi) */

MT_HOT void gelu_forward(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float t = mt_tanhf(GELU_K * (x + 0.044715f * x * x * x));
        out[i] = 0.5f * x * (1.0f + t);
    }
}

/* d gelu/dx = 0.5(1+tanh u) + 0.5 x (1 - tanh^2 u) du/dx, u = k(x + 0.044715 x^3). */
MT_HOT void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = inp[i];
        float t = mt_tanhf(GELU_K * (x + 0.044715f * x * x * x));
        float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += dout[i] * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
    }
}

/* out = gelu(x) and, in place of x, gelu'(x): one tanh per element for both (the backward
 * pass needs the output for dW and the slope for the input gradient, and x no more). */
MT_HOT void gelu_forward_slope(float *out, float *x_to_slope, size_t n) {
    for (size_t i = 0; i < n; i++) {
        float x = x_to_slope[i];
        float t = mt_tanhf(GELU_K * (x + 0.044715f * x * x * x));
        float du = GELU_K * (1.0f + 3.0f * 0.044715f * x * x);
        out[i] = 0.5f * x * (1.0f + t);
        x_to_slope[i] = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
    }
}

MT_HOT void vec_mul_inplace(float *a, const float *b, size_t n) {
    for (size_t i = 0; i < n; i++) a[i] *= b[i];
}

MT_HOT void vec_expf(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = mt_expf(inp[i]);
}

MT_HOT void vec_tanhf(float *out, const float *inp, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = mt_tanhf(inp[i]);
}
