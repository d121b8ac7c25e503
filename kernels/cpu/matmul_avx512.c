/* matmul_avx512.c — the GEMM tile (canonical order: matmul.h) for AVX-512 F: the 16 lanes
 * in one zmm accumulator, the tail of k by masked loads. The GEMV and the panel packing are
 * the AVX2 file's: the same bits, and for the GEMV faster than one zmm accumulator a row
 * (one chain of 16 lanes: 27-29 GB/s from L3 on an 8.7 MB matrix, against 31-37 for two
 * chains of 8; the same ~21-27 GB/s from memory, which decode streams from).
 *
 * The tile is 4 x 6: 24 zmm accumulators, the 6 panel vectors of a k-step and one row of x
 * fill 31 of the 32 registers; a k-step loads 10 vectors for 24 FMAs. In L1 it runs at
 * ~105 GFLOP/s on this project's EPYC (Zen 4: one zmm FMA a cycle, 115 GFLOP/s at 3.6 GHz). */
#include <immintrin.h>
#include <string.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx512f,fma,avx2")))
#define INLINE static inline __attribute__((always_inline))
#define MR 4
#define NR 6
#define XPF 12   /* steps of x prefetched ahead */
#define FAR 24576 /* bytes of W asked into L2 ahead of the multi-row GEMV's group of rows */
#define FAR_ROWS 2 /* from this many rows of x */

#include "matmul_zmm.h"

/* ---- GEMM tile: rm x NR outputs over one block of k (matmul.h dg_matmul_kernels.tile) ---- */

TARGET INLINE void tile_rows(const int rm, const float *x, int64_t ldx, const float *panel, int64_t kc,
                             int flags, float *y, int64_t ldy, int nn, const float *bias) {
    const int64_t steps = kc / 16;
    const __mmask16 tail = (__mmask16)((1u << (kc % 16)) - 1);
    __m512 a[MR][NR];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();
    /* one k-step: the panel's NR vectors, then each row of x against them */
#define STEP(s, LOAD_X)                                                                         \
    do {                                                                                        \
        __m512 wv[NR];                                                                          \
        _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                    \
            wv[j] = _mm512_load_ps(panel + ((s) * NR + j) * 16);                                \
        _Pragma("GCC unroll 8") for (int i = 0; i < rm; i++) {                                  \
            const __m512 xv = LOAD_X;                                                           \
            _Pragma("GCC unroll 8") for (int j = 0; j < NR; j++)                                \
                a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);                                  \
        }                                                                                       \
    } while (0)
    for (int64_t s = 0; s < steps; s++) {
        /* x XPF steps ahead, running on into the rows of the next tile: each row of the
         * block is a short stream (4 KiB) the hardware prefetcher starts late on (the
         * 896 x 4864 GEMM ran 8% faster with this) */
        const float *pf = s + XPF < steps ? x + (s + XPF) * 16 : x + rm * ldx + (s + XPF - steps) * 16;
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) _mm_prefetch((const char *)(pf + i * ldx), _MM_HINT_T0);
        STEP(s, _mm512_loadu_ps(x + i * ldx + s * 16));
    }
    if (tail) STEP(steps, _mm512_maskz_loadu_ps(tail, x + i * ldx + steps * 16));
#undef STEP
    zmm_finish(rm, NR, a, flags, y, ldy, nn, bias);
}

ZMM_TILES(float)

/* ---- the GEMV of a few rows of x (matmul.h dg_matmul_kernels.rows_multi) ----
 * The decode step of several sequences (m = 2 .. DG_MATMUL_GEMV_ROWS): a block of 4 weight
 * rows is widened in registers, straight from memory (no panel), and each of 4 rows of x
 * takes it: 16 zmm accumulators, one output each, in the canonical order (the tile's). The
 * GEMM would pack each weight panel for one or two tiles, as costly as the products. A
 * group of fewer than 4 weight or x rows repeats its last one (computed, not stored); x rows
 * past 4 take the same weight rows again, from L1. The next 4 weight rows are prefetched
 * while these are read: four short streams at once (k = 896: 1.8 KB a row) defeat the
 * hardware prefetcher, which made m = 2 cost three times m = 1 on the lm_head. And from
 * FAR_ROWS rows of x on, the group's bytes FAR on are asked into L2 at the same pace (by
 * the first 4 rows of x; the others find the group in L1): with the FMAs of several rows
 * waiting on each load of W the loads did not run far enough ahead of memory (a decode
 * step's products, the small preset's matrices, one thread: 4 rows 72 -> 52 ms, 8 rows
 * 106 -> 87, 2 rows 50 -> 48). */
#define ROWS_MULTI(NAME, T, LOAD)                                                               \
    TARGET static void NAME(float *y, const float *x, int m, const dg_weight *w,               \
                            const float *bias, int64_t r0, int64_t r1, int64_t p0, int64_t p1) { \
        const int64_t k = w->cols, n = w->rows, end = k / 16 * 16, ld = dg_weight_ld(w, p0);    \
        const int tail = (int)(k % 16);                                                         \
        const __mmask16 tmask = (__mmask16)((1u << tail) - 1);                                  \
        const T *w0 = (const T *)dg_weight_at(w, 0, p0) - p0;   /* row r: w0 + r·ld, at [p0, p1) */ \
        for (int64_t rb = r0; rb < r1; rb += 4) {                                               \
            /* the next 4 rows follow these (the span's rows are ld apart, contiguous) */       \
            const char *nxt = rb + 8 <= n ? (const char *)(w0 + (rb + 4) * ld + p0) : NULL;     \
            const T *wr[4];                                                                     \
            T wt[4][16];                                                                        \
            for (int j = 0; j < 4; j++) {                                                       \
                wr[j] = w0 + (rb + j < r1 ? rb + j : r1 - 1) * ld;                              \
                memset(wt[j], 0, sizeof wt[j]);                                                 \
                if (p1 == k) memcpy(wt[j], wr[j] + end, sizeof(T) * (size_t)tail);              \
            }                                                                                   \
            const char *grp = (const char *)(w0 + rb * ld + p0);                                \
            for (int i0 = 0; i0 < m; i0 += 4) {                                                 \
                const int far = m >= FAR_ROWS && i0 == 0;                                       \
                const float *xr[4];                                                             \
                for (int i = 0; i < 4; i++) xr[i] = x + (i0 + i < m ? i0 + i : m - 1) * k;       \
                float s[4][4];                                                                  \
                for (int i = 0; i < 4 && p0; i++)   /* the sums of the blocks before p0 */       \
                    for (int j = 0; j < 4; j++)                                                 \
                        s[i][j] = i0 + i < m && rb + j < r1 ? y[(i0 + i) * n + rb + j] : 0.0f;  \
                for (int64_t k0 = p0; k0 < p1; k0 += DG_MATMUL_KB) {                            \
                    const int64_t k1 = k0 + DG_MATMUL_KB < end ? k0 + DG_MATMUL_KB : end;       \
                    __m512 a[4][4];                                                             \
                    _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++)                         \
                        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) a[i][j] = _mm512_setzero_ps(); \
                    for (int64_t c = k0; c < k1; c += 16) {                                     \
                        /* the next 4 rows at the pace of these: a step's share */              \
                        for (int l = 0; l < (int)sizeof(T) && nxt; l++)                         \
                            _mm_prefetch(nxt + ((c - p0) / 16 * (int)sizeof(T) + l) * 64, _MM_HINT_T0); \
                        if (far)                                                                \
                            for (int l = 0; l < (int)sizeof(T); l++)                            \
                                _mm_prefetch(grp + ((c - p0) / 16 * (int)sizeof(T) + l) * 64 + FAR, _MM_HINT_T1); \
                        __m512 wv[4];                                                           \
                        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = LOAD(wr[j] + c); \
                        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {                   \
                            const __m512 xv = _mm512_loadu_ps(xr[i] + c);                       \
                            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                 \
                                a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);                  \
                        }                                                                       \
                    }                                                                           \
                    if (tail && k0 + DG_MATMUL_KB >= k) {                                       \
                        __m512 wv[4];                                                           \
                        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) wv[j] = LOAD(wt[j]); \
                        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {                   \
                            const __m512 xv = _mm512_maskz_loadu_ps(tmask, xr[i] + end);        \
                            _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)                 \
                                a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);                  \
                        }                                                                       \
                    }                                                                           \
                    for (int i = 0; i < 4; i++)                                                 \
                        for (int j = 0; j < 4; j++)                                             \
                            s[i][j] = k0 == 0 ? zmm_reduce(a[i][j]) : s[i][j] + zmm_reduce(a[i][j]); \
                }                                                                               \
                for (int i = 0; i < 4 && i0 + i < m; i++)                                       \
                    for (int j = 0; j < 4 && rb + j < r1; j++)                                  \
                        y[(i0 + i) * n + rb + j] = p1 == k && bias ? s[i][j] + bias[rb + j] : s[i][j]; \
            }                                                                                   \
        }                                                                                       \
    }

TARGET INLINE __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
TARGET INLINE __m512 load16_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
TARGET INLINE __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }

ROWS_MULTI(rows_multi_bf16, uint16_t, load16_bf16)
ROWS_MULTI(rows_multi_f16, uint16_t, load16_f16)
ROWS_MULTI(rows_multi_f32, float, load16_f32)

static void rows_multi(float *y, const float *x, int m, const dg_weight *w, const float *bias, int64_t r0,
                       int64_t r1, int64_t p0, int64_t p1) {
    if (w->dtype == DG_DTYPE_BF16) rows_multi_bf16(y, x, m, w, bias, r0, r1, p0, p1);
    else if (w->dtype == DG_DTYPE_F16) rows_multi_f16(y, x, m, w, bias, r0, r1, p0, p1);
    else rows_multi_f32(y, x, m, w, bias, r0, r1, p0, p1);
}

const dg_matmul_kernels dg_matmul_avx512 = {MR, NR, dg_matmul_rows_avx2, rows_multi, dg_matmul_pack_avx2, tile};

/* ---- the fp32 panel order's tile (dg_matmul_panel_f32_tile, matmul.h) ----
 * As the bf16 one (matmul_bf16.c): rm <= 6 rows of x against a panel of up to 64 rows, 4
 * zmm accumulators a row; a step is a pair of columns: W's 4 vectors of pairs widened into
 * 4 of even and 4 of odd columns (a shift, an and), then per row x's two values broadcast
 * and 8 FMAs, the even column first. 48 FMAs, 4 loads, 8 widenings and 12 broadcasts a
 * step at rm = 6. The DiT's and the tower's shapes at one thread, W from memory: 109-114
 * GFLOP/s (the FMA's limit is ~115), where the canonical order's GEMM ran at 94-107
 * (engine/MODELS.md). */
#include "matmul_panel_zmm.h"

/* The steps, W's vectors loaded whole (full) or under mk (panel_load). */
TARGET INLINE void panel_steps(const int rm, const int full, __m512 a[][PNV], const float *x, int64_t ldx,
                               const uint32_t *panel, int np, int64_t steps, const __mmask16 mk[PNV]) {
    const __m512i odd = _mm512_set1_epi32((int)0xffff0000u);
    for (int64_t s = 0; s < steps; s++) {
        __m512 we[PNV], wo[PNV];
#pragma GCC unroll 4
        for (int v = 0; v < PNV; v++) {
            const __m512i d = panel_load(full, mk[v], panel + s * np + 16 * v);
            we[v] = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
            wo[v] = _mm512_castsi512_ps(_mm512_and_si512(d, odd));
        }
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512 xe = _mm512_set1_ps(x[i * ldx + 2 * s]), xo = _mm512_set1_ps(x[i * ldx + 2 * s + 1]);
#pragma GCC unroll 4
            for (int v = 0; v < PNV; v++) a[i][v] = _mm512_fmadd_ps(xo, wo[v], _mm512_fmadd_ps(xe, we[v], a[i][v]));
        }
    }
}

PANEL_TILES(float)

const dg_matmul_panel_f32_tile dg_matmul_panel_f32_avx512 = panel_tile;
