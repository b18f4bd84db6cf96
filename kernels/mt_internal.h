/* Private declarations shared by the kernel's C files (not parsed by cffi, not Python API).
 * Shapes in comments: N = B*T rows, C = d_model, F = d_ff, V = vocab_size, NH = heads. */
#ifndef MT_INTERNAL_H
#define MT_INTERNAL_H
#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <cblas.h>
#include "mpitrain_kernel.h"
#include "mt_testing.h"

/* Hot element-wise loops are compiled for AVX-512 and AVX2 as well as the baseline and the
 * best one is picked at load time (GCC function multiversioning); results on one machine are
 * always the same. Off under sanitizers (an instrumented ifunc resolver runs before the
 * ThreadSanitizer runtime is up and crashes) and with -DMT_NO_TARGET_CLONES. */
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define MT_NO_TARGET_CLONES 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MT_NO_TARGET_CLONES)
#define MT_HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MT_HOT
#endif

/* ---- threads.c: persistent pool + sleeping barrier ---------------------------------------- */
typedef struct mt_pool mt_pool;
/* A task runs on every pool thread at once (SPMD); tid 0 is the calling thread. */
typedef void (*mt_task)(void *ctx, int tid, int nthreads);
mt_pool *pool_create(int nthreads);
void pool_destroy(mt_pool *p);
int pool_size(const mt_pool *p);
/* CPUs this process may run on (its affinity mask). */
int mt_cpu_count(void);
/* Runs fn(ctx, tid, n) on all n threads; returns when every thread has finished. */
void pool_run(mt_pool *p, mt_task fn, void *ctx);
/* Runs fn(ctx, tid, active) on threads 0..active-1 only; the others stay asleep (and are not
 * counted by the task's barriers). */
void pool_run_parts(mt_pool *p, mt_task fn, void *ctx, int active);
/* All threads of the running task must call it; nobody leaves before everybody arrived. */
void pool_barrier(mt_pool *p);

/* Thread tid's share [lo,hi) of `total` items in n near-equal contiguous parts whose inner
 * boundaries are multiples of `align` (alignment keeps GEMM blocks and cache lines whole). */
static inline void mt_split(int total, int tid, int n, int align, int *lo, int *hi) {
    long units = (total + align - 1) / align;
    long a = units * tid / n * align, b = units * (tid + 1) / n * align;
    *lo = (int)(a < total ? a : total);
    *hi = (int)(b < total ? b : total);
}

/* ---- fast vectorisable exp / tanh (accuracy tested in tests/test_ops.py) ------------------- */
/* Build switch: MPITRAIN_CFLAGS=-DMT_LIBM_MATH uses libm's expf and tanhf instead (measured
 * against these in docs/BENCHMARKS.md, "exp and tanh"; the default is the winner). */
#ifdef MT_LIBM_MATH
#include <math.h>
static inline float mt_expf(float x) { return expf(x); }
static inline float mt_tanhf(float x) { return tanhf(x); }
#else
/* exp(x) = 2^n * e^r with n = round(x/ln2), |r| <= ln2/2, r's polynomial from Cephes expf.
 * Written branch-free (clamps, a magic-number round, bit casts) so GCC vectorises loops
 * calling it. Relative error ~2 ulp on [-87.3, 88]. Below -87.3 (where exp leaves the normal
 * float range) it returns 0, so softmax tails never produce denormals (slow on x86); above 88
 * it returns exp(88). NaN in gives NaN out. */
static inline float mt_expf(float x) {
    float x0 = x;
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.0f ? 88.0f : x;
    float t = x * 1.44269504088896341f + 12582912.0f;  /* 1.5*2^23: rounds to an integer */
    float n = t - 12582912.0f;
    int32_t ti;
    memcpy(&ti, &t, 4);
    int32_t ni = ti - 0x4B400000;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t e = (ni + 127) << 23;
    float s;
    memcpy(&s, &e, 4);
    return x0 < -87.3f ? 0.0f : p * s;
}

/* tanh(x) = (e^{2x} - 1) / (e^{2x} + 1); |x| clamped to 9 where tanh is 1 in float32.
 * Absolute error ~2e-7 (relative error grows near 0, where callers add it to 1). */
static inline float mt_tanhf(float x) {
    x = x < -9.0f ? -9.0f : x;
    x = x > 9.0f ? 9.0f : x;
    float e = mt_expf(2.0f * x);
    return (e - 1.0f) / (e + 1.0f);
}
#endif

/* ---- layers.c: row-range and column-range pieces used by the threaded step ---------------- */
/* out rows [r0,r1) of (N,OC) = inp (N,IC) @ w(OC,IC)^T + bias (+ add (N,OC) if not NULL). */
void matmul_forward_rows(float *out, const float *inp, const float *w, const float *bias,
                         const float *add, int r0, int r1, int IC, int OC);
/* dinp rows [r0,r1) of (N,IC) = dout (N,OC) @ w (OC,IC)   (written, not added). */
void matmul_backward_dinp_rows(float *dinp, const float *dout, const float *w,
                               int r0, int r1, int IC, int OC);
/* dw rows [o0,o1) of (OC,IC) += dout(N,OC)^T @ inp(N,IC); dbias[o0:o1] += column sums of dout.
 * Each output row sums over all N rows in a fixed order (thread count does not matter). */
void matmul_backward_dweight_rows(float *dw, float *dbias, const float *dout, const float *inp,
                                  int N, int IC, int OC, int o0, int o1);
/* LayerNorm dx only: adds into dinp rows (N,C); no parameter gradients. */
void layernorm_backward_dx(float *dinp, const float *dout, const float *inp, const float *weight,
                           const float *mean, const float *rstd, int N, int C);
/* LayerNorm parameter gradients for columns [c0,c1), summed over all N rows in order. */
void layernorm_backward_dparams(float *dweight, float *dbias, const float *dout,
                                const float *inp, const float *mean, const float *rstd,
                                int N, int C, int c0, int c1);
/* out (N,C) = (inp - mean) * rstd * weight + bias from cached statistics (recomputation). */
void layernorm_apply(float *out, const float *inp, const float *weight, const float *bias,
                     const float *mean, const float *rstd, int N, int C);

/* ---- rowdot.c: fixed-order products for decoding (see rowdot.c for the arithmetic) -------- */
/* A row's result depends on that row's data alone: not on the number of rows, their tiling,
 * the column split among threads or the vector width of the code path. */
float dot_fixed(const float *a, const float *b, int n);
/* y (n) = fma(a, x, y) element-wise. */
void fma_row(float *y, float a, const float *x, int n);
/* out[j] = scale * dot_fixed(q, k + j*ldk, n) for j < nk (several keys at a time, the same
 * floats). */
void dots_fixed(float *out, const float *q, const float *k, int ldk, int nk, int n,
                float scale);
/* y (n) = 0, then fma_row(y, a[j], v + j*ldv, n) for j = 0..nk-1 in order (y kept in
 * registers across the keys, the same floats). */
void weighted_sum_fixed(float *y, const float *a, const float *v, int ldv, int nk, int n);
/* out[r, o] = inp[r] (IC) . w[o] (IC) + (add[r,o] + bias[o]) for rows r < n and output
 * columns o in [o0,o1); out, add (n,OC), w (OC,IC); bias, add may be NULL. */
void linear_fixed(float *out, const float *inp, const float *w, const float *bias,
                  const float *add, int n, int IC, int OC, int o0, int o1);
/* The same through the portable code path (fmaf per lane): bitwise equal (tested). */
void linear_fixed_portable(float *out, const float *inp, const float *w, const float *bias,
                           const float *add, int n, int IC, int OC, int o0, int o1);

/* ---- attention.c: one (batch, head) item; att and datt are (T,T) scratch ------------------ */
/* A model's attention options, prepared once (model.c); NULL where a caller has none means
 * dense attention with no rotation (the single-layer test API). */
typedef struct {
    const float *rope;   /* rotary: (max_seq_len, half) cosines then as many sines; or NULL */
    int half;            /* head_dim / 2 */
    int ulam, window;    /* the Ulam pattern and its w */
    const int *primes;   /* the primes <= max_seq_len, increasing */
    int nprimes;
} mt_attn;
/* Rotary position embedding of n rows (row stride ld) of one head at positions p0..p0+n-1:
 * pairs (x[i], x[i+half]) turn by angle pos * 10000^(-i/half); inverse: the opposite turn
 * (the backward pass's map of gradients). */
void rope_rows(float *x, int ld, int p0, int n, const mt_attn *o, int inverse);
/* Causal attention of one head for the query rows at positions p0..p0+n-1 of one sequence:
 * y[r] = sum over keys j <= p0+r of softmax_j(q_r . k_j / sqrt(hs)) v_j. q, y: the n query
 * rows (row strides ldq, ldy); k, v: keys and values of positions 0..p0+n-1 (row strides ldk,
 * ldv), the window's own qkv rows in training, a key/value cache in decoding. lse (n, may be
 * NULL) gets each row's log-sum-exp of the scaled scores. blas != 0: products through
 * OpenBLAS in blocks of query rows (training, evaluation; att is scratch of row stride
 * ldatt >= p0+n with n rows); blas == 0: fixed-order row products (decoding; a row's result
 * does not depend on the other rows; att needs p0+n floats). */
/* With options o: rotary turns the n query rows and the keys at positions p0..p0+n-1 in place
 * first (q and those k rows are overwritten: training keeps the turned q, k for its backward
 * pass, decoding caches turned keys at their absolute positions); the Ulam pattern weighs
 * only its keys, each row through fixed-order products whatever `blas` says. */
void attention_rows(float *y, int ldy, float *lse, float *q, int ldq, float *k,
                    int ldk, const float *v, int ldv, int p0, int n, int hs, int blas,
                    float *att, int ldatt, const mt_attn *o);
void attention_forward_item(float *out, float *lse, float *qkv, int b, int h,
                            int T, int C, int NH, float *att, const mt_attn *o);
void attention_backward_item(float *dqkv, const float *dout, const float *qkv, const float *lse,
                             int b, int h, int T, int C, int NH, float *att, float *datt,
                             const mt_attn *o);

/* out (n) = gelu(x); x is overwritten by gelu'(x). */
void gelu_forward_slope(float *out, float *x_to_slope, size_t n);
/* a (n) *= b (n). */
void vec_mul_inplace(float *a, const float *b, size_t n);

/* ---- loss.c: the chunked output layer, called by every pool thread (see loss.c) ---------- */
/* lnf (N,C), wlm (V,C), chunk R*(V+C+1+C*nt) floats of scratch, losses (N). With dlnf:
 * dlnf (N,C) is written and dwlm (V,C) accumulated; without (NULL), forward only. */
void output_layer_chunked(mt_model *m, int tid, int nt, const float *lnf, const float *wlm,
                          float *dwlm, float *dlnf, const int32_t *targets, float *losses,
                          float *chunk, int R, int N, int C, int V, float grad_scale);

/* ---- model.c / step.c: the model object ------------------------------------------------- */
/* Views of one transformer block's tensors inside an arena (parameters or gradients). */
typedef struct {
    float *ln1w, *ln1b, *qkvw, *qkvb, *projw, *projb, *ln2w, *ln2b, *fcw, *fcb, *fcprojw,
        *fcprojb;
} mt_block;

typedef struct {
    float *wte, *wpe, *lnfw, *lnfb, *lm;
    mt_block *h; /* n_layers */
} mt_views;

/* Saved activations of one block for N rows (kept for the backward pass). */
typedef struct {
    float *x;                   /* (N,C) block input (residual stream) */
    float *ln1_mean, *ln1_rstd; /* (N) */
    float *qkv;                 /* (N,3C) */
    float *atty;                /* (N,C) attention output before c_proj */
    float *lse;                 /* (B,NH,T) per-row log-sum-exp of the attention scores */
    float *res2;                /* (N,C) residual after attention */
    float *ln2_mean, *ln2_rstd; /* (N) */
    float *fch;                 /* (N,F) c_fc output before GELU */
} mt_block_acts;

/* One activation set: L slots for training, 1 slot reused by every block for forward-only. */
typedef struct {
    int cap_rows, nslots, training;
    float *mem;
    mt_block_acts *slot;
    float *xL, *lnf, *lnf_mean, *lnf_rstd, *losses; /* (N,C) (N,C) (N) (N) (N) */
    float *lnbuf, *G;                                /* scratch (N,C), (N,F) */
    float *dresid, *dln, *datty, *dqkv;              /* training scratch (N,C)x3, (N,3C) */
} mt_acts;

/* Time per layer kind, measured on thread 0 (its own work; waits at barriers are "sync"). */
enum { TK_EMBEDDING, TK_LAYERNORM, TK_MATMUL, TK_ATTENTION, TK_GELU, TK_OUTPUT, TK_SYNC,
       TK_OTHER, TK_COUNT };

struct mt_model {
    mt_config cfg;
    size_t nparams;
    float *params, *grads;         /* caller-owned arenas */
    mt_views P, G;
    mt_pool *pool;
    int parts_req;                 /* requested work parts, 0 = automatic */
    int parts;                     /* parts the work is split into: <= pool threads */
    float *att_scratch;            /* per thread mt_att_floats(maxT) */
    mt_attn attn;                  /* the attention options, prepared (model.c) */
    float *rope;                   /* rotary table of attn.rope (owned), or NULL */
    int *primes;                   /* attn.primes (owned) */
    mt_acts train, infer;
    float *chunk;                  /* output-layer chunk: R*(V+C+1+C*threads) floats (loss.c) */
    int chunk_rows, chunk_threads;
    size_t chunk_budget;           /* floats of logits a chunk may hold (mt_output_chunk_rows) */
    uint64_t train_calls, windows;
    /* Optional partition of a training call (mt_forward_backward_parts): thread t does the
     * row-local work of windows [part_off[t], part_off[t+1]); NULL = even row split. Set only
     * while the call holds the model. */
    const int32_t *part_off;
    uint64_t *thread_windows;      /* (pool threads) windows whose row-local work each did */
    atomic_int busy;               /* a call is running on the pool (see mt_model_enter) */
    double timers[TK_COUNT]; /* seconds per kind, thread 0 only */
    double t_last;
    int t_kind;
};

static inline double mt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Attention scratch per thread: att and datt (maxT,maxT) each, and room for the Ulam
 * pattern's key lists past either's first maxT floats even at maxT = 1. */
static inline size_t mt_att_floats(int maxT) {
    return 2 * (size_t)maxT * (size_t)maxT + 2 * (size_t)maxT;
}

/* Every API call that runs the pool holds the model for its duration: a second caller (another
 * Python thread: cffi releases the GIL) gets MT_EBUSY instead of corrupting the pool. */
int mt_model_enter(mt_model *m);   /* MT_OK or MT_EBUSY */
void mt_model_leave(mt_model *m);

/* Thread 0 closes the running interval and starts one of `kind`; other threads do nothing. */
static inline void mt_tick(mt_model *m, int tid, int kind) {
    if (tid) return;
    double t = mt_now();
    m->timers[m->t_kind] += t - m->t_last;
    m->t_last = t;
    m->t_kind = kind;
}

/* A pool barrier whose wait is booked as sync time. */
static inline void mt_sync(mt_model *m, int tid) {
    int kind = tid ? 0 : m->t_kind;
    mt_tick(m, tid, TK_SYNC);
    pool_barrier(m->pool);
    mt_tick(m, tid, kind);
}

/* Thread tid's rows [r0,r1) of the N = B*T rows of a step and its attention items [i0,i1)
 * of B*NH: its windows' under a partition (m->part_off), else near-equal parts. */
static inline void mt_split_rows(const mt_model *m, int B, int T, int NH, int tid, int nt,
                                 int *r0, int *r1, int *i0, int *i1) {
    if (m->part_off) {
        *r0 = m->part_off[tid] * T; *r1 = m->part_off[tid + 1] * T;
        *i0 = m->part_off[tid] * NH; *i1 = m->part_off[tid + 1] * NH;
        return;
    }
    mt_split(B * T, tid, nt, 8, r0, r1);
    mt_split(B * NH, tid, nt, 1, i0, i1);
}

/* ---- forward.c: the forward arithmetic shared by training, evaluation and decoding ------- */
/* How one pool thread takes part in a forward call over n rows (see forward.c). */
typedef struct mt_fwd mt_fwd;
struct mt_fwd {
    mt_model *m;
    int tid, nt;    /* this thread, threads running the call */
    int n;          /* rows of the call */
    int r0, r1;     /* this thread's rows (split by rows) */
    int cols;       /* 0: split by rows, linear layers through OpenBLAS (training, evaluation);
                     * 1: all rows, output columns split, fixed-order products (decoding) */
    int timed;      /* book thread 0's time per layer kind (mt_tick) */
    /* The attention of layer l: fills io->atty from io->qkv for heads [h0,h1) (split by
     * columns: this thread's heads; by rows: all heads, the callback takes its own items). */
    void (*attend)(const mt_fwd *f, int l, int h0, int h1);
    void *ctx;      /* the caller's, for attend */
};

/* Where one block reads and writes its n rows. */
typedef struct {
    float *x, *xn;                        /* (n,C) block input and output (may be the same) */
    float *ln;                            /* (n,C) LayerNorm output (scratch) */
    float *mean1, *rstd1, *mean2, *rstd2; /* (n) LayerNorm statistics */
    float *qkv, *atty, *res2;             /* (n,3C), (n,C), (n,C) */
    float *fch, *gelu;                    /* (n,F) c_fc output and its GELU (may be the same) */
} mt_block_io;

/* o (C) = wte[tok] + wpe[pos]. */
void embed_row(float *o, int tok, int pos, const mt_views *P, int C);
/* LayerNorm of this thread's rows (split by rows) or of all rows (split by columns). */
void layernorm_rows(const mt_fwd *f, float *out, float *mean, float *rstd, const float *inp,
                    const float *weight, const float *bias);
/* Block l of the model, io->x -> io->xn, run by every thread of the call. */
void block_forward(const mt_fwd *f, int l, const mt_block_io *io);

typedef struct {
    mt_model *m;
    mt_acts *a;
    const int32_t *inp, *tgt; /* (B,T) */
    int B, T;
    int mode;                 /* STEP_TRAIN, STEP_LOSS or STEP_LOGITS */
    float grad_scale;
    int accumulate, last_only;
    float *logits;
} mt_step;
enum { STEP_TRAIN = 0, STEP_LOSS = 1, STEP_LOGITS = 2 };
/* step.c: the pool task that runs one forward (+ backward) on a batch. */
void step_task(void *ctx, int tid, int nt);

#endif
