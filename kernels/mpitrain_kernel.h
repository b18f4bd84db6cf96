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

/* ---- optimizer.c ---- */
/* AdamW as torch.optim.AdamW, global gradient norm and clipping as clip_grad_norm_, on flat
 * float32 arenas of n floats. Segments [seg_bounds[k], seg_bounds[k+1]) for k < nseg cover
 * [0, n) (seg_bounds has nseg+1 entries, 0 first, n last); seg_decay[k] != 0 gives segment k
 * weight decay (tensors of 2+ dimensions). step is the 1-based step for bias correction.
 * "_flat" functions run on nthreads threads they start themselves; "_part" functions do the
 * part-th of nparts contiguous ranges, for a caller's own thread pool. Results of both are
 * bitwise independent of the thread count. Return -1 on invalid arguments, else 0. */
int adamw_step_flat(float *param, const float *grad, float *m, float *v, int64_t n,
                    const int64_t *seg_bounds, const unsigned char *seg_decay, int nseg,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    int64_t step, int nthreads);
int adamw_part(float *param, const float *grad, float *m, float *v, int64_t n,
               const int64_t *seg_bounds, const unsigned char *seg_decay, int nseg,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               int64_t step, int part, int nparts);
/* sqrt of the sum of squares (double, fixed block order); -1.0 if out of memory. */
double grad_norm_flat(const float *grad, int64_t n, int nthreads);
/* Scales grad by max_norm / (norm + 1e-6) when that is below 1; returns the norm before. */
double clip_grad_norm_flat(float *grad, int64_t n, double max_norm, int nthreads);
void scale_flat(float *x, int64_t n, float factor, int nthreads);
/* Parts of the norm: partials has optim_norm_blocks(n) slots; each part fills its blocks'
 * sums of squares; after all parts, norm = sqrt(optim_sum_partials(partials, nblocks)). */
int64_t optim_norm_blocks(int64_t n);
void grad_sumsq_part(double *partials, const float *grad, int64_t n, int part, int nparts);
double optim_sum_partials(const double *partials, int64_t nblocks);
void scale_part(float *x, int64_t n, float factor, int part, int nparts);
/* max_norm / (norm + 1e-6): clip_grad_norm_ scales by it when it is below 1. */
double clip_coefficient(double norm, double max_norm);

#endif
