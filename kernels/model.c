/* The model object: parameter table (GPT-2 state_dict names and order, linear weights
 * [out,in]), views into the caller's two arenas (parameters, gradients), GPT-2 initialisation
 * from a seed, activation buffers that grow on demand, and the API calls that run a step on the
 * pool. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include "mt_internal.h"

#define BLOCK_TENSORS 12
#define FORWARD_ONLY_ROWS 2048     /* forward-only calls run in groups of about this many rows */
#define CHUNK_FLOATS (16u << 20)   /* output-layer chunk budget: 64 MB of logits (544 rows at
                                      * V = 30,000: 3-6% faster a step than 32 MB, measured) */

static const char *BLOCK_NAMES[BLOCK_TENSORS] = {
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"};

static int config_ok(const mt_config *c) {
    return c->vocab_size > 0 && c->max_seq_len > 0 && c->d_model > 0 && c->n_layers > 0 &&
           c->n_heads > 0 && c->d_ff > 0 && c->d_model % c->n_heads == 0 &&
           (c->position == 0 || (c->position == 1 && (c->d_model / c->n_heads) % 2 == 0)) &&
           (c->init == 0 || c->init == 1) && (c->attention == 0 || c->attention == 1) &&
           c->attention_window >= 0;
}

/* Rotary positions have no table: the GPT-2 table without transformer.wpe.weight. */
static int num_tensors(const mt_config *cfg) {
    return 5 + BLOCK_TENSORS * cfg->n_layers - (cfg->position == 1);
}

/* Tensor i of this config's table as an index of the full GPT-2 table. */
static int gpt2_index(const mt_config *c, int i) { return c->position == 1 && i >= 1 ? i + 1 : i; }

int mt_num_tensors(const mt_config *cfg, int *out) {
    if (!config_ok(cfg)) return MT_EINVAL;
    *out = num_tensors(cfg);
    return MT_OK;
}

/* Name and shape of tensor i; returns its element count (0 if i is out of range). */
static size_t tensor_at(const mt_config *c, int i, char *name, int cap, int *ndim, int *shape) {
    int C = c->d_model, L = c->n_layers;
    char buf[96];
    int d = 2, s0 = 0, s1 = 0;
    if (i < 0 || i >= num_tensors(c)) return 0;
    i = gpt2_index(c, i);
    if (i == 0) { snprintf(buf, sizeof buf, "transformer.wte.weight"); s0 = c->vocab_size; s1 = C; }
    else if (i == 1) { snprintf(buf, sizeof buf, "transformer.wpe.weight"); s0 = c->max_seq_len; s1 = C; }
    else if (i < 2 + BLOCK_TENSORS * L) {
        int l = (i - 2) / BLOCK_TENSORS, k = (i - 2) % BLOCK_TENSORS;
        static const int out_mul[BLOCK_TENSORS] = {1, 1, 3, 3, 1, 1, 1, 1, 0, 0, 1, 1};
        snprintf(buf, sizeof buf, "transformer.h.%d.%s", l, BLOCK_NAMES[k]);
        s0 = out_mul[k] ? out_mul[k] * C : c->d_ff;  /* output features */
        if (k % 2) d = 1;                            /* odd entries: biases, LN bias */
        else if (k == 0 || k == 6) d = 1;            /* LN weights */
        else s1 = (k == 10) ? c->d_ff : C;           /* input features */
    } else if (i == 2 + BLOCK_TENSORS * L) { snprintf(buf, sizeof buf, "transformer.ln_f.weight"); d = 1; s0 = C; }
    else if (i == 3 + BLOCK_TENSORS * L) { snprintf(buf, sizeof buf, "transformer.ln_f.bias"); d = 1; s0 = C; }
    else { snprintf(buf, sizeof buf, "lm_head.weight"); s0 = c->vocab_size; s1 = C; }
    if (name && cap > 0) snprintf(name, (size_t)cap, "%s", buf);
    if (ndim) *ndim = d;
    if (shape) { shape[0] = s0; shape[1] = d == 2 ? s1 : 0; }
    return d == 2 ? (size_t)s0 * s1 : (size_t)s0;
}

static size_t num_params(const mt_config *cfg) {
    size_t n = 0;
    for (int i = 0; i < num_tensors(cfg); i++) n += tensor_at(cfg, i, NULL, 0, NULL, NULL);
    return n;
}

int mt_num_params(const mt_config *cfg, size_t *out) {
    if (!config_ok(cfg)) return MT_EINVAL;
    *out = num_params(cfg);
    return MT_OK;
}

int mt_tensor_info(const mt_config *cfg, int i, char *name, int name_cap, size_t *offset,
                   int *ndim, int *shape) {
    if (!config_ok(cfg) || i < 0 || i >= num_tensors(cfg)) return MT_EINVAL;
    size_t off = 0;
    for (int j = 0; j < i; j++) off += tensor_at(cfg, j, NULL, 0, NULL, NULL);
    tensor_at(cfg, i, name, name_cap, ndim, shape);
    if (offset) *offset = off;
    return MT_OK;
}

/* Points the views at an arena laid out as the table says. */
static void make_views(const mt_config *c, float *base, mt_views *v) {
    size_t off = 0;
    v->wpe = NULL;
    for (int t = 0; t < num_tensors(c); t++) {
        float *p = base + off;
        off += tensor_at(c, t, NULL, 0, NULL, NULL);
        int i = gpt2_index(c, t);
        if (i == 0) v->wte = p;
        else if (i == 1) v->wpe = p;
        else if (i < 2 + BLOCK_TENSORS * c->n_layers) {
            mt_block *b = &v->h[(i - 2) / BLOCK_TENSORS];
            float **f[BLOCK_TENSORS] = {&b->ln1w, &b->ln1b, &b->qkvw, &b->qkvb, &b->projw,
                                        &b->projb, &b->ln2w, &b->ln2b, &b->fcw, &b->fcb,
                                        &b->fcprojw, &b->fcprojb};
            *f[(i - 2) % BLOCK_TENSORS] = p;
        } else if (i == 2 + BLOCK_TENSORS * c->n_layers) v->lnfw = p;
        else if (i == 3 + BLOCK_TENSORS * c->n_layers) v->lnfb = p;
        else v->lm = p;
    }
}

/* ---- deterministic initialisation ---------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Box-Muller in double: both values of each pair are used, in order. */
typedef struct { uint64_t state; int have; double spare; } normal_rng;

static double normal_next(normal_rng *r) {
    if (r->have) { r->have = 0; return r->spare; }
    double u1 = ((splitmix64(&r->state) >> 11) + 1.0) * 0x1.0p-53; /* (0,1] */
    double u2 = (splitmix64(&r->state) >> 11) * 0x1.0p-53;          /* [0,1) */
    double rad = sqrt(-2.0 * log(u1)), th = 6.283185307179586 * u2;
    r->spare = rad * sin(th);
    r->have = 1;
    return rad * cos(th);
}

/* The standard normal quantile: Acklam's rational approximation (relative error < 1.2e-9)
 * and one Halley step on erfc, so the result is accurate to double rounding. u in (0,1). */
static double normal_quantile(double u) {
    static const double a[] = {-3.969683028665376e+01, 2.209460984245205e+02,
                               -2.759285104469687e+02, 1.383577518672690e+02,
                               -3.066479806614716e+01, 2.506628277459239e+00};
    static const double b[] = {-5.447609879822406e+01, 1.615858368580409e+02,
                               -1.556989798598866e+02, 6.680131188771972e+01,
                               -1.328068155288572e+01};
    static const double c[] = {-7.784894002430293e-03, -3.223964580411365e-01,
                               -2.400758277161838e+00, -2.549732539343734e+00,
                               4.374664141464968e+00, 2.938163982698783e+00};
    static const double d[] = {7.784695709041462e-03, 3.224671290700398e-01,
                               2.445134137142996e+00, 3.754408661907416e+00};
    double x;
    if (u < 0.02425 || u > 1 - 0.02425) {
        double q = sqrt(-2 * log(u < 0.5 ? u : 1 - u));
        x = (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
            ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
        if (u > 0.5) x = -x;
    } else {
        double q = u - 0.5, r = q * q;
        x = (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
            (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
    }
    double e = 0.5 * erfc(-x / sqrt(2.0)) - u, g = e * sqrt(2 * M_PI) * exp(x * x / 2);
    return x - g / (1 + x * g / 2);
}

/* The m-th prime, m = 0, 1, ... (2, 3, 5, ...): trial division, for tables of a few thousand. */
static int prime_at(int m) {
    for (int p = 2, found = -1;; p++) {
        int is = 1;
        for (int q = 2; q * q <= p && is; q++) is = p % q != 0;
        if (is && ++found == m) return p;
    }
}

/* The lattice embeddings (docs/DESIGN.md, "The model"): row n (token id or position), column
 * k of a (rows, d) table is lambda * PhiInv(frac((n + 1) * sqrt(p_{k + o}))), p_m the m-th
 * prime, o = 0 for the token table and d for the position table (distinct primes). */
static void lattice_fill(float *t, int rows, int d, int o, double lambda) {
    for (int k = 0; k < d; k++) {
        double g = sqrt((double)prime_at(k + o));
        for (int n = 0; n < rows; n++) {
            double x = (n + 1) * g;
            t[(size_t)n * d + k] = (float)(lambda * normal_quantile(x - floor(x)));
        }
    }
}

int mt_model_init(mt_model *model, uint64_t seed) {
    const mt_config *c = &model->cfg;
    normal_rng rng = {seed, 0, 0.0};
    char name[96];
    int ndim, shape[2];
    size_t off = 0;
    double proj_std = 0.02 / sqrt(2.0 * c->n_layers);
    for (int i = 0; i < num_tensors(c); i++) {
        size_t n = tensor_at(c, i, name, sizeof name, &ndim, shape);
        float *p = model->params + off;
        off += n;
        if (ndim == 2) {
            size_t len = strlen(name);
            int is_proj = len > 13 && strcmp(name + len - 13, "c_proj.weight") == 0;
            double std = is_proj ? proj_std : 0.02;
            for (size_t j = 0; j < n; j++) p[j] = (float)(std * normal_next(&rng));
        } else {
            size_t len = strlen(name);
            float val = (len > 6 && strcmp(name + len - 6, "weight") == 0) ? 1.0f : 0.0f;
            for (size_t j = 0; j < n; j++) p[j] = val;
        }
    }
    /* Lattice embeddings replace the normal draws (made anyway, so every other tensor is the
     * normal initialisation's, draw for draw). */
    if (c->init == 1) {
        lattice_fill(model->P.wte, c->vocab_size, c->d_model, 0, 0.02);
        if (model->P.wpe) lattice_fill(model->P.wpe, c->max_seq_len, c->d_model, c->d_model, 0.02);
    }
    return MT_OK;
}

/* ---- activation buffers ----------------------------------------------------------------- */

static void acts_free(mt_acts *a) {
    free(a->mem);
    free(a->slot);
    memset(a, 0, sizeof *a);
}

/* Carves one allocation into the buffers for `rows` rows (pass 0 measures, pass 1 assigns). */
static int acts_alloc(mt_acts *a, const mt_config *c, int rows, int training) {
    size_t N = (size_t)rows, C = c->d_model, F = c->d_ff, NH = c->n_heads;
    int nslots = training ? c->n_layers : 1;
    mt_acts z = {0};
    z.slot = calloc((size_t)nslots, sizeof(mt_block_acts));
    if (!z.slot) return MT_ENOMEM;
    size_t total = 0;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        float *base = z.mem;
#define TAKE(ptr, count) do { if (pass) ptr = base + off; off += ((count) + 15) & ~(size_t)15; } while (0)
        for (int l = 0; l < nslots; l++) {
            mt_block_acts *A = &z.slot[l];
            TAKE(A->x, N * C); TAKE(A->ln1_mean, N); TAKE(A->ln1_rstd, N);
            TAKE(A->qkv, N * 3 * C); TAKE(A->atty, N * C); TAKE(A->lse, N * NH);
            TAKE(A->res2, N * C); TAKE(A->ln2_mean, N); TAKE(A->ln2_rstd, N);
            TAKE(A->fch, N * F);
        }
        if (training) TAKE(z.xL, N * C);
        TAKE(z.lnf, N * C); TAKE(z.lnf_mean, N); TAKE(z.lnf_rstd, N); TAKE(z.losses, N);
        TAKE(z.lnbuf, N * C); TAKE(z.G, N * F);
        if (training) {
            TAKE(z.dresid, N * C); TAKE(z.dln, N * C); TAKE(z.datty, N * C);
            TAKE(z.dqkv, N * 3 * C);
        }
#undef TAKE
        if (!pass) {
            total = off;
            z.mem = aligned_alloc(64, total * sizeof(float));
            if (!z.mem) { free(z.slot); return MT_ENOMEM; }
        }
    }
    if (!training) z.xL = z.slot[0].x;
    z.cap_rows = rows;
    z.nslots = nslots;
    z.training = training;
    acts_free(a);
    *a = z;
    return MT_OK;
}

/* Rows of an output-layer chunk for a budget of that many floats of logits. */
static int chunk_rows_for(size_t budget_floats, int V) {
    size_t r = (budget_floats / (size_t)V) & ~(size_t)15;
    return r < 16 ? 16 : (r > (1u << 30) ? (1 << 30) : (int)r);
}

int mt_output_chunk_rows(size_t budget_floats, int V, int *out) {
    if (V <= 0) return MT_EINVAL;
    *out = chunk_rows_for(budget_floats, V);
    return MT_OK;
}

static int ensure_chunk(mt_model *m, int N) {
    int V = m->cfg.vocab_size, threads = pool_size(m->pool);
    int R = chunk_rows_for(m->chunk_budget, V);
    if (R > N) R = N;
    if (m->chunk && m->chunk_rows >= R && m->chunk_threads >= threads) return MT_OK;
    if (m->chunk && m->chunk_rows > R) R = m->chunk_rows;
    /* (R,V) exponentials, (R,C) scaled rows, (R) scales, and (R,C) per thread for the partial
     * sums of dlnf: see output_layer_chunked */
    size_t C = (size_t)m->cfg.d_model;
    size_t floats = (size_t)R * ((size_t)V + C + 1 + C * (size_t)threads);
    float *p = aligned_alloc(64, (floats * sizeof(float) + 63) & ~(size_t)63);
    if (!p) return MT_ENOMEM;
    free(m->chunk);
    m->chunk = p;
    m->chunk_rows = R;
    m->chunk_threads = threads;
    return MT_OK;
}

/* ---- the model object ---------------------------------------------------------------------- */

static void update_parts(mt_model *m);

int mt_model_enter(mt_model *m) {
    return atomic_exchange_explicit(&m->busy, 1, memory_order_acquire) ? MT_EBUSY : MT_OK;
}

void mt_model_leave(mt_model *m) { atomic_store_explicit(&m->busy, 0, memory_order_release); }

static int set_threads(mt_model *m, int threads) {
    if (threads < 1 || threads > 1024) return MT_EINVAL;
    if (m->pool && pool_size(m->pool) == threads) return MT_OK;
    size_t T = (size_t)m->cfg.max_seq_len;
    float *scratch = malloc(sizeof(float) * mt_att_floats((int)T) * (size_t)threads);
    uint64_t *tw = calloc((size_t)threads, sizeof(uint64_t));
    mt_pool *pool = scratch && tw ? pool_create(threads) : NULL;
    if (!pool) { free(scratch); free(tw); return MT_ENOMEM; }
    int old = m->pool ? pool_size(m->pool) : 0;   /* per-thread counts survive a resize */
    for (int t = 0; t < old && t < threads; t++) tw[t] = m->thread_windows[t];
    pool_destroy(m->pool);
    free(m->att_scratch);
    free(m->thread_windows);
    m->pool = pool;
    m->att_scratch = scratch;
    m->thread_windows = tw;
    update_parts(m);
    return MT_OK;
}

int mt_model_set_threads(mt_model *m, int threads) {
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    int rc = set_threads(m, threads);
    mt_model_leave(m);
    return rc;
}

int mt_model_threads(const mt_model *m, int *out) {
    *out = pool_size(m->pool);
    return MT_OK;
}

/* Compute-bound phases gain nothing from more parts than CPUs: extra parts only repeat GEMM
 * packing and add context switches. Threads beyond the parts sleep through the step. */
static void update_parts(mt_model *m) {
    int n = pool_size(m->pool), cpus = mt_cpu_count();
    int p = m->parts_req > 0 ? m->parts_req : (cpus < n ? cpus : n);
    m->parts = p < 1 ? 1 : (p > n ? n : p);
}

int mt_model_set_parts(mt_model *m, int parts) {
    if (parts < 0) return MT_EINVAL;
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    m->parts_req = parts;
    update_parts(m);
    mt_model_leave(m);
    return MT_OK;
}

int mt_model_parts(const mt_model *m, int *out) {
    *out = m->parts;
    return MT_OK;
}

int mt_model_set_chunk_budget(mt_model *m, size_t floats) {
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    m->chunk_budget = floats ? floats : CHUNK_FLOATS;
    free(m->chunk);  /* the next call sizes the chunk afresh from the new budget */
    m->chunk = NULL;
    m->chunk_rows = m->chunk_threads = 0;
    mt_model_leave(m);
    return MT_OK;
}

int mt_model_chunk_budget(const mt_model *m, size_t *out) {
    *out = m->chunk_budget;
    return MT_OK;
}

int mt_model_chunk_rows(const mt_model *m, int *out) {
    *out = m->chunk ? m->chunk_rows : 0;
    return MT_OK;
}

/* The attention options: the rotary table, (pos, i) -> cos and sin of pos * 10000^(-i/half)
 * computed in double, and the primes up to max_seq_len for the Ulam pattern. */
static int attn_prepare(mt_model *m) {
    const mt_config *c = &m->cfg;
    int T = c->max_seq_len, H = c->d_model / c->n_heads / 2;
    m->attn.half = H;
    if (c->position == 1) {
        m->rope = malloc(sizeof(float) * (size_t)T * 2 * (size_t)H);
        if (!m->rope) return MT_ENOMEM;
        for (int pos = 0; pos < T; pos++)
            for (int i = 0; i < H; i++) {
                double ang = pos * pow(10000.0, -(double)i / H);
                m->rope[(size_t)pos * 2 * H + i] = (float)cos(ang);
                m->rope[(size_t)pos * 2 * H + H + i] = (float)sin(ang);
            }
        m->attn.rope = m->rope;
    }
    if (c->attention == 1) {
        m->primes = malloc(sizeof(int) * ((size_t)T + 1));
        if (!m->primes) return MT_ENOMEM;
        int n = 0;
        for (int p = 2; p <= T; p++) {
            int is = 1;
            for (int q = 2; q * q <= p && is; q++) is = p % q != 0;
            if (is) m->primes[n++] = p;
        }
        m->attn.primes = m->primes;
        m->attn.nprimes = n;
        m->attn.ulam = 1;
        m->attn.window = c->attention_window;
    }
    return MT_OK;
}

int mt_model_new(const mt_config *cfg, float *params, float *grads, int threads,
                 mt_model **out) {
    if (!config_ok(cfg) || !params || !grads || threads < 1 || threads > 1024) return MT_EINVAL;
    /* Our threads are the parallelism: OpenBLAS must not start its own inside them. */
    scipy_openblas_set_num_threads(1);
    mt_model *m = calloc(1, sizeof *m);
    if (!m) return MT_ENOMEM;
    m->cfg = *cfg;
    m->nparams = num_params(cfg);
    m->chunk_budget = CHUNK_FLOATS;
    m->params = params; m->grads = grads;
    m->P.h = calloc((size_t)cfg->n_layers, sizeof(mt_block));
    m->G.h = calloc((size_t)cfg->n_layers, sizeof(mt_block));
    if (!m->P.h || !m->G.h || set_threads(m, threads) != MT_OK) {
        mt_model_free(m);
        return MT_ENOMEM;
    }
    make_views(cfg, params, &m->P);
    make_views(cfg, grads, &m->G);
    if (attn_prepare(m) != MT_OK) {
        mt_model_free(m);
        return MT_ENOMEM;
    }
    *out = m;
    return MT_OK;
}

void mt_model_free(mt_model *m) {
    if (!m) return;
    pool_destroy(m->pool);
    free(m->att_scratch);
    free(m->thread_windows);
    acts_free(&m->train);
    acts_free(&m->infer);
    free(m->chunk);
    free(m->P.h);
    free(m->G.h);
    free(m->rope);
    free(m->primes);
    free(m);
}

int mt_counters(const mt_model *m, uint64_t *train_calls, uint64_t *windows) {
    if (train_calls) *train_calls = m->train_calls;
    if (windows) *windows = m->windows;
    return MT_OK;
}

int mt_timer_count(int *out) {
    *out = TK_COUNT;
    return MT_OK;
}

int mt_timer_name(int kind, const char **out) {
    static const char *names[TK_COUNT] = {"embedding", "layernorm", "matmul", "attention",
                                          "gelu", "output+loss", "sync", "other"};
    if (kind < 0 || kind >= TK_COUNT) return MT_EINVAL;
    *out = names[kind];
    return MT_OK;
}

int mt_timer_seconds(const mt_model *m, int kind, double *out) {
    if (kind < 0 || kind >= TK_COUNT) return MT_EINVAL;
    *out = m->timers[kind];
    return MT_OK;
}

static int ids_ok(const int32_t *ids, size_t n, int V) {
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= V) return 0;
    return 1;
}

static int batch_ok(const mt_model *m, const int32_t *inp, const int32_t *tgt, int B, int T) {
    if (B < 1 || T < 1 || T > m->cfg.max_seq_len || (size_t)B * T > (size_t)1 << 30) return 0;
    size_t n = (size_t)B * T;
    return ids_ok(inp, n, m->cfg.vocab_size) && (!tgt || ids_ok(tgt, n, m->cfg.vocab_size));
}

/* offsets: NULL, or nparts+1 window offsets (0 first, B last, non-decreasing) giving thread t
 * the row-local work of windows [offsets[t], offsets[t+1]); the step then runs on nparts
 * threads. */
static int forward_backward(mt_model *m, const int32_t *inputs, const int32_t *targets, int B,
                        int T, float grad_scale, int accumulate, const int32_t *offsets,
                        int nparts, double *loss_out) {
    if (!batch_ok(m, inputs, targets, B, T) || !targets) return MT_EINVAL;
    if (offsets) {
        if (nparts < 1 || nparts > pool_size(m->pool) || offsets[0] != 0 || offsets[nparts] != B)
            return MT_EINVAL;
        for (int t = 0; t < nparts; t++)
            if (offsets[t + 1] < offsets[t]) return MT_EINVAL;
    }
    int N = B * T;
    if (m->train.cap_rows < N && acts_alloc(&m->train, &m->cfg, N, 1) != MT_OK) return MT_ENOMEM;
    if (ensure_chunk(m, N) != MT_OK) return MT_ENOMEM;
    mt_step s = {.m = m, .a = &m->train, .inp = inputs, .tgt = targets, .B = B, .T = T,
                 .mode = STEP_TRAIN, .grad_scale = grad_scale, .accumulate = accumulate};
    m->part_off = offsets;
    pool_run_parts(m->pool, step_task, &s, offsets ? nparts : m->parts);
    m->part_off = NULL;
    double sum = 0.0;
    for (int n = 0; n < N; n++) sum += m->train.losses[n];
    *loss_out = sum / N;
    m->train_calls += 1;
    m->windows += (uint64_t)B;
    return MT_OK;
}

int mt_forward_backward(mt_model *m, const int32_t *inputs, const int32_t *targets, int B,
                        int T, float grad_scale, int accumulate, double *loss_out) {
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    int rc = forward_backward(m, inputs, targets, B, T, grad_scale, accumulate, NULL, 0,
                              loss_out);
    mt_model_leave(m);
    return rc;
}

int mt_forward_backward_parts(mt_model *m, const int32_t *inputs, const int32_t *targets,
                              int B, int T, float grad_scale, int accumulate,
                              const int32_t *offsets, int nparts, double *loss_out) {
    if (!offsets) return MT_EINVAL;
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    int rc = forward_backward(m, inputs, targets, B, T, grad_scale, accumulate, offsets, nparts,
                              loss_out);
    mt_model_leave(m);
    return rc;
}

int mt_thread_windows(const mt_model *m, uint64_t *out, int n) {
    int threads = pool_size(m->pool);
    if (!out || n < threads) return MT_EINVAL;
    for (int t = 0; t < threads; t++) out[t] = m->thread_windows[t];
    return MT_OK;
}

/* Forward-only calls run in groups of whole sequences through the 1-slot buffers. */
static int forward_only_locked(mt_model *m, const int32_t *inp, const int32_t *tgt, int B,
                               int T, int mode, int last_only, float *logits, double *loss_out) {
    if (!batch_ok(m, inp, tgt, B, T)) return MT_EINVAL;
    int per = FORWARD_ONLY_ROWS / T > 0 ? FORWARD_ONLY_ROWS / T : 1;
    if (per > B) per = B;
    if (m->infer.cap_rows < per * T && acts_alloc(&m->infer, &m->cfg, per * T, 0) != MT_OK)
        return MT_ENOMEM;
    if (mode == STEP_LOSS && ensure_chunk(m, per * T) != MT_OK) return MT_ENOMEM;
    double sum = 0.0;
    size_t V = (size_t)m->cfg.vocab_size;
    for (int b = 0; b < B; b += per) {
        int nb = B - b < per ? B - b : per;
        size_t off = (size_t)b * T;
        mt_step s = {.m = m, .a = &m->infer, .inp = inp + off, .tgt = tgt ? tgt + off : NULL,
                     .B = nb, .T = T, .mode = mode, .last_only = last_only};
        if (logits) s.logits = logits + (last_only ? (size_t)b * V : off * V);
        pool_run_parts(m->pool, step_task, &s, m->parts);
        if (mode == STEP_LOSS)
            for (int n = 0; n < nb * T; n++) sum += m->infer.losses[n];
    }
    if (loss_out) *loss_out = sum / ((double)B * T);
    return MT_OK;
}

static int forward_only(mt_model *m, const int32_t *inp, const int32_t *tgt, int B, int T,
                        int mode, int last_only, float *logits, double *loss_out) {
    if (mt_model_enter(m) != MT_OK) return MT_EBUSY;
    int rc = forward_only_locked(m, inp, tgt, B, T, mode, last_only, logits, loss_out);
    mt_model_leave(m);
    return rc;
}

int mt_loss(mt_model *m, const int32_t *inputs, const int32_t *targets, int B, int T,
            double *loss_out) {
    if (!targets) return MT_EINVAL;
    return forward_only(m, inputs, targets, B, T, STEP_LOSS, 0, NULL, loss_out);
}

int mt_forward_logits(mt_model *m, const int32_t *inputs, int B, int T, int last_only,
                      float *logits) {
    return forward_only(m, inputs, NULL, B, T, STEP_LOGITS, last_only, logits, NULL);
}
