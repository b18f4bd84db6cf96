/* The training step: forward, loss and backward of one micro-batch, run by every pool thread.
 * The forward pass is forward.c's (shared with decoding), here split by rows; evaluation and
 * mt_forward_logits run the same forward without the backward pass.
 *
 * Ownership (what each thread writes, so no locks and no float atomics):
 *   rows    [r0,r1) of every (N,*) activation and row-local gradient (LayerNorm, GEMM dinp,
 *           GELU) -- the same rows in every phase, so row-local phases need no barrier;
 *   items   (batch, head) pairs of attention;
 *   columns / output rows of each weight gradient: each thread sums its slice over all N rows
 *           in a fixed order (GEMM over the whole batch, then bias/LayerNorm sums in row order).
 * A barrier separates a phase that writes something from the next that reads other threads'
 * part of it. Memory-saving recomputation: LayerNorm outputs and GELU outputs are rebuilt in
 * the backward pass from the cached statistics / pre-activations instead of being stored. */
#include <string.h>
#include "mt_internal.h"

static float *att_scratch(const mt_model *m, int tid) {
    return m->att_scratch + (size_t)tid * mt_att_floats(m->cfg.max_seq_len);
}

/* Attention of one layer in training and evaluation: this thread's (window, head) items. */
static void attend_windows(const mt_fwd *f, int l, int h0, int h1) {
    (void)h0; (void)h1;
    const mt_step *s = f->ctx;
    mt_block_acts *A = &s->a->slot[s->a->training ? l : 0];
    int C = f->m->cfg.d_model, NH = f->m->cfg.n_heads, r0, r1, i0, i1;
    mt_split_rows(f->m, s->B, s->T, NH, f->tid, f->nt, &r0, &r1, &i0, &i1);
    float *att = att_scratch(f->m, f->tid);
    for (int i = i0; i < i1; i++)
        attention_forward_item(A->atty, A->lse, A->qkv, i / NH, i % NH, s->T, C, NH, att,
                               &f->m->attn);
}

/* The forward pass (forward.c's blocks) over this thread's rows of the batch. */
static void forward(mt_step *s, int tid, int nt) {
    mt_model *m = s->m;
    mt_acts *a = s->a;
    int C = m->cfg.d_model, NH = m->cfg.n_heads, L = m->cfg.n_layers, T = s->T;
    int r0, r1, i0, i1;
    mt_split_rows(m, s->B, T, NH, tid, nt, &r0, &r1, &i0, &i1);
    mt_fwd f = {.m = m, .tid = tid, .nt = nt, .n = s->B * T, .r0 = r0, .r1 = r1, .cols = 0,
                .timed = 1, .attend = attend_windows, .ctx = s};

    mt_tick(m, tid, TK_EMBEDDING);
    for (int n = r0; n < r1; n++)   /* positions restart with every window */
        embed_row(a->slot[0].x + (size_t)n * C, s->inp[n], n % T, &m->P, C);
    for (int l = 0; l < L; l++) {
        mt_block_acts *A = &a->slot[a->training ? l : 0];
        /* Block output: next slot's input, or xL; forward-only overwrites x in place. */
        float *xn = a->training ? (l + 1 < L ? a->slot[l + 1].x : a->xL) : A->x;
        mt_block_io io = {.x = A->x, .xn = xn, .ln = a->lnbuf, .mean1 = A->ln1_mean,
                          .rstd1 = A->ln1_rstd, .mean2 = A->ln2_mean, .rstd2 = A->ln2_rstd,
                          .qkv = A->qkv, .atty = A->atty, .res2 = A->res2, .fch = A->fch,
                          .gelu = a->G};
        block_forward(&f, l, &io);
    }
    mt_tick(m, tid, TK_LAYERNORM);
    layernorm_rows(&f, a->lnf, a->lnf_mean, a->lnf_rstd, a->xL, m->P.lnfw, m->P.lnfb);
    mt_sync(m, tid);
}

static void backward(mt_step *s, int tid, int nt) {
    mt_model *m = s->m;
    mt_acts *a = s->a;
    int C = m->cfg.d_model, F = m->cfg.d_ff, NH = m->cfg.n_heads, L = m->cfg.n_layers;
    int V = m->cfg.vocab_size, T = s->T, N = s->B * T;
    int r0, r1, i0, i1, c0, c1, q0, q1, f0, f1;
    mt_split_rows(m, s->B, T, NH, tid, nt, &r0, &r1, &i0, &i1);
    /* Weight-gradient slices: under a partition with more threads than CPUs (thread mode,
     * 11 workers on 2 cores), only the first CPUs-many threads take slices -- fewer, larger
     * GEMMs; the sums per output row are the same whatever the split. */
    int nw = m->part_off && nt > mt_cpu_count() ? mt_cpu_count() : nt, tw = tid < nw ? tid : nw;
    mt_split(C, tw, nw, 16, &c0, &c1);
    mt_split(3 * C, tw, nw, 16, &q0, &q1);
    mt_split(F, tw, nw, 16, &f0, &f1);
    int nr = r1 - r0;
    size_t rc = (size_t)r0 * C, rf = (size_t)r0 * F;
    float *att = att_scratch(m, tid), *datt = att + (size_t)m->cfg.max_seq_len * m->cfg.max_seq_len;

    /* final LayerNorm: dlnf is in a->dln (written by the output layer) */
    mt_tick(m, tid, TK_LAYERNORM);
    memset(a->dresid + rc, 0, sizeof(float) * (size_t)nr * C);
    layernorm_backward_dx(a->dresid + rc, a->dln + rc, a->xL + rc, m->P.lnfw, a->lnf_mean + r0,
                          a->lnf_rstd + r0, nr, C);
    layernorm_backward_dparams(m->G.lnfw, m->G.lnfb, a->dln, a->xL, a->lnf_mean, a->lnf_rstd,
                               N, C, c0, c1);
    mt_sync(m, tid);
    for (int l = L - 1; l >= 0; l--) {
        mt_block_acts *A = &a->slot[l];
        const mt_block *W = &m->P.h[l];
        mt_block *D = &m->G.h[l];
        /* MLP out: x_next = res2 + gelu(fch) @ Wfcproj^T + b; dresid holds d x_next.
         * G = gelu(fch) again, and fch (not needed after this layer) becomes gelu'(fch). */
        mt_tick(m, tid, TK_GELU);
        gelu_forward_slope(a->G + rf, A->fch + rf, (size_t)nr * F);
        mt_sync(m, tid);
        mt_tick(m, tid, TK_MATMUL);
        matmul_backward_dweight_rows(D->fcprojw, D->fcprojb, a->dresid, a->G, N, F, C, c0, c1);
        mt_sync(m, tid);
        matmul_backward_dinp_rows(a->G, a->dresid, W->fcprojw, r0, r1, F, C);
        mt_tick(m, tid, TK_GELU);
        vec_mul_inplace(a->G + rf, A->fch + rf, (size_t)nr * F);
        mt_tick(m, tid, TK_LAYERNORM);
        layernorm_apply(a->lnbuf + rc, A->res2 + rc, W->ln2w, W->ln2b, A->ln2_mean + r0,
                        A->ln2_rstd + r0, nr, C);
        mt_sync(m, tid);
        /* MLP in: fch = ln2(res2) @ Wfc^T + b; G now holds d fch. */
        mt_tick(m, tid, TK_MATMUL);
        matmul_backward_dweight_rows(D->fcw, D->fcb, a->G, a->lnbuf, N, C, F, f0, f1);
        matmul_backward_dinp_rows(a->dln, a->G, W->fcw, r0, r1, C, F);
        mt_tick(m, tid, TK_LAYERNORM);
        layernorm_backward_dx(a->dresid + rc, a->dln + rc, A->res2 + rc, W->ln2w,
                              A->ln2_mean + r0, A->ln2_rstd + r0, nr, C);
        mt_sync(m, tid);
        /* dresid now holds d res2. Attention out: res2 = x + atty @ Wproj^T + b. */
        mt_tick(m, tid, TK_LAYERNORM);
        layernorm_backward_dparams(D->ln2w, D->ln2b, a->dln, A->res2, A->ln2_mean, A->ln2_rstd,
                                   N, C, c0, c1);
        mt_tick(m, tid, TK_MATMUL);
        matmul_backward_dweight_rows(D->projw, D->projb, a->dresid, A->atty, N, C, C, c0, c1);
        matmul_backward_dinp_rows(a->datty, a->dresid, W->projw, r0, r1, C, C);
        mt_tick(m, tid, TK_OTHER);
        memset(a->dqkv + 3 * rc, 0, sizeof(float) * (size_t)nr * 3 * C);
        mt_tick(m, tid, TK_LAYERNORM);
        layernorm_apply(a->lnbuf + rc, A->x + rc, W->ln1w, W->ln1b, A->ln1_mean + r0,
                        A->ln1_rstd + r0, nr, C);
        mt_sync(m, tid);
        mt_tick(m, tid, TK_ATTENTION);
        for (int i = i0; i < i1; i++)
            attention_backward_item(a->dqkv, a->datty, A->qkv, A->lse, i / NH, i % NH, T, C, NH,
                                    att, datt, &m->attn);
        mt_sync(m, tid);
        /* qkv = ln1(x) @ Wqkv^T + b */
        mt_tick(m, tid, TK_MATMUL);
        matmul_backward_dweight_rows(D->qkvw, D->qkvb, a->dqkv, a->lnbuf, N, C, 3 * C, q0, q1);
        matmul_backward_dinp_rows(a->dln, a->dqkv, W->qkvw, r0, r1, C, 3 * C);
        mt_tick(m, tid, TK_LAYERNORM);
        layernorm_backward_dx(a->dresid + rc, a->dln + rc, A->x + rc, W->ln1w,
                              A->ln1_mean + r0, A->ln1_rstd + r0, nr, C);
        mt_sync(m, tid);
        layernorm_backward_dparams(D->ln1w, D->ln1b, a->dln, A->x, A->ln1_mean, A->ln1_rstd,
                                   N, C, c0, c1);
    }
    /* embedding: dresid is d x0. Token rows split by vocabulary id, positions by t; each
     * row sums its contributions in position order. */
    mt_tick(m, tid, TK_EMBEDDING);
    int v0, v1, t0, t1;
    mt_split(V, tid, nt, 1, &v0, &v1);
    mt_split(T, tid, nt, 1, &t0, &t1);
    for (int n = 0; n < N; n++) {
        int tok = s->inp[n];
        if (tok < v0 || tok >= v1) continue;
        const float *g = a->dresid + (size_t)n * C;
        float *d = m->G.wte + (size_t)tok * C;
        for (int i = 0; i < C; i++) d[i] += g[i];
    }
    for (int n = 0; n < N && m->G.wpe; n++) {   /* no table under rotary positions */
        int t = n % T;
        if (t < t0 || t >= t1) continue;
        const float *g = a->dresid + (size_t)n * C;
        float *d = m->G.wpe + (size_t)t * C;
        for (int i = 0; i < C; i++) d[i] += g[i];
    }
}

void step_task(void *ctx, int tid, int pool_threads) {
    mt_step *s = ctx;
    mt_model *m = s->m;
    /* Runs on the model's m->parts active threads (pool_run_parts); the split is by them. */
    int nt = pool_threads;
    mt_acts *a = s->a;
    int C = m->cfg.d_model, V = m->cfg.vocab_size, N = s->B * s->T;
    if (tid == 0) {
        m->t_last = mt_now();
        m->t_kind = TK_OTHER;
    }
    if (s->mode == STEP_TRAIN && !s->accumulate) {
        size_t p0 = m->nparams * (size_t)tid / nt, p1 = m->nparams * (size_t)(tid + 1) / nt;
        memset(m->grads + p0, 0, sizeof(float) * (p1 - p0));
    }
    forward(s, tid, nt);
    if (s->mode == STEP_LOGITS) {
        mt_tick(m, tid, TK_OUTPUT);
        if (s->last_only) {
            int b0, b1;
            mt_split(s->B, tid, nt, 1, &b0, &b1);
            for (int b = b0; b < b1; b++) {
                size_t row = (size_t)b * s->T + s->T - 1;
                matmul_forward_rows(s->logits + (size_t)b * V, a->lnf + row * C, m->P.lm, NULL,
                                    NULL, 0, 1, C, V);
            }
        } else {
            int r0, r1;
            mt_split(N, tid, nt, 8, &r0, &r1);
            matmul_forward_rows(s->logits, a->lnf, m->P.lm, NULL, NULL, r0, r1, C, V);
        }
        mt_tick(m, tid, TK_OTHER);
        return;
    }
    int train = s->mode == STEP_TRAIN;
    output_layer_chunked(m, tid, nt, a->lnf, m->P.lm, train ? m->G.lm : NULL,
                         train ? a->dln : NULL, s->tgt, a->losses, m->chunk, m->chunk_rows, N,
                         C, V, s->grad_scale);
    if (train) {
        backward(s, tid, nt);
        /* Windows this thread's row-local phases covered (those starting in its rows); each
         * thread writes only its own counter. */
        int r0, r1, i0, i1;
        mt_split_rows(m, s->B, s->T, m->cfg.n_heads, tid, nt, &r0, &r1, &i0, &i1);
        m->thread_windows[tid] += (uint64_t)((r1 + s->T - 1) / s->T - (r0 + s->T - 1) / s->T);
    }
    mt_tick(m, tid, TK_OTHER);
}
