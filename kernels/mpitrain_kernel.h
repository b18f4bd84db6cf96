/* mpitrain kernel: everything Python may call. Plain declarations only (cffi parses this file;
 * lines starting with '#' are dropped for it). Shapes are given as (B,T,C) in comments.
 * C functions do no I/O and never print; errors are returned as negative ints. */
#ifndef MPITRAIN_KERNEL_H
#define MPITRAIN_KERNEL_H
#include <stddef.h>
#include <stdint.h>

/* Return codes of the model API (MT_EBUSY: another call on the same model is running). */
enum { MT_OK = 0, MT_EINVAL = -1, MT_ENOMEM = -2, MT_EBUSY = -3 };

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

/* ---- model.c ----------------------------------------------------------------------------- */
typedef struct mt_config {
    int vocab_size;
    int max_seq_len;
    int d_model;
    int n_layers;
    int n_heads;
    int d_ff;
} mt_config;
typedef struct mt_model mt_model;

/* The parameter table (GPT-2 state_dict order = arena order, no gaps). */
int mt_num_tensors(const mt_config *cfg);
size_t mt_num_params(const mt_config *cfg);
/* Tensor i: its name into name[name_cap], offset into the arena, ndim (1 or 2), shape[0..1]. */
int mt_tensor_info(const mt_config *cfg, int i, char *name, int name_cap, size_t *offset,
                   int *ndim, int *shape);
/* A model over caller-owned arenas of mt_num_params floats each (params, grads, Adam m, v);
 * the caller keeps them alive until mt_model_free. NULL on an invalid config or no memory. */
mt_model *mt_model_new(const mt_config *cfg, float *params, float *grads, float *m, float *v,
                       int threads);
void mt_model_free(mt_model *model);
int mt_model_set_threads(mt_model *model, int threads);
int mt_model_threads(const mt_model *model);
/* Parts the work of a step is split into (<= threads): 0 = automatic, min(threads, CPUs this
 * process may use). Results depend on the parts (float rounding), never on timing. */
int mt_model_set_parts(mt_model *model, int parts);
int mt_model_parts(const mt_model *model);
/* GPT-2 initialisation from a seed: normal(0, 0.02) weights (residual projections scaled by
 * 1/sqrt(2*n_layers)), zero biases, LayerNorm weights one. Deterministic C RNG. */
void mt_model_init(mt_model *model, uint64_t seed);
/* One forward+backward over inputs, targets (B,T) int32. loss_out gets the mean token loss;
 * grads get (or, with accumulate, get added) d(sum of token losses * grad_scale)/dparams. */
int mt_forward_backward(mt_model *model, const int32_t *inputs, const int32_t *targets,
                        int B, int T, float grad_scale, int accumulate, double *loss_out);
/* The same with the batch partitioned among the pool's threads (thread mode: kernel thread t is
 * worker t): thread t does the row-local work (embedding, LayerNorm, GEMM rows, GELU, attention
 * items) of windows [offsets[t], offsets[t+1]); offsets has nparts+1 entries, 0 first, B last,
 * non-decreasing; nparts <= threads. Weight gradients stay split by output rows, each summed
 * over all windows in a fixed order. */
int mt_forward_backward_parts(mt_model *model, const int32_t *inputs, const int32_t *targets,
                              int B, int T, float grad_scale, int accumulate,
                              const int32_t *offsets, int nparts, double *loss_out);
/* Per pool thread: training windows whose row-local work it did (those starting in its rows)
 * since creation, into out[0..threads); returns threads, or MT_EINVAL when n < threads. */
int mt_thread_windows(const mt_model *model, uint64_t *out, int n);
/* Forward only: mean token loss (evaluation). */
int mt_loss(mt_model *model, const int32_t *inputs, const int32_t *targets, int B, int T,
            double *loss_out);
/* Forward only: logits (B,T,V), or (B,V) of the last position when last_only. The training
 * forward (OpenBLAS products: a row's rounding may depend on B and T); decoding (mt_batch_step)
 * runs the same layers with fixed-order products and agrees with it to float32 rounding. */
int mt_forward_logits(mt_model *model, const int32_t *inputs, int B, int T, int last_only,
                      float *logits);
/* Training calls (mt_forward_backward) and windows (sum of their B) since creation. */
void mt_counters(const mt_model *model, uint64_t *train_calls, uint64_t *windows);
/* Where the time goes: seconds thread 0 spent per layer kind since creation (its own share of
 * the work; "sync" is its waiting at barriers). Kinds are numbered 0..mt_timer_count()-1. */
int mt_timer_count(void);
const char *mt_timer_name(int kind);
double mt_timer_seconds(const mt_model *model, int kind);

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

/* ---- decode.c ---- */
/* Batched decoding with key/value caches over a model's parameters (the model must outlive the
 * batch): `slots` sequence slots, each with its own cache, tokens and length, holding up to
 * `context` positions (0: max_seq_len). A step appends new ids to several slots at once -- a
 * prompt, or one generated id each -- computing only their new positions, and gives each
 * slot's next-token logits. A slot's logits are bitwise the same whichever other slots share
 * the step and however many they are (and however its ids were cut into steps): every row is
 * computed by fixed-order products. One call at a time per batch; the model's pool is held
 * for the step (MT_EBUSY while another call runs on it). */
typedef struct mt_batch mt_batch;
mt_batch *mt_batch_new(mt_model *model, int slots, int context);   /* NULL: bad args / memory */
void mt_batch_free(mt_batch *batch);
int mt_batch_slots(const mt_batch *batch);
int mt_batch_context_limit(const mt_batch *batch);
int mt_batch_reset(mt_batch *batch, int slot);                  /* empty the slot's context */
int mt_batch_length(const mt_batch *batch, int slot);          /* positions in its context */
int mt_batch_tokens(const mt_batch *batch, int slot, int32_t *out);  /* copies them (context
                                                                      * limit room) */
uint64_t mt_batch_slides(const mt_batch *batch, int slot);     /* times its context was cut */
uint64_t mt_batch_rows(const mt_batch *batch);                 /* positions computed (all) */
/* One step over nseq distinct slots: slot slots[k] gets counts[k] ids (1..context limit), taken
 * in order from ids (sum of counts). When a slot's context would pass the limit, only its
 * newest half (fewer if the new ids need the room) is kept and its cache rebuilt from position
 * 0. logits (nseq, V), may be NULL: row k the next-token logits after slot slots[k]'s last id.
 * MT_EINVAL (nothing changed) for a bad slot, count or id, or a slot given twice. */
int mt_batch_step(mt_batch *batch, int nseq, const int32_t *slots, const int32_t *counts,
                  const int32_t *ids, float *logits);

#endif
