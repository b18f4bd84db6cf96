/* The kernel's single layers, one call each: internal to the kernel (the training step calls
 * their row-range pieces, mt_internal.h) and exposed only to tests, through the second cffi module
 * mpitrain._kernel_testing (kernels/build_kernel.py; Python wrappers in mpitrain/ops.py). Not the
 * package's API: that is mpitrain_kernel.h. Plain declarations only (cffi parses this file; lines
 * starting with '#' are dropped for it). Shapes are given as (B,T,C) in comments. */
#ifndef MT_TESTING_H
#define MT_TESTING_H
#include <stddef.h>
#include <stdint.h>

/* ---- layers.c ---------------------------------------------------------------------------- */
/* out (N,C) = (inp - mean) * rstd * weight + bias over the last axis; mean, rstd (N) cached. */
void layernorm_forward(float *out, float *mean, float *rstd,
                       const float *inp, const float *weight, const float *bias,
                       int N, int C, float eps);
/* Adds into dinp (N,C), dweight (C), dbias (C). */
void layernorm_backward(float *dinp, float *dweight, float *dbias,
                        const float *dout, const float *inp, const float *weight,
                        const float *mean, const float *rstd, int N, int C);
/* out (B,T,C) = wte[inp[b,t]] + wpe[t]; inp (B,T) int32 ids already checked < V. */
void encoder_forward(float *out, const int32_t *inp, const float *wte, const float *wpe,
                     int B, int T, int C);
/* Adds dout (B,T,C) into dwte rows (V,C) of the ids and into dwpe (T,C). */
void encoder_backward(float *dwte, float *dwpe, const float *dout, const int32_t *inp,
                      int B, int T, int C);
/* out (N,OC) = inp (N,IC) @ w (OC,IC)^T + bias (OC, may be NULL) + add (N,OC, may be NULL). */
void matmul_forward(float *out, const float *inp, const float *w, const float *bias,
                    const float *add, int N, int IC, int OC);
/* Adds into dinp (N,IC), dw (OC,IC), dbias (OC, may be NULL) given dout (N,OC). */
void matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                     const float *inp, const float *w, int N, int IC, int OC);
/* GELU, tanh form, element-wise over n values; backward adds into dinp. */
void gelu_forward(float *out, const float *inp, size_t n);
void gelu_backward(float *dinp, const float *inp, const float *dout, size_t n);
/* The kernel's own exp and tanh over n values (tested for accuracy against libm). */
void vec_expf(float *out, const float *inp, size_t n);
void vec_tanhf(float *out, const float *inp, size_t n);

/* ---- attention.c ------------------------------------------------------------------------- */
/* Causal multi-head attention. qkv (B,T,3C) holds q,k,v stacked; out (B,T,C);
 * lse (B,NH,T) caches each row's log-sum-exp of the scaled scores for the backward pass.
 * Returns MT_OK or MT_ENOMEM (scratch). Backward adds into dqkv (B,T,3C). */
int attention_forward(float *out, float *lse, const float *qkv, int B, int T, int C, int NH);
int attention_backward(float *dqkv, const float *dout, const float *qkv, const float *lse,
                       int B, int T, int C, int NH);

/* ---- loss.c ------------------------------------------------------------------------------ */
/* Fused softmax + cross-entropy over R rows of logits (R,V): losses[r] = -log p[r, target[r]].
 * With want_grad, the logits are overwritten in place by (p - onehot) * grad_scale. */
void softmax_xent_rows(float *logits, float *losses, const int32_t *targets, int R, int V,
                       float grad_scale, int want_grad);

#endif
