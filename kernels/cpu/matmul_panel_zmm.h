/* matmul_panel_zmm.h — what the AVX-512 tiles of the two panel orders (matmul.h) share: a
 * panel's masks, the end of a tile (y = the accumulators, plus the bias) and the tile's
 * instances for 1 .. DG_MATMUL_PANEL_MR rows of x with their table. Included by
 * matmul_avx512.c (fp32) and matmul_bf16.c (bf16) after each defines TARGET and INLINE. */
#ifndef DG_CPU_MATMUL_PANEL_ZMM_H
#define DG_CPU_MATMUL_PANEL_ZMM_H

#include <immintrin.h>

#include "matmul.h"

#define PNV (DG_WEIGHT_PANEL_ROWS / 16)   /* zmm of outputs a panel */

/* mk[v]: the lanes of the panel's vector v that hold one of its np rows. */
TARGET INLINE void panel_masks(int np, __mmask16 mk[PNV]) {
#pragma GCC unroll 4
    for (int v = 0; v < PNV; v++) {
        const int left = np - 16 * v;
        mk[v] = left >= 16 ? 0xffff : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    }
}

/* The panel's vector v at p: whole where the panel has 64 rows (full, a constant in the
 * tiles), else under mk (masked zmm loads cost the fp32 tile ~9% on Zen 4, the bf16 one
 * under 1%). */
TARGET INLINE __m512i panel_load(const int full, __mmask16 mk, const uint32_t *p) {
    return full ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(mk, p);
}

/* y[i·ldy + 16v + l] = a[i][v] lane l (plus bias[16v + l]: one add) for the lanes of mk[v]. */
TARGET INLINE void panel_store(const int rm, __m512 a[][PNV], const __mmask16 mk[PNV], float *y, int64_t ldy,
                               const float *bias) {
#pragma GCC unroll 4
    for (int v = 0; v < PNV; v++) {
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mk[v], bias + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int i = 0; i < rm; i++)
            _mm512_mask_storeu_ps(y + i * ldy + 16 * v, mk[v], bias ? _mm512_add_ps(a[i][v], b) : a[i][v]);
    }
}

/* panel_rows (the accumulators zeroed, panel_steps with W's vectors loaded whole or under
 * the masks, the end), panel1 .. panel6 (panel_rows at a constant rm) and panel_tile(rm,
 * ...) choosing among them, over rows of x of element type T; the including file defines
 * panel_steps(rm, full, a, x, ldx, panel, np, steps, mk) first. */
#define PANEL_TILES(T)                                                                          \
    TARGET INLINE void panel_rows(const int rm, const T *x, int64_t ldx, const uint32_t *panel, int np, \
                                  int64_t steps, float *y, int64_t ldy, const float *bias) {   \
        __mmask16 mk[PNV];                                                                      \
        panel_masks(np, mk);                                                                    \
        __m512 a[DG_MATMUL_PANEL_MR][PNV];                                                      \
        _Pragma("GCC unroll 8") for (int i = 0; i < rm; i++)                                    \
            _Pragma("GCC unroll 4") for (int v = 0; v < PNV; v++) a[i][v] = _mm512_setzero_ps(); \
        if (np == DG_WEIGHT_PANEL_ROWS) panel_steps(rm, 1, a, x, ldx, panel, np, steps, mk);    \
        else panel_steps(rm, 0, a, x, ldx, panel, np, steps, mk);                               \
        panel_store(rm, a, mk, y, ldy, bias);                                                   \
    }                                                                                           \
    PANEL_TILE(T, 1) PANEL_TILE(T, 2) PANEL_TILE(T, 3) PANEL_TILE(T, 4) PANEL_TILE(T, 5) PANEL_TILE(T, 6) \
    static void panel_tile(int rm, const T *x, int64_t ldx, const uint32_t *panel, int np, int64_t steps, \
                           float *y, int64_t ldy, const float *bias) {                         \
        static void (*const f[DG_MATMUL_PANEL_MR + 1])(const T *, int64_t, const uint32_t *, int, int64_t, float *, \
                                                       int64_t, const float *) = {panel1, panel1, panel2, panel3, \
                                                                                  panel4, panel5, panel6}; \
        f[rm](x, ldx, panel, np, steps, y, ldy, bias);                                          \
    }
#define PANEL_TILE(T, RM)                                                                       \
    TARGET static void panel##RM(const T *x, int64_t ldx, const uint32_t *panel, int np, int64_t steps, float *y, \
                                 int64_t ldy, const float *bias) {                              \
        panel_rows(RM, x, ldx, panel, np, steps, y, ldy, bias);                                 \
    }

#endif
