/* Fixed-order products for decoding: the linear layers, the attention scores and the
 * attention's weighted sum of values, computed so that a row's result depends on that row's
 * data alone -- never on how many rows are computed together, how they are tiled, how the
 * columns are split among threads, or which code path (AVX2 or portable) runs.
 *
 * The arithmetic, one definition for every path:
 *   dot(a, b, n): eight lane sums acc[l] = fma(a[k], b[k], acc[l]) over k = l, l+8, ... in
 *   increasing k (the last chunk of 8 padded with zeros), then
 *   ((acc0 + acc1) + (acc2 + acc3)) + ((acc4 + acc5) + (acc6 + acc7)).
 *   linear: out[r,o] = dot(inp[r], w[o]) + pre, pre = add[r,o] + bias[o] (either may be absent).
 *   fma_row: y[i] = fma(a, x[i], y[i]).
 * Every product is a fused multiply-add (one rounding) and every sum is in the order above,
 * so the AVX2 kernels (4 rows x 3 columns of accumulators; 3, 2 or 1 rows x 4 columns for
 * the rows left over; fewer columns at the edges) and the
 * portable one (fmaf per lane) give bitwise the same floats. This is what OpenBLAS does not
 * promise: its sgemm rounds a row differently depending on the matrix shape (kernel and edge
 * paths), and sgemv differs from sgemm.
 *
 * Speed: the weights are tiled (a block of LIN_COLS output rows is reused from cache across
 * all rows of the batch, ROWS rows at a time), so a batch of rows reads the weights from memory
 * once, and (with more than one group of rows) the block two ahead is prefetched a share at
 * every tile, so that reading it overlaps all of the current block's work; up to four rows are
 * a matrix-vector product bound by memory bandwidth like sgemv, prefetching the next block as
 * they go. */
#include <math.h>
#include "mt_internal.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MT_HAVE_AVX2_PATH 1
#endif

#define LIN_COLS 12   /* output rows of the weights per block (12 x IC floats stay in L1/L2) */
#define ROWS 4        /* rows per tile: 4 x 3 accumulators + 3 + 1 loaded = 16 ymm registers */

/* ---- portable path ------------------------------------------------------------------------ */

static inline float reduce8(const float *acc) {
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

static float dot_portable(const float *a, const float *b, int n) {
    float acc[8] = {0};
    int k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++) acc[l] = fmaf(a[k + l], b[k + l], acc[l]);
    if (k < n)
        for (int l = 0; l < 8; l++) {
            float x = k + l < n ? a[k + l] : 0.0f, y = k + l < n ? b[k + l] : 0.0f;
            acc[l] = fmaf(x, y, acc[l]);
        }
    return reduce8(acc);
}

static inline float pre_value(const float *bias, const float *add, int r, int o, int OC) {
    if (add && bias) return add[(size_t)r * OC + o] + bias[o];
    if (bias) return bias[o];
    return add ? add[(size_t)r * OC + o] : 0.0f;
}

static void linear_portable(float *out, const float *inp, const float *w, const float *bias,
                            const float *add, int n, int IC, int OC, int o0, int o1) {
    for (int r = 0; r < n; r++)
        for (int o = o0; o < o1; o++) {
            float pre = pre_value(bias, add, r, o, OC);
            out[(size_t)r * OC + o] = dot_portable(inp + (size_t)r * IC, w + (size_t)o * IC, IC) + pre;
        }
}

/* ---- AVX2 + FMA path ---------------------------------------------------------------------- */
#ifdef MT_HAVE_AVX2_PATH
#define AVX2 __attribute__((target("avx2,fma")))

/* Lanes 0..7 -> ((0+1)+(2+3)) + ((4+5)+(6+7)), as reduce8. */
AVX2 static inline float hsum8(__m256 v) {
    __m256 h = _mm256_hadd_ps(v, v);   /* [0+1, 2+3, 0+1, 2+3 | 4+5, 6+7, 4+5, 6+7] */
    h = _mm256_hadd_ps(h, h);          /* [(0+1)+(2+3) ... | (4+5)+(6+7) ...] */
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

/* Four hsum8 at once: lane c = hsum8(a[c]), in the same order (hadd pairs neighbours within
 * each 128-bit half; the halves are added last). */
AVX2 static inline __m128 hsum8x4(const __m256 *a) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* Mask with the first `rem` (1..7) lanes set: the zero-padded last chunk. */
AVX2 static inline __m256i tail_mask(int rem) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(rem), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

AVX2 static float dot_avx2(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    if (k < n) {
        __m256i m = tail_mask(n - k);
        acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + k, m), _mm256_maskload_ps(b + k, m), acc);
    }
    return hsum8(acc);
}

/* R rows x NC columns of dot products (R <= 4, NC <= 4, R x NC <= 12): rows x[0..R) (stride
 * IC), weight rows w[0..NC) (stride IC); results into res[r*4 + c]. Inlined with constant R, NC
 * so that the accumulators live in registers; each accumulator sees exactly dot_avx2's
 * operations, so the tile shape never changes a result. Registers (16 ymm): the R x NC
 * accumulators, the smaller side's vectors held for the whole chunk of 8, and one vector of
 * the other side streamed through them (4 x 3: 12 + 3 + 1) -- holding both sides would spill
 * accumulators to the stack and chain every chunk through a store and a load. */
AVX2 static inline __attribute__((always_inline)) void tile(const float *x, const float *w,
                                                            const float *pf, int IC, int R,
                                                            int NC, float *res) {
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < NC; c++) acc[r][c] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= IC; k += 8) {
        if (pf && !(k & 15))
            for (int c = 0; c < NC; c++) _mm_prefetch((const char *)(pf + (size_t)c * IC + k), _MM_HINT_T0);
        if (NC <= R) {   /* hold the weight vectors, stream the rows */
            __m256 wv[4];
            for (int c = 0; c < NC; c++) wv[c] = _mm256_loadu_ps(w + (size_t)c * IC + k);
            for (int r = 0; r < R; r++) {
                __m256 xv = _mm256_loadu_ps(x + (size_t)r * IC + k);
                for (int c = 0; c < NC; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
            }
        } else {         /* hold the rows, stream the weight vectors */
            __m256 xv[4];
            for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + (size_t)r * IC + k);
            for (int c = 0; c < NC; c++) {
                __m256 wv = _mm256_loadu_ps(w + (size_t)c * IC + k);
                for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
    }
    if (k < IC) {
        __m256i m = tail_mask(IC - k);
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_maskload_ps(x + (size_t)r * IC + k, m);
            for (int c = 0; c < NC; c++)
                acc[r][c] = _mm256_fmadd_ps(xv, _mm256_maskload_ps(w + (size_t)c * IC + k, m),
                                            acc[r][c]);
        }
    }
    if (NC == 4) {
        for (int r = 0; r < R; r++) _mm_storeu_ps(res + r * 4, hsum8x4(acc[r]));
    } else if (R == 4) {   /* four rows of one column at once: lane r = hsum8(acc[r][c]) */
        for (int c = 0; c < NC; c++) {
            __m256 col[4] = {acc[0][c], acc[1][c], acc[2][c], acc[3][c]};
            float t[4];
            _mm_storeu_ps(t, hsum8x4(col));
            for (int r = 0; r < 4; r++) res[r * 4 + c] = t[r];
        }
    } else {
        for (int r = 0; r < R; r++)
            for (int c = 0; c < NC; c++) res[r * 4 + c] = hsum8(acc[r][c]);
    }
}

/* Tiles of a group of R rows (R = 4 while four rows remain, then the 1-3 left): 4 x 3
 * (each weight vector reused by four rows from a register), 3/2/1 x 4 (a single row is a
 * matrix-vector product: four weight streams in flight); 1 column at the right edge. Returns
 * the columns done. */
AVX2 static int tile_any(const float *x, const float *w, const float *pf, int IC, int R, int cols,
                         float *res) {
    switch (R) {
    case 4:
        if (cols >= 3) { tile(x, w, pf, IC, 4, 3, res); return 3; }
        tile(x, w, pf, IC, 4, 1, res);
        return 1;
    case 3:
        if (cols >= 4) { tile(x, w, pf, IC, 3, 4, res); return 4; }
        tile(x, w, pf, IC, 3, 1, res);
        return 1;
    case 2:
        if (cols >= 4) { tile(x, w, pf, IC, 2, 4, res); return 4; }
        tile(x, w, pf, IC, 2, 1, res);
        return 1;
    default:
        if (cols >= 4) { tile(x, w, pf, IC, 1, 4, res); return 4; }
        tile(x, w, pf, IC, 1, 1, res);
        return 1;
    }
}

/* Prefetch distance and target: the block two ahead into L2 (measured against one ahead into
 * L1 and three or four ahead: docs/BENCHMARKS.md, "Spread prefetch"). */
#define PF_AHEAD 2
#define PF_HINT _MM_HINT_T1

AVX2 static void linear_avx2(float *out, const float *inp, const float *w, const float *bias,
                             const float *add, int n, int IC, int OC, int o0, int o1) {
    float res[16];
    int groups = (n + ROWS - 1) / ROWS;
    for (int b0 = o0; b0 < o1; b0 += LIN_COLS) {
        int b1 = o1 - b0 < LIN_COLS ? o1 : b0 + LIN_COLS;
        /* Several row groups: the block PF_AHEAD blocks ahead (contiguous weight rows) is
         * prefetched a share at every tile of this block, so that its reads from memory
         * overlap all of this block's work rather than only its first rows' (which stalled on
         * memory for about three times their arithmetic at 16 rows). One group (up to ROWS
         * rows, a matrix-vector product): its tiles prefetch the next block into L1 as they
         * go, interleaved with their loads, which measured faster there. */
        const char *pf = NULL;
        size_t lines = 0, sent = 0;
        int pb = b0 + PF_AHEAD * LIN_COLS;
        if (groups > 1 && pb < o1) {
            int pe = o1 - pb < LIN_COLS ? o1 : pb + LIN_COLS;
            pf = (const char *)(w + (size_t)pb * IC);
            lines = ((size_t)(pe - pb) * IC * sizeof(float) + 63) / 64;
        }
        size_t tiles = (size_t)groups * (size_t)((b1 - b0 + 2) / 3), t = 0;
        for (int r = 0; r < n;) {
            int R = n - r >= ROWS ? ROWS : n - r;
            for (int o = b0; o < b1;) {
                size_t upto = lines * ++t / tiles;
                for (; sent < upto && sent < lines; sent++) _mm_prefetch(pf + sent * 64, PF_HINT);
                const float *near = groups == 1 && o + LIN_COLS < o1 ? w + (size_t)(o + LIN_COLS) * IC : NULL;
                int NC = tile_any(inp + (size_t)r * IC, w + (size_t)o * IC, near, IC, R, b1 - o, res);
                for (int i = 0; i < R; i++)
                    for (int c = 0; c < NC; c++) {
                        float pre = pre_value(bias, add, r + i, o + c, OC);
                        out[(size_t)(r + i) * OC + o + c] = res[i * 4 + c] + pre;
                    }
                o += NC;
            }
            r += R;
        }
        for (; sent < lines; sent++) _mm_prefetch(pf + sent * 64, PF_HINT);
    }
}

AVX2 static void fma_row_avx2(float *y, float a, const float *x, int n) {
    __m256 av = _mm256_set1_ps(a);
    int i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

/* Four keys' dot products with q at once: each accumulator sees exactly dot_avx2's
 * operations (fma(a, b, c) = fma(b, a, c): the product is exact before its one rounding), and
 * hsum8x4 reduces each as hsum8 does. */
AVX2 static void dots_avx2(float *out, const float *q, const float *k, int ldk, int nk, int n,
                           float scale) {
    int j = 0;
    for (; j + 4 <= nk; j += 4) {
        const float *k0 = k + (size_t)j * ldk;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            for (int c = 0; c < 4; c++)
                acc[c] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + (size_t)c * ldk + i), acc[c]);
        }
        if (i < n) {
            __m256i m = tail_mask(n - i);
            __m256 qv = _mm256_maskload_ps(q + i, m);
            for (int c = 0; c < 4; c++)
                acc[c] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + (size_t)c * ldk + i, m), acc[c]);
        }
        float t[4];
        _mm_storeu_ps(t, hsum8x4(acc));
        for (int c = 0; c < 4; c++) out[j + c] = scale * t[c];
    }
    for (; j < nk; j++) out[j] = scale * dot_avx2(q, k + (size_t)j * ldk, n);
}

/* y = sum over keys of a[j] v[j], as fma_row_avx2 key after key, with up to 64 floats of y in
 * registers across all keys (the same fused multiply-adds in the same order per element). */
AVX2 static void weighted_sum_avx2(float *y, const float *a, const float *v, int ldv, int nk,
                                   int n) {
    int d0 = 0;
    for (; d0 + 64 <= n; d0 += 64) {
        __m256 acc[8];
        for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
        for (int j = 0; j < nk; j++) {
            __m256 av = _mm256_set1_ps(a[j]);
            const float *vj = v + (size_t)j * ldv + d0;
            for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(av, _mm256_loadu_ps(vj + 8 * c), acc[c]);
        }
        for (int c = 0; c < 8; c++) _mm256_storeu_ps(y + d0 + 8 * c, acc[c]);
    }
    if (d0 < n) {   /* the rest (fewer than 64): key after key, as before */
        for (int d = d0; d < n; d++) y[d] = 0.0f;
        for (int j = 0; j < nk; j++) fma_row_avx2(y + d0, a[j], v + (size_t)j * ldv + d0, n - d0);
    }
}

static int use_avx2(void) {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int use_avx2(void) { return 0; }
#endif

/* ---- entry points --------------------------------------------------------------------------- */

float dot_fixed(const float *a, const float *b, int n) {
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2()) return dot_avx2(a, b, n);
#endif
    return dot_portable(a, b, n);
}

void fma_row(float *y, float a, const float *x, int n) {
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2()) { fma_row_avx2(y, a, x, n); return; }
#endif
    for (int i = 0; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}

void dots_fixed(float *out, const float *q, const float *k, int ldk, int nk, int n,
                float scale) {
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2()) { dots_avx2(out, q, k, ldk, nk, n, scale); return; }
#endif
    for (int j = 0; j < nk; j++) out[j] = scale * dot_portable(q, k + (size_t)j * ldk, n);
}

void weighted_sum_fixed(float *y, const float *a, const float *v, int ldv, int nk, int n) {
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2()) { weighted_sum_avx2(y, a, v, ldv, nk, n); return; }
#endif
    for (int d = 0; d < n; d++) y[d] = 0.0f;
    for (int j = 0; j < nk; j++) fma_row(y, a[j], v + (size_t)j * ldv, n);
}

void linear_fixed(float *out, const float *inp, const float *w, const float *bias,
                  const float *add, int n, int IC, int OC, int o0, int o1) {
    if (n <= 0 || o1 <= o0) return;
#ifdef MT_HAVE_AVX2_PATH
    if (use_avx2()) { linear_avx2(out, inp, w, bias, add, n, IC, OC, o0, o1); return; }
#endif
    linear_portable(out, inp, w, bias, add, n, IC, OC, o0, o1);
}

void linear_fixed_portable(float *out, const float *inp, const float *w, const float *bias,
                           const float *add, int n, int IC, int OC, int o0, int o1) {
    if (n > 0 && o1 > o0) linear_portable(out, inp, w, bias, add, n, IC, OC, o0, o1);
}
