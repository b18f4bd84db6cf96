/* Generation with a key/value cache: one sequence, new positions appended to a per-layer
 * cache of keys and values, so a step computes only the new rows, never the whole context.
 *
 * A feed of n new tokens at positions p0..p0+n-1 (n = the prompt, or 1 per generated token)
 * runs every block on those n rows only; their keys and values are written into the cache
 * and each new row attends to cache rows 0..its own position. When the context would pass
 * max_seq_len, the newest half is kept and the cache rebuilt from it by one feed starting at
 * position 0 (positions are learned, so cached keys of the old positions would be stale).
 *
 * Work split (pool threads, as step.c: each thread owns what it writes, barriers between
 * phases). Linear layers go by output columns: for one row this splits the weight matrix, so
 * each thread streams its own part of the weights (generation is bound by memory bandwidth).
 * The attention's q, k, v columns go by heads, so the thread that computes a head's q, k, v
 * also runs that head's attention without waiting. Every thread computes the LayerNorms of
 * all rows into its own buffer (n*C values: cheaper than a barrier). Four barriers a layer. */
#include <math.h>
#include <stdlib.h>
#include "mt_internal.h"

#define LN_EPS 1e-5f

struct mt_gen {
    mt_model *m;
    int len;                 /* positions held in the cache */
    uint64_t slides;         /* times the context was cut to its newest half */
    uint64_t rows;           /* positions computed since creation */
    int32_t *tokens;         /* (T) ids at positions 0..len-1 */
    float *kc, *vc;          /* (L, NH, T, hs) cached keys and values */
    float *x, *atty, *res2;  /* (T, C) rows of the current feed */
    float *qkv;              /* (T, 3C) */
    float *fch;              /* (T, F) c_fc output, GELU applied in place */
    float *lnf;              /* (C) final LayerNorm of the last row */
    float *mem;
    float *priv;             /* per pool thread: LayerNorm output (T,C), mean (T), rstd (T) */
    int priv_threads;        /* pool threads priv has room for */
};

typedef struct {
    mt_gen *g;
    int p0, n;               /* new rows: positions p0..p0+n-1 */
    float *logits;           /* (V) of the last row, or NULL */
} gen_feed;

/* out[r, o0:o1] = inp[r] (IC) @ w[o0:o1]^T + bias[o0:o1] (+ add[r, o0:o1]) for r < n;
 * out, add (n,OC), inp (n,IC), w (OC,IC). One row: a GEMV over the weight slice. */
static void linear_cols(float *out, const float *inp, const float *w, const float *bias,
                        const float *add, int n, int IC, int OC, int o0, int o1) {
    int cols = o1 - o0;
    if (cols <= 0) return;
    for (int r = 0; r < n; r++) {
        float *o = out + (size_t)r * OC;
        const float *a = add ? add + (size_t)r * OC : NULL;
        for (int i = o0; i < o1; i++) o[i] = bias[i] + (a ? a[i] : 0.0f);
    }
    if (n == 1)
        scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, cols, IC, 1.0f, w + (size_t)o0 * IC, IC,
                          inp, 1, 1.0f, out + o0, 1);
    else
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, cols, IC, 1.0f, inp, IC,
                          w + (size_t)o0 * IC, IC, 1.0f, out + o0, OC);
}

/* Head h of layer l: write the new rows' keys and values into the cache, then
 * atty[r, h*hs:(h+1)*hs] (r < n) = softmax_{j <= p0+r}(scale q_r . k_j) @ v.
 * att is (n, p0+n) scratch. */
static void attend_head(mt_gen *g, int l, int h, int p0, int n, float *att) {
    const mt_config *c = &g->m->cfg;
    int C = c->d_model, NH = c->n_heads, T = c->max_seq_len, hs = C / NH, P = p0 + n;
    float *kc = g->kc + ((size_t)l * NH + h) * T * hs, *vc = g->vc + ((size_t)l * NH + h) * T * hs;
    const float *q = g->qkv + (size_t)h * hs;            /* row stride 3C */
    for (int r = 0; r < n; r++) {
        const float *src = q + (size_t)r * 3 * C;
        memcpy(kc + (size_t)(p0 + r) * hs, src + C, sizeof(float) * hs);
        memcpy(vc + (size_t)(p0 + r) * hs, src + 2 * C, sizeof(float) * hs);
    }
    float scale = 1.0f / sqrtf((float)hs);
    /* att (n,P) = scale * q (n,hs) @ kc (P,hs)^T; entries past a row's position are masked */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, P, hs, scale, q, 3 * C, kc, hs,
                      0.0f, att, P);
    for (int r = 0; r < n; r++) {
        float *row = att + (size_t)r * P;
        int last = p0 + r;
        float mx = row[0];
        for (int j = 1; j <= last; j++) mx = row[j] > mx ? row[j] : mx;
        float sum = 0.0f;
        for (int j = 0; j <= last; j++) { row[j] = mt_expf(row[j] - mx); sum += row[j]; }
        float inv = 1.0f / sum;
        for (int j = 0; j <= last; j++) row[j] *= inv;
        for (int j = last + 1; j < P; j++) row[j] = 0.0f;
    }
    /* atty (n,hs) (row stride C) = att (n,P) @ vc (P,hs) */
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, hs, P, 1.0f, att, P, vc, hs,
                      0.0f, g->atty + (size_t)h * hs, C);
}

static void feed_task(void *ctx, int tid, int pool_threads) {
    gen_feed *f = ctx;
    mt_gen *g = f->g;
    mt_model *m = g->m;
    /* As step.c: the work goes into m->parts parts (no more than the CPUs by default); only
     * that many pool threads run the task (pool_run_parts). */
    int nt = m->parts < pool_threads ? m->parts : pool_threads;
    mt_pool *pool = m->pool;
    int C = m->cfg.d_model, F = m->cfg.d_ff, NH = m->cfg.n_heads, L = m->cfg.n_layers;
    int T = m->cfg.max_seq_len, V = m->cfg.vocab_size, n = f->n, p0 = f->p0, hs = C / NH;
    int r0, r1, h0, h1, c0, c1, f0, f1;
    mt_split(n, tid, nt, 1, &r0, &r1);
    mt_split(NH, tid, nt, 1, &h0, &h1);
    mt_split(C, tid, nt, 16, &c0, &c1);
    mt_split(F, tid, nt, 16, &f0, &f1);
    float *att = m->att_scratch + (size_t)tid * 2 * T * T;   /* >= n*(p0+n) floats */
    float *ln = g->priv + (size_t)tid * ((size_t)T * C + 2 * T);   /* (n,C) this thread's */
    float *mean = ln + (size_t)T * C, *rstd = mean + T;
    int active = tid < nt;

    /* x (n,C) = wte[token] + wpe[position] */
    for (int r = r0; r < r1; r++) {
        const float *e = m->P.wte + (size_t)g->tokens[p0 + r] * C;
        const float *p = m->P.wpe + (size_t)(p0 + r) * C;
        float *o = g->x + (size_t)r * C;
        for (int i = 0; i < C; i++) o[i] = e[i] + p[i];
    }
    for (int l = 0; l < L; l++) {
        const mt_block *W = &m->P.h[l];
        pool_barrier(pool);   /* x complete */
        if (active && h1 > h0) {
            layernorm_forward(ln, mean, rstd, g->x, W->ln1w, W->ln1b, n, C, LN_EPS);
            for (int part = 0; part < 3; part++)   /* this thread's heads' q, k, v columns */
                linear_cols(g->qkv, ln, W->qkvw, W->qkvb, NULL, n, C, 3 * C,
                            part * C + h0 * hs, part * C + h1 * hs);
            for (int h = h0; h < h1; h++) attend_head(g, l, h, p0, n, att);
        }
        pool_barrier(pool);   /* atty complete */
        linear_cols(g->res2, g->atty, W->projw, W->projb, g->x, n, C, C, c0, c1);
        pool_barrier(pool);   /* res2 complete */
        if (active) {
            layernorm_forward(ln, mean, rstd, g->res2, W->ln2w, W->ln2b, n, C, LN_EPS);
            linear_cols(g->fch, ln, W->fcw, W->fcb, NULL, n, C, F, f0, f1);
            for (int r = 0; r < n; r++) {
                float *row = g->fch + (size_t)r * F;
                gelu_forward(row + f0, row + f0, (size_t)(f1 - f0));   /* element-wise */
            }
        }
        pool_barrier(pool);   /* fch complete */
        linear_cols(g->x, g->fch, W->fcprojw, W->fcprojb, g->res2, n, F, C, c0, c1);
    }
    pool_barrier(pool);
    if (tid == 0)
        layernorm_forward(g->lnf, mean, rstd, g->x + (size_t)(n - 1) * C, m->P.lnfw,
                          m->P.lnfb, 1, C, LN_EPS);
    if (!f->logits) return;
    pool_barrier(pool);
    int v0, v1;
    mt_split(V, tid, nt, 16, &v0, &v1);
    /* logits[v0:v1] = lm[v0:v1] (V,C) @ lnf (C) */
    if (v1 > v0)
        scipy_cblas_sgemv(CblasRowMajor, CblasNoTrans, v1 - v0, C, 1.0f,
                          m->P.lm + (size_t)v0 * C, C, g->lnf, 1, 0.0f, f->logits + v0, 1);
}

/* Room in priv for every pool thread (the model's pool can be resized between feeds). */
static int ensure_priv(mt_gen *g) {
    int threads = pool_size(g->m->pool);
    if (g->priv && g->priv_threads >= threads) return MT_OK;
    size_t per = (size_t)g->m->cfg.max_seq_len * (g->m->cfg.d_model + 2);
    float *p = malloc(sizeof(float) * per * (size_t)threads);
    if (!p) return MT_ENOMEM;
    free(g->priv);
    g->priv = p;
    g->priv_threads = threads;
    return MT_OK;
}

mt_gen *mt_gen_new(mt_model *model) {
    if (!model) return NULL;
    const mt_config *c = &model->cfg;
    size_t T = c->max_seq_len, C = c->d_model, F = c->d_ff, L = c->n_layers;
    mt_gen *g = calloc(1, sizeof *g);
    if (!g) return NULL;
    g->m = model;
    g->tokens = malloc(sizeof(int32_t) * T);
    /* kc, vc: 2*L*T*C; x, atty, res2: 3*T*C; qkv 3*T*C; fch T*F; lnf C */
    size_t total = 2 * L * T * C + 6 * T * C + T * F + C;
    g->mem = malloc(sizeof(float) * total);
    if (!g->tokens || !g->mem) {
        mt_gen_free(g);
        return NULL;
    }
    float *p = g->mem;
    g->kc = p; p += L * T * C;
    g->vc = p; p += L * T * C;
    g->x = p; p += T * C;
    g->atty = p; p += T * C;
    g->res2 = p; p += T * C;
    g->qkv = p; p += 3 * T * C;
    g->fch = p; p += T * F;
    g->lnf = p;
    if (ensure_priv(g) != MT_OK) {
        mt_gen_free(g);
        return NULL;
    }
    return g;
}

void mt_gen_free(mt_gen *g) {
    if (!g) return;
    free(g->tokens);
    free(g->mem);
    free(g->priv);
    free(g);
}

void mt_gen_reset(mt_gen *g) { g->len = 0; }

int mt_gen_length(const mt_gen *g) { return g->len; }

uint64_t mt_gen_slides(const mt_gen *g) { return g->slides; }

uint64_t mt_gen_rows(const mt_gen *g) { return g->rows; }

int mt_gen_context(const mt_gen *g, int32_t *out) {
    memcpy(out, g->tokens, sizeof(int32_t) * (size_t)g->len);
    return g->len;
}

int mt_gen_feed(mt_gen *g, const int32_t *ids, int n, float *logits) {
    const mt_config *c = &g->m->cfg;
    int T = c->max_seq_len;
    if (n < 1 || n > T) return MT_EINVAL;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= c->vocab_size) return MT_EINVAL;
    if (ensure_priv(g) != MT_OK) return MT_ENOMEM;
    /* The pool is the model's: training and generation must not drive it at once. */
    if (mt_model_enter(g->m) != MT_OK) return MT_EBUSY;
    int p0 = g->len, start = g->len;   /* where the new ids go; first position computed */
    if (p0 + n > T) {
        /* Keep the newest half of the context (less if the new tokens need the room) and
         * rebuild the cache from position 0: the kept tokens are fed again with the new ones. */
        int keep = p0 < T / 2 ? p0 : T / 2;
        if (keep > T - n) keep = T - n;
        memmove(g->tokens, g->tokens + p0 - keep, sizeof(int32_t) * (size_t)keep);
        p0 = keep;
        start = 0;
        g->slides += 1;
    }
    memcpy(g->tokens + p0, ids, sizeof(int32_t) * (size_t)n);
    g->len = p0 + n;
    gen_feed f = {.g = g, .p0 = start, .n = g->len - start, .logits = logits};
    g->rows += (uint64_t)f.n;
    pool_run_parts(g->m->pool, feed_task, &f, g->m->parts);   /* others sleep through it */
    mt_model_leave(g->m);
    return MT_OK;
}
