/* The model's forward arithmetic, once, for every path that runs it: training and evaluation
 * (step.c: the rows of a batch of windows split among the pool's threads) and cached decoding
 * (decode.c: the new rows of several sequences, the output columns of every linear layer split
 * among the threads). A change to a layer -- a position scheme, the attention pattern, a
 * normalisation -- is made here (and in attention.c's row functions) and holds everywhere;
 * only the backward pass (step.c, attention.c) has to follow it separately.
 *
 * What differs between the paths is a parameter, not a copy:
 *   - the work split (mt_fwd.cols): rows [r0,r1) with whole linear layers through OpenBLAS
 *     (training: its losses are defined by these products), or all rows with output columns
 *     split among threads through the fixed-order row products of rowdot.c (decoding: a row's
 *     result must not depend on which other rows share the call);
 *   - where the keys and values live (mt_fwd.attend): in the window's own qkv rows, or in a
 *     sequence's key/value cache;
 *   - what is kept for the backward pass (mt_block_io: LayerNorm statistics and the
 *     pre-GELU activations, or scratch that is overwritten). */
#include "mt_internal.h"

#define LN_EPS 1e-5f

/* Embedding of one token at one position: o (C) = wte[tok] + wpe[pos]; wte[tok] alone when
 * positions are rotary (no table: attention turns q and k, attention.c). */
void embed_row(float *o, int tok, int pos, const mt_views *P, int C) {
    const float *e = P->wte + (size_t)tok * C;
    if (!P->wpe) { memcpy(o, e, sizeof(float) * (size_t)C); return; }
    const float *p = P->wpe + (size_t)pos * C;
    for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
}

static inline void fwd_tick(const mt_fwd *f, int kind) {
    if (f->timed) mt_tick(f->m, f->tid, kind);
}

static inline void fwd_sync(const mt_fwd *f) {
    if (f->timed) mt_sync(f->m, f->tid);
    else pool_barrier(f->m->pool);
}

/* out = inp @ w^T + bias (+ add) over this thread's share: rows [r0,r1) of every column, or
 * columns [o0,o1) of every row. */
static void fwd_linear(const mt_fwd *f, float *out, const float *inp, const float *w,
                       const float *bias, const float *add, int IC, int OC, int o0, int o1) {
    if (f->cols) linear_fixed(out, inp, w, bias, add, f->n, IC, OC, o0, o1);
    else matmul_forward_rows(out, inp, w, bias, add, f->r0, f->r1, IC, OC);
}

void layernorm_rows(const mt_fwd *f, float *out, float *mean, float *rstd, const float *inp,
                    const float *weight, const float *bias) {
    int C = f->m->cfg.d_model, r0 = f->cols ? 0 : f->r0, r1 = f->cols ? f->n : f->r1;
    size_t rc = (size_t)r0 * C;
    layernorm_forward(out + rc, mean + r0, rstd + r0, inp + rc, weight, bias, r1 - r0, C,
                      LN_EPS);
}

/* Block l: io->x -> io->xn (LayerNorm, attention, residual, LayerNorm, MLP, residual). */
void block_forward(const mt_fwd *f, int l, const mt_block_io *io) {
    mt_model *m = f->m;
    const mt_block *W = &m->P.h[l];
    int C = m->cfg.d_model, F = m->cfg.d_ff, NH = m->cfg.n_heads, hs = C / NH;
    int tid = f->tid, nt = f->nt;
    /* Column shares (split by columns only): q, k, v columns by heads, so the thread that
     * computes a head's q, k, v runs its attention without waiting; the rest in 16s. */
    int h0 = 0, h1 = NH, c0 = 0, c1 = C, g0 = 0, g1 = F;
    if (f->cols) {
        mt_split(NH, tid, nt, 1, &h0, &h1);
        mt_split(C, tid, nt, 16, &c0, &c1);
        mt_split(F, tid, nt, 16, &g0, &g1);
        fwd_sync(f);   /* x complete */
    }
    if (!f->cols || h1 > h0) {
        fwd_tick(f, TK_LAYERNORM);
        layernorm_rows(f, io->ln, io->mean1, io->rstd1, io->x, W->ln1w, W->ln1b);
        fwd_tick(f, TK_MATMUL);
        if (f->cols)
            for (int part = 0; part < 3; part++)   /* this thread's heads' q, k, v columns */
                fwd_linear(f, io->qkv, io->ln, W->qkvw, W->qkvb, NULL, C, 3 * C,
                           part * C + h0 * hs, part * C + h1 * hs);
        else
            fwd_linear(f, io->qkv, io->ln, W->qkvw, W->qkvb, NULL, C, 3 * C, 0, 3 * C);
    }
    if (!f->cols) fwd_sync(f);   /* every window's q, k, v */
    fwd_tick(f, TK_ATTENTION);
    f->attend(f, l, h0, h1);
    fwd_sync(f);                 /* atty complete */
    fwd_tick(f, TK_MATMUL);
    fwd_linear(f, io->res2, io->atty, W->projw, W->projb, io->x, C, C, c0, c1);
    if (f->cols) fwd_sync(f);    /* res2 complete */
    fwd_tick(f, TK_LAYERNORM);
    layernorm_rows(f, io->ln, io->mean2, io->rstd2, io->res2, W->ln2w, W->ln2b);
    fwd_tick(f, TK_MATMUL);
    fwd_linear(f, io->fch, io->ln, W->fcw, W->fcb, NULL, C, F, g0, g1);
    fwd_tick(f, TK_GELU);
    if (f->cols)
        for (int r = 0; r < f->n; r++)
            gelu_forward(io->gelu + (size_t)r * F + g0, io->fch + (size_t)r * F + g0,
                         (size_t)(g1 - g0));
    else
        gelu_forward(io->gelu + (size_t)f->r0 * F, io->fch + (size_t)f->r0 * F,
                     (size_t)(f->r1 - f->r0) * F);
    if (f->cols) fwd_sync(f);    /* gelu complete */
    fwd_tick(f, TK_MATMUL);
    fwd_linear(f, io->xn, io->gelu, W->fcprojw, W->fcprojb, io->res2, F, C, c0, c1);
}
