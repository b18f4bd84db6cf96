/* mpitrain kernel: everything Python may call. Plain declarations only (cffi parses this file;
 * lines starting with '#' are dropped for it). Shapes are given as (B,T,C) in comments.
 * C functions do no I/O and never print; errors are returned as negative ints. */
#ifndef MPITRAIN_KERNEL_H
#define MPITRAIN_KERNEL_H
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

#endif
