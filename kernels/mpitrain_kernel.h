/* mpitrain kernel: everything the package calls (mpitrain._kernel). Plain declarations only
 * (cffi parses this file; lines starting with '#' are dropped for it). Shapes are given as
 * (B,T,C) in comments. C functions do no I/O and never print.
 *
 * The convention: every call returns an int status from mt_status, and results go through
 * out-parameters (written only on MT_OK). The exceptions are the destructors (void, as free()).
 * Single layers for tests are not here: see mt_testing.h. */
#ifndef MPITRAIN_KERNEL_H
#define MPITRAIN_KERNEL_H
#include <stddef.h>
#include <stdint.h>

/* Status of a call. MT_EBUSY: another call on the same model is running (cffi releases the GIL,
 * so two Python threads could reach one model at once). mpitrain/_native.py maps each to a
 * Python exception. */
typedef enum { MT_OK = 0, MT_EINVAL = -1, MT_ENOMEM = -2, MT_EBUSY = -3 } mt_status;

/* ---- model.c ----------------------------------------------------------------------------- */
typedef struct mt_config {
    int vocab_size;
    int max_seq_len;
    int d_model;
    int n_layers;
    int n_heads;
    int d_ff;
    /* The options (docs/DESIGN.md, "The model"); 0 everywhere is the GPT-2 model. */
    int position;          /* 0: learned table transformer.wpe.weight; 1: rotary on q and k */
    int init;              /* 0: normal embeddings; 1: lattice embeddings (mt_model_init) */
    int attention;         /* 0: dense causal; 1: Ulam pattern (attention_window, primes) */
    int attention_window;  /* the Ulam pattern's w: distances 0..w, then prime distances */
} mt_config;
typedef struct mt_model mt_model;

/* The parameter table (GPT-2 state_dict order = arena order, no gaps); MT_EINVAL for an
 * invalid config. */
int mt_num_tensors(const mt_config *cfg, int *out);
int mt_num_params(const mt_config *cfg, size_t *out);
/* Tensor i: its name into name[name_cap], offset into the arena, ndim (1 or 2), shape[0..1]. */
int mt_tensor_info(const mt_config *cfg, int i, char *name, int name_cap, size_t *offset,
                   int *ndim, int *shape);
/* A model over two caller-owned arenas of mt_num_params floats each (parameters, gradients);
 * the caller keeps them alive until mt_model_free. The optimizer's state arenas are the
 * caller's too (mt_optim_step). *out gets the model. */
int mt_model_new(const mt_config *cfg, float *params, float *grads, int threads,
                 mt_model **out);
void mt_model_free(mt_model *model);
int mt_model_set_threads(mt_model *model, int threads);
int mt_model_threads(const mt_model *model, int *out);
/* Parts the work of a call is split into (<= threads): 0 = automatic, min(threads, CPUs this
 * process may use). Results depend on the parts (float rounding), never on timing; the
 * optimizer's do not even depend on the parts. */
int mt_model_set_parts(mt_model *model, int parts);
int mt_model_parts(const mt_model *model, int *out);
/* The output layer runs through chunks of rows (loss.c): mt_output_chunk_rows(budget, V) rows
 * (a multiple of 16, at least 16) for a budget of that many floats of logits; a call of N rows
 * uses min(that, N) rows, or more when an earlier call made the chunk larger. The budget is 64 MB
 * (16M floats) unless set (0 restores it); the rows change the order of dW_lm's sums, so
 * results depend on it. mt_model_chunk_rows: the rows of the current chunk, 0 before a call. */
int mt_output_chunk_rows(size_t budget_floats, int vocab_size, int *out);
int mt_model_set_chunk_budget(mt_model *model, size_t floats);
int mt_model_chunk_budget(const mt_model *model, size_t *out);
int mt_model_chunk_rows(const mt_model *model, int *out);
/* GPT-2 initialisation from a seed: normal(0, 0.02) weights (residual projections scaled by
 * 1/sqrt(2*n_layers)), zero biases, LayerNorm weights one. Deterministic C RNG. */
int mt_model_init(mt_model *model, uint64_t seed);
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
 * since creation, into out[0..threads); MT_EINVAL when n < threads. */
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
int mt_counters(const mt_model *model, uint64_t *train_calls, uint64_t *windows);
/* Where the time goes: seconds thread 0 spent per layer kind since creation (its own share of
 * the work; "sync" is its waiting at barriers). Kinds are numbered 0..count-1. */
int mt_timer_count(int *out);
int mt_timer_name(int kind, const char **out);
int mt_timer_seconds(const mt_model *model, int kind, double *out);

/* ---- optimizer.c ------------------------------------------------------------------------- */
/* Gradient clipping as torch.nn.utils.clip_grad_norm_ and AdamW as torch.optim.AdamW, on flat
 * float32 arrays of n floats laid out as the parameter arena (or a contiguous slice of it),
 * run on the model's thread pool (its work parts). Results are bitwise independent of the
 * threads and parts. */

/* Euclidean norm of grad[0..n): squares summed in double over fixed blocks, blocks in order. */
int mt_grad_norm(mt_model *model, const float *grad, int64_t n, double *out);

/* AdamW's scalars for one step; step is the 1-based optimizer step (bias correction). */
typedef struct mt_adamw {
    double lr, beta1, beta2, eps, weight_decay;
    int64_t step;
} mt_adamw;
/* Optimizer state tensors AdamW keeps, each an array like param: state[0] the first moment,
 * state[1] the second, in the order mpitrain/optim.py's declaration (ADAMW.state) names them. */
enum { MT_ADAMW_STATES = 2 };

/* Clip + update, one pass: when max_norm > 0, norm is finite and c = max_norm / (norm + 1e-6)
 * is below 1, grad is scaled in place by (float)c (as clip_grad_norm_); then one AdamW update
 * of param and state[0..nstate) from grad. norm is the global gradient norm, computed by the
 * caller (mt_grad_norm, or under MPI from every worker's share). Segments
 * [seg_bounds[k], seg_bounds[k+1]) for k < nseg cover [0, n) (nseg+1 bounds, 0 first, n last,
 * non-decreasing); seg_decay[k] != 0 gives segment k weight decay (tensors of 2+ dims). */
int mt_optim_step(mt_model *model, float *param, float *grad, float *const *state, int nstate,
                  int64_t n, const int64_t *seg_bounds, const unsigned char *seg_decay,
                  int nseg, const mt_adamw *hyper, double norm, double max_norm);

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
int mt_batch_new(mt_model *model, int slots, int context, mt_batch **out);
void mt_batch_free(mt_batch *batch);
int mt_batch_slots(const mt_batch *batch, int *out);
int mt_batch_context_limit(const mt_batch *batch, int *out);
int mt_batch_reset(mt_batch *batch, int slot);                   /* empty the slot's context */
int mt_batch_length(const mt_batch *batch, int slot, int *out);  /* positions in its context */
/* Copies the slot's ids (context-limit room in out); *count gets how many. */
int mt_batch_tokens(const mt_batch *batch, int slot, int32_t *out, int *count);
int mt_batch_slides(const mt_batch *batch, int slot, uint64_t *out);  /* times it was cut */
int mt_batch_rows(const mt_batch *batch, uint64_t *out);         /* positions computed (all) */
/* One step over nseq distinct slots: slot slots[k] gets counts[k] ids (1..context limit), taken
 * in order from ids (sum of counts). When a slot's context would pass the limit, only its
 * newest half (fewer if the new ids need the room) is kept and its cache rebuilt from position
 * 0. logits (nseq, V), may be NULL: row k the next-token logits after slot slots[k]'s last id.
 * MT_EINVAL (nothing changed) for a bad slot, count or id, or a slot given twice. */
int mt_batch_step(mt_batch *batch, int nseq, const int32_t *slots, const int32_t *counts,
                  const int32_t *ids, float *logits);

#endif
