/* matmul_bf16.c — the bf16 compute order's kernels (matmul.h) for AVX-512 BF16: VDPBF16PS
 * (_mm512_dpbf16_ps) is the order's step 1, sixteen lanes of two products in one zmm
 * accumulator; the rounding of x (step 0) is VCVTNEPS2BF16. Neither reads MXCSR, so the
 * results do not depend on the thread's floating-point mode.
 *
 * The GEMM tile reads W from a packed panel, the GEMV of 1 .. 8 rows of x where it lies;
 * both end in the same reduction (zmm_finish, matmul_zmm.h). The tile is 4 x 6, as the fp32 AVX-512
 * tile: 24 zmm accumulators, the 6 panel vectors of a step and a row of x in 31 of the 32
 * registers; a step loads 10 vectors for 24 VDPBF16PS. In L1 it runs at ~210 GFLOP/s on
 * this project's EPYC (Zen 4, one thread), the fp32 tile at ~108: a VDPBF16PS does the
 * work of two FMAs in the same time. 4 x 6, 6 x 4, 5 x 5 and 8 x 3 measured within 5% of
 * each other, 3 x 8 (33 registers: spills) 20% below. */
#include <immintrin.h>
#include <string.h>

#include "matmul.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,avx512vl,avx2,fma")))
#define INLINE static inline __attribute__((always_inline))
#define MR 4
#define NR 6
#define XPF 12   /* steps of x prefetched ahead in the tile */
#define ROWS_X 8 /* the most rows of x the core takes (DG_MATMUL_GEMV_ROWS) */
#define FAR 24576  /* bytes of W asked into L2 ahead of the GEMV's rows, at 3 or more rows of x */

#include "matmul_zmm.h"

/* ---- step 0 (dg_matmul_bf16_kernels.round) ---- */

TARGET static void round_rows(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int m, int64_t kc) {
    const int64_t kp = (kc + 31) / 32 * 32;
    for (int i = 0; i < m; i++)
        for (int64_t c = 0; c < kp; c += 16) {
            const int64_t left = kc - c;
            const __mmask16 mask = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + i * ldx + c));
            _mm256_store_si256((__m256i *)(xb + i * ldxb + c), (__m256i)h);
        }
}

/* ---- the GEMV's accumulation: step 1 for rm rows of x and g rows of W ---- */

/* a[i][j] over `steps` steps of 32 columns: x row i at x + i·ldx (rounded, zero past the
 * block's columns), W row j from w[j] where it lies; then, when tail != 0, one more step
 * whose W is loaded under the mask tail (the columns past k are not read). pf, when not
 * NULL: the next group's g rows (the same columns), prefetched g lines a step, row after
 * row, as one stream at the pace of these (the hardware prefetcher follows several short
 * interleaved streams badly: M = 8 over two rows took 1.6x as long without it). From 3
 * rows of x on, each row of W also asks for its line FAR bytes on into L2, a step: each
 * load of W then holds 3-8 products in the scheduler, which fills before the loads run far
 * enough ahead of memory for the hardware prefetcher to keep up, and compute and memory
 * took turns instead of overlapping (a decode step's products at 8 rows of x 66 -> 50 ms,
 * 6 rows 59 -> 41, 4 rows 50 -> 44; 16-32 KiB ahead measured alike, 8 KiB 1.1x, 2-4 KiB
 * little better than none; into L1 at 16 KiB 1.2x slower than none). At 1 and 2 rows it
 * costs 1.15-1.3x: M = 1 reads at the limit alone. */
TARGET INLINE void accumulate(const int rm, const int g, __m512 a[ROWS_X][NR], const uint16_t *x, int64_t ldx,
                              const uint16_t *const *w, int64_t steps, __mmask32 tail,
                              const uint16_t *const *pf) {
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) a[i][j] = _mm512_setzero_ps();
    const int64_t lines = steps + (tail != 0);
    int64_t po = 0;
    int pr = 0;
    for (int64_t s = 0; s < steps; s++) {
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) wv[j] = _mm512_loadu_si512(w[j] + s * 32);
        if (rm >= 3)
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) _mm_prefetch((const char *)(w[j] + s * 32) + FAR, _MM_HINT_T1);
        if (pf)
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) {
                if (pr < g) _mm_prefetch((const char *)(pf[pr] + po * 32), _MM_HINT_T0);
                if (++po == lines) po = 0, pr++;
            }
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + s * 32);
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
    if (tail) {
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < g; j++) wv[j] = _mm512_maskz_loadu_epi16(tail, w[j] + steps * 32);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + steps * 32);
#pragma GCC unroll 8
            for (int j = 0; j < g; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
}

/* ---- GEMM tile: rm x NR outputs over one block of k (dg_matmul_bf16_kernels.tile) ---- */

TARGET INLINE void tile_rows(const int rm, const uint16_t *x, int64_t ldx, const uint16_t *panel, int64_t kc,
                             int flags, float *y, int64_t ldy, int nn, const float *bias) {
    const int64_t steps = (kc + 31) / 32;
    __m512 a[ROWS_X][NR];
#pragma GCC unroll 8
    for (int i = 0; i < rm; i++)
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) a[i][j] = _mm512_setzero_ps();
    for (int64_t s = 0; s < steps; s++) {
        /* x XPF steps ahead, running on into the rows of the next tile: each row of the
         * block is a short stream (4 KiB) the hardware prefetcher starts late on */
        const uint16_t *pf = s + XPF < steps ? x + (s + XPF) * 32 : x + rm * ldx + (s + XPF - steps) * 32;
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) _mm_prefetch((const char *)(pf + i * ldx), _MM_HINT_T0);
        __m512i wv[NR];
#pragma GCC unroll 8
        for (int j = 0; j < NR; j++) wv[j] = _mm512_load_si512(panel + (s * NR + j) * 32);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            const __m512bh xv = (__m512bh)_mm512_load_si512(x + i * ldx + s * 32);
#pragma GCC unroll 8
            for (int j = 0; j < NR; j++) a[i][j] = _mm512_dpbf16_ps(a[i][j], xv, (__m512bh)wv[j]);
        }
    }
    zmm_finish(rm, NR, a, flags, y, ldy, nn, bias);
}

ZMM_TILES(uint16_t)

/* ---- the GEMV of 1 .. 8 rows of x (dg_matmul_bf16_kernels.rows) ----
 * Groups of G weight rows, read where they lie, each step of a group used by all M rows of
 * x (M·G accumulators). Decode reads its weights from memory, where the hardware
 * prefetcher follows one sequential stream best: for M <= 2 one row at a time (G = 1);
 * for M = 3 .. 8 two, the next two prefetched (one row left the loads of x the limit;
 * with the far prefetch, M = 3 and 4 took 0.9x the time of one row a group).
 * Each group reads its rows to the span's end, block after block, before the next group:
 * rows longer than a block (the MLP's down projection, k = 4864) are then still one
 * stream where W is row-major; walked a block of 64 rows at a time, that matrix was read
 * at 12 GB/s against 33 for the others, and a decode token took 41 ms of products instead
 * of 33. Where W is in blocks (backend.h) the span is one block (matmul.c). Measured
 * on the small preset's matrices (a decode step's 988 MB in huge pages, one thread, the
 * median of 15): M = 1 and 2 32-34 ms (~30 GB/s, at the machine's read rate), M = 3 and 4
 * 42-45, M = 8 50 (8 rows' products at ~160 GFLOP/s: the instruction's rate from L1 is
 * ~190). At M = 8 three rows a group took about as long, four 1.15x, six 1.7x. A group of
 * fewer than G rows repeats its last one (computed, not stored). */
#define ROWS(M, G)                                                                              \
    TARGET static void rows##M(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, const dg_weight *w, \
                               int64_t r0, int64_t r1, int64_t k0, int64_t kc, const float *bias) { \
        const int64_t k = w->cols, ld = dg_weight_ld(w, k0);                                    \
        const uint16_t *w0 = dg_weight_at(w, 0, k0);   /* row r's column k0 + b: w0 + r·ld + b */ \
        for (int64_t rb = r0; rb < r1; rb += G) {                                               \
            const uint16_t *row[G], *wr[G], *nx[G];                                             \
            for (int j = 0; j < G; j++) row[j] = w0 + (rb + j < r1 ? rb + j : r1 - 1) * ld;     \
            for (int64_t b = 0; b < kc; b += DG_MATMUL_BF16_KB) {                               \
                const int64_t bc = kc - b < DG_MATMUL_BF16_KB ? kc - b : DG_MATMUL_BF16_KB;     \
                const int flags = dg_matmul_block_flags(k0 + b, bc, k);                         \
                /* prefetched: these rows' next block, else the next group's first */          \
                const int more = b + bc < kc, next = more || rb + G < r1;                       \
                for (int j = 0; j < G; j++) {                                                   \
                    wr[j] = row[j] + b;                                                         \
                    nx[j] = more ? wr[j] + bc : w0 + (rb + G + j < r1 ? rb + G + j : r1 - 1) * ld; \
                }                                                                               \
                __m512 a[ROWS_X][NR];                                                           \
                accumulate(M, G, a, xb + b, ldxb, wr, bc / 32, (__mmask32)((1ull << (bc % 32)) - 1), \
                           G > 1 && next ? nx : NULL);                                          \
                zmm_finish(M, G, a, flags, y + rb, ldy, (int)(r1 - rb), bias ? bias + rb : NULL); \
            }                                                                                   \
        }                                                                                       \
    }
ROWS(1, 1) ROWS(2, 1) ROWS(3, 2) ROWS(4, 2) ROWS(5, 2) ROWS(6, 2) ROWS(7, 2) ROWS(8, 2)

static void rows(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int m, const dg_weight *w, int64_t r0,
                 int64_t r1, int64_t k0, int64_t kc, const float *bias) {
    static void (*const f[ROWS_X + 1])(float *, int64_t, const uint16_t *, int64_t, const dg_weight *, int64_t,
                                       int64_t, int64_t, int64_t, const float *) = {
        rows1, rows1, rows2, rows3, rows4, rows5, rows6, rows7, rows8};
    f[m](y, ldy, xb, ldxb, w, r0, r1, k0, kc, bias);
}

const dg_matmul_bf16_kernels dg_matmul_bf16_avx512 = {MR, NR, round_rows, rows, tile};

/* ---- the bf16 panel order's tile (dg_matmul_panel_tile, matmul.h) ----
 * rm rows of x against one panel: 4 zmm accumulators a row (the panel's outputs 16v ..
 * 16v + 15), a step loading W's four vectors of pairs once for all rows and each row's
 * pair of x broadcast (VPBROADCASTD from memory): 24 VDPBF16PS, 4 vector loads and 6
 * broadcasts a step at rm = 6, in 29 registers. A panel of np < 64 rows reads its steps np
 * words apart under masks (the lanes past np compute zeros, not stored). Measured on the
 * vision tower's shapes at one thread, W from memory: 6 x 64 and 8 x 48 220-224 GFLOP/s at
 * k = 1280, 12 x 32 216-218; 225-228 at k = 3420 and 5120 (engine/MODELS.md). */
#include "matmul_panel_zmm.h"

/* The steps, W's vectors loaded whole (full) or under mk (panel_load). */
TARGET INLINE void panel_steps(const int rm, const int full, __m512 a[][PNV], const uint16_t *xb, int64_t ldxb,
                               const uint32_t *panel, int np, int64_t steps, const __mmask16 mk[PNV]) {
    for (int64_t s = 0; s < steps; s++) {
        __m512bh wv[PNV];
#pragma GCC unroll 4
        for (int v = 0; v < PNV; v++) wv[v] = (__m512bh)panel_load(full, mk[v], panel + s * np + 16 * v);
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++) {
            uint32_t pair;
            memcpy(&pair, xb + i * ldxb + 2 * s, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)pair);
#pragma GCC unroll 4
            for (int v = 0; v < PNV; v++) a[i][v] = _mm512_dpbf16_ps(a[i][v], xv, wv[v]);
        }
    }
}

PANEL_TILES(uint16_t)

const dg_matmul_panel_tile dg_matmul_panel_avx512 = panel_tile;
