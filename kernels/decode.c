/* Batched decoding with key/value caches: a pool of sequence slots, each with its own cache,
 * tokens and length; one step appends new tokens to several slots at once (a new prompt, or
 * one generated token each) and returns the next-token logits of each.
 *
 * A step runs forward.c's blocks on the new rows only (all slots' new rows together, in passes
 * of at most DECODE_PASS_ROWS); each new row writes its key and value into its slot's cache
 * and attends to the cache rows 0..its own position. The arithmetic of a row -- embedding,
 * LayerNorm, the fixed-order linear layers and attention (rowdot.c), GELU -- depends on that
 * row's token, position and cache alone, so a sequence's logits are bitwise the same whichever
 * other sequences share the step, however many there are, however its prompt was cut into
 * steps, and however many passes the step takes.
 *
 * Context rule, per slot: when appending would pass the slot's context limit (max_seq_len, or
 * less if asked), only the newest half of its context is kept (fewer if the new tokens need the
 * room) and its cache is rebuilt from position 0: the kept tokens are computed again with the
 * new ones (learned positions are added to the input, rotary ones turn the keys: either way
 * cached keys of the old positions would be stale). The cache holds keys as attention uses
 * them: turned to their absolute position under rotary positions.
 *
 * Work split (pool threads, forward.c's column split): linear layers by output columns, so for
 * a few rows each thread streams its own part of the weights (decoding is bound by memory
 * bandwidth) and for many rows each weight tile is reused across all rows; attention by
 * heads; embeddings by rows; every thread computes the LayerNorms of all rows into its own
 * buffer. Four barriers a layer. */
#include <stdlib.h>
#include "mt_internal.h"

#define LN_EPS 1e-5f
#define DECODE_PASS_ROWS 256   /* rows per pass: bounds the activation buffers, not results */

struct mt_batch {
    mt_model *m;
    int slots, ctx;          /* sequence slots; positions a slot's context may hold */
    int *len;                /* (slots) positions held in each cache */
    uint64_t *slides;        /* (slots) times each context was cut to its newest half */
    uint64_t rows;           /* positions computed since creation */
    int32_t *tokens;         /* (slots, ctx) ids at positions 0..len-1 */
    float *kc, *vc;          /* (slots, L, NH, ctx, hs) cached keys and values */
    float *lnf;              /* (slots, C) final LayerNorm of each stepped slot's last row */
    int *seq_slot, *seq_start, *seq_last_row;   /* (slots) per sequence of a step */
    /* one pass: up to cap rows */
    int cap;
    float *x, *atty, *res2, *qkv, *fch;   /* (cap,C) x3, (cap,3C), (cap,F) */
    int32_t *row_tok, *row_pos, *row_slot;
    float *priv;             /* per pool thread: LayerNorm output (cap,C), mean (cap), rstd (cap) */
    int priv_threads, priv_cap;
};

typedef struct {
    mt_batch *b;
    int n;                   /* rows of this pass */
    int nseq, seq0, seq1;    /* sequences of the step; those whose last row is in this pass */
    float *logits;           /* (nseq, V) after the last pass, or NULL */
} pass;

static size_t cache_off(const mt_batch *b, int slot, int l, int h) {
    const mt_config *c = &b->m->cfg;
    size_t hs = (size_t)(c->d_model / c->n_heads);
    return ((((size_t)slot * c->n_layers + l) * c->n_heads + h) * b->ctx) * hs;
}

/* Heads [h0,h1) of layer l: every row's key and value into its slot's cache, then its
 * attention over the cache rows 0..its position. Rows of one slot come in position order. */
static void attend_cache(const mt_fwd *f, int l, int h0, int h1) {
    const pass *p = f->ctx;
    mt_batch *b = p->b;
    int C = b->m->cfg.d_model, hs = C / b->m->cfg.n_heads;
    float *att = b->m->att_scratch + (size_t)f->tid * mt_att_floats(b->m->cfg.max_seq_len);
    for (int h = h0; h < h1; h++)
        for (int r = 0; r < p->n; r++) {
            size_t off = cache_off(b, b->row_slot[r], l, h);
            int pos = b->row_pos[r];
            float *q = b->qkv + (size_t)r * 3 * C + (size_t)h * hs;
            float *kc = b->kc + off, *vc = b->vc + off;
            memcpy(kc + (size_t)pos * hs, q + C, sizeof(float) * hs);
            memcpy(vc + (size_t)pos * hs, q + 2 * C, sizeof(float) * hs);
            attention_rows(b->atty + (size_t)r * C + (size_t)h * hs, C, NULL, q, 3 * C, kc, hs,
                           vc, hs, pos, 1, hs, 0, att, 0, &b->m->attn);
        }
}

static void pass_task(void *ctx, int tid, int nt) {
    pass *p = ctx;
    mt_batch *b = p->b;
    mt_model *m = b->m;
    int C = m->cfg.d_model, V = m->cfg.vocab_size, L = m->cfg.n_layers, n = p->n;
    float *ln = b->priv + (size_t)tid * ((size_t)b->priv_cap * (C + 2));
    float *mean = ln + (size_t)b->priv_cap * C, *rstd = mean + b->priv_cap;
    int r0, r1;
    mt_split(n, tid, nt, 1, &r0, &r1);
    mt_fwd f = {.m = m, .tid = tid, .nt = nt, .n = n, .r0 = r0, .r1 = r1, .cols = 1,
                .timed = 0, .attend = attend_cache, .ctx = p};
    for (int r = r0; r < r1; r++)
        embed_row(b->x + (size_t)r * C, b->row_tok[r], b->row_pos[r], &m->P, C);
    mt_block_io io = {.x = b->x, .xn = b->x, .ln = ln, .mean1 = mean, .rstd1 = rstd,
                      .mean2 = mean, .rstd2 = rstd, .qkv = b->qkv, .atty = b->atty,
                      .res2 = b->res2, .fch = b->fch, .gelu = b->fch};
    for (int l = 0; l < L; l++) block_forward(&f, l, &io);
    pool_barrier(m->pool);   /* x complete */
    /* Final LayerNorm of the last row of each sequence that ends in this pass. */
    int k0, k1;
    mt_split(p->seq1 - p->seq0, tid, nt, 1, &k0, &k1);
    for (int k = p->seq0 + k0; k < p->seq0 + k1; k++)
        layernorm_forward(b->lnf + (size_t)k * C, mean, rstd,
                          b->x + (size_t)b->seq_last_row[k] * C, m->P.lnfw, m->P.lnfb, 1, C,
                          LN_EPS);
    if (!p->logits) return;
    pool_barrier(m->pool);   /* every sequence's lnf */
    int v0, v1;
    mt_split(V, tid, nt, 16, &v0, &v1);
    linear_fixed(p->logits, b->lnf, m->P.lm, NULL, NULL, p->nseq, C, V, v0, v1);
}

/* Row buffers for passes of `rows` rows and private LayerNorm room for every pool thread
 * (the model's pool can be resized between steps). */
static int ensure_rows(mt_batch *b, int rows) {
    const mt_config *c = &b->m->cfg;
    size_t C = c->d_model, F = c->d_ff;
    if (rows > b->cap) {
        size_t R = (size_t)rows;
        float *x = malloc(sizeof(float) * R * (6 * C + F));
        int32_t *meta = malloc(sizeof(int32_t) * R * 3);
        if (!x || !meta) { free(x); free(meta); return MT_ENOMEM; }
        free(b->x);
        free(b->row_tok);
        b->x = x; b->atty = x + R * C; b->res2 = x + 2 * R * C; b->qkv = x + 3 * R * C;
        b->fch = x + 6 * R * C;
        b->row_tok = meta; b->row_pos = meta + R; b->row_slot = meta + 2 * R;
        b->cap = rows;
    }
    int threads = pool_size(b->m->pool);
    if (b->priv && b->priv_threads >= threads && b->priv_cap >= b->cap) return MT_OK;
    float *p = malloc(sizeof(float) * (size_t)b->cap * (C + 2) * (size_t)threads);
    if (!p) return MT_ENOMEM;
    free(b->priv);
    b->priv = p;
    b->priv_threads = threads;
    b->priv_cap = b->cap;
    return MT_OK;
}

int mt_batch_new(mt_model *model, int slots, int context, mt_batch **out) {
    *out = NULL;
    if (!model || slots < 1 || context < 0 || context > model->cfg.max_seq_len) return MT_EINVAL;
    const mt_config *c = &model->cfg;
    mt_batch *b = calloc(1, sizeof *b);
    if (!b) return MT_ENOMEM;
    b->m = model;
    b->slots = slots;
    b->ctx = context ? context : c->max_seq_len;
    size_t S = (size_t)slots, T = (size_t)b->ctx, C = c->d_model, L = c->n_layers;
    b->len = calloc(S, sizeof(int));
    b->slides = calloc(S, sizeof(uint64_t));
    b->tokens = malloc(sizeof(int32_t) * S * T);
    b->kc = malloc(sizeof(float) * S * L * T * C);
    b->vc = malloc(sizeof(float) * S * L * T * C);
    b->lnf = malloc(sizeof(float) * S * C);
    b->seq_slot = malloc(sizeof(int) * S * 3);
    if (!b->len || !b->slides || !b->tokens || !b->kc || !b->vc || !b->lnf || !b->seq_slot ||
        ensure_rows(b, 1) != MT_OK) {
        mt_batch_free(b);
        return MT_ENOMEM;
    }
    b->seq_start = b->seq_slot + S;
    b->seq_last_row = b->seq_slot + 2 * S;
    *out = b;
    return MT_OK;
}

void mt_batch_free(mt_batch *b) {
    if (!b) return;
    free(b->len); free(b->slides); free(b->tokens); free(b->kc); free(b->vc); free(b->lnf);
    free(b->seq_slot); free(b->x); free(b->row_tok); free(b->priv);
    free(b);
}

int mt_batch_slots(const mt_batch *b, int *out) {
    *out = b->slots;
    return MT_OK;
}

int mt_batch_context_limit(const mt_batch *b, int *out) {
    *out = b->ctx;
    return MT_OK;
}

int mt_batch_rows(const mt_batch *b, uint64_t *out) {
    *out = b->rows;
    return MT_OK;
}

int mt_batch_reset(mt_batch *b, int slot) {
    if (slot < 0 || slot >= b->slots) return MT_EINVAL;
    b->len[slot] = 0;
    return MT_OK;
}

int mt_batch_length(const mt_batch *b, int slot, int *out) {
    if (slot < 0 || slot >= b->slots) return MT_EINVAL;
    *out = b->len[slot];
    return MT_OK;
}

int mt_batch_tokens(const mt_batch *b, int slot, int32_t *out, int *count) {
    if (slot < 0 || slot >= b->slots) return MT_EINVAL;
    memcpy(out, b->tokens + (size_t)slot * b->ctx, sizeof(int32_t) * (size_t)b->len[slot]);
    *count = b->len[slot];
    return MT_OK;
}

int mt_batch_slides(const mt_batch *b, int slot, uint64_t *out) {
    if (slot < 0 || slot >= b->slots) return MT_EINVAL;
    *out = b->slides[slot];
    return MT_OK;
}

/* Positions a slot computes when n ids are appended, and where the computation starts. */
static int slide_plan(const mt_batch *b, int slot, int n, int *keep) {
    int p0 = b->len[slot], T = b->ctx;
    if (p0 + n <= T) { *keep = -1; return n; }
    int k = p0 < T / 2 ? p0 : T / 2;
    if (k > T - n) k = T - n;
    *keep = k;
    return k + n;
}

int mt_batch_step(mt_batch *b, int nseq, const int32_t *slots, const int32_t *counts,
                  const int32_t *ids, float *logits) {
    const mt_config *c = &b->m->cfg;
    if (nseq < 1 || nseq > b->slots) return MT_EINVAL;
    size_t total_ids = 0, total_rows = 0;
    for (int k = 0; k < nseq; k++) {
        if (slots[k] < 0 || slots[k] >= b->slots || counts[k] < 1 || counts[k] > b->ctx)
            return MT_EINVAL;
        for (int j = 0; j < k; j++)
            if (slots[j] == slots[k]) return MT_EINVAL;   /* a slot once per step */
        total_ids += (size_t)counts[k];
    }
    for (size_t i = 0; i < total_ids; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size) return MT_EINVAL;
    for (int k = 0; k < nseq; k++) {
        int keep;
        total_rows += (size_t)slide_plan(b, slots[k], counts[k], &keep);
    }
    int cap = total_rows < DECODE_PASS_ROWS ? (int)total_rows : DECODE_PASS_ROWS;
    /* The pool is the model's: training and decoding must not drive it at once. */
    if (mt_model_enter(b->m) != MT_OK) return MT_EBUSY;
    if (ensure_rows(b, cap) != MT_OK) { mt_model_leave(b->m); return MT_ENOMEM; }
    /* Append the ids (sliding where needed); sequence k computes positions
     * seq_start[k]..len-1 of its slot. */
    const int32_t *src = ids;
    for (int k = 0; k < nseq; k++) {
        int s = slots[k], n = counts[k], keep;
        int32_t *tok = b->tokens + (size_t)s * b->ctx;
        slide_plan(b, s, n, &keep);
        int p0 = b->len[s], start = p0;
        if (keep >= 0) {
            memmove(tok, tok + p0 - keep, sizeof(int32_t) * (size_t)keep);
            p0 = keep;
            start = 0;
            b->slides[s] += 1;
        }
        memcpy(tok + p0, src, sizeof(int32_t) * (size_t)n);
        src += n;
        b->len[s] = p0 + n;
        b->seq_slot[k] = s;
        b->seq_start[k] = start;
    }
    b->rows += (uint64_t)total_rows;
    /* Passes over the rows in sequence order, each position once. */
    pass p = {.b = b, .nseq = nseq};
    int k = 0, pos = b->seq_start[0];
    while (k < nseq) {
        int n = 0;
        p.seq0 = k;
        while (k < nseq && n < cap) {
            int s = b->seq_slot[k];
            b->row_slot[n] = s;
            b->row_pos[n] = pos;
            b->row_tok[n] = b->tokens[(size_t)s * b->ctx + pos];
            n++;
            if (++pos == b->len[s]) {
                b->seq_last_row[k] = n - 1;
                if (++k < nseq) pos = b->seq_start[k];
            }
        }
        p.n = n;
        p.seq1 = k;
        p.logits = k == nseq ? logits : NULL;
        pool_run_parts(b->m->pool, pass_task, &p, b->m->parts);   /* others sleep */
    }
    mt_model_leave(b->m);
    return MT_OK;
}
