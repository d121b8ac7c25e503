/* screen.h — the logit screen (inside the CPU backend; backend.h matmul_bounds states the
 * contract, engine/MODELS.md "The logit screen" the figures).
 *
 * Greedy decoding wants the argmax of the lm_head's outputs, not all of them: the screen
 * reads a coarse copy of W (int8, half the bytes of bf16) and gives every output an
 * interval that certainly holds the value the matmul computes; only the outputs whose
 * interval reaches the best lower bound can win, and only those rows of W are read in full
 * (matmul_pick). The token is the one the full row gives, bit for bit.
 *
 * The copy. Row r of W (widened to fp32 exactly) is s_r·q_r + d_r: s_r = max|W[r]| / 127
 * (an fp32 value), q_r[c] = round(W[r, c] / s_r) in [-127, 127] (int8), d_r the remainder,
 * e_r = max_c |d_r[c]| (computed exactly in double). Stored per row, each rounded up to an
 * fp32 value: s_r; cx_r = s_r·Σ|q_r| and c1_r = e_r + γ·max|W[r]|; cq_r = s_r·‖q_r‖₂ and
 * c2_r = ‖d_r‖₂ + γ·‖W[r]‖₂; γ = γ_(2k+64) = (2k+64)·u / (1 - (2k+64)·u), u = 2^-24; and
 * Σ q_r (VPDPBUSD's offset, screen.c).
 *
 * The bounds. x̃ is the row of x as the matmul multiplies it (bf16 compute over a BF16
 * weight: rounded to bf16 as matmul.h's step 0 rounds it; else x itself). x̃ = t·xq + δ:
 * t = max|x̃| / L (an fp32 value), xq[c] = round(x̃[c] / t) in [-L, L] (int16); ε = max|δ|
 * and ‖δ‖₂ (double); L = min(32767, (2^31 - 1) / (⌈kp/8⌉·127)), so that no int32 lane of
 * any kernel (8 lanes at the narrowest) can overflow: the integer sum S_r = Σ q_r[c]·xq[c]
 * is exact on every kernel set. Then, exactly,
 *     Σ W[r, c]·x̃[c] = s_r·t·S_r + s_r·Σ q_r[c]·δ[c] + Σ d_r[c]·x̃[c],
 * the two last terms at most cx_r·ε and e_r·‖x̃‖₁, and (Cauchy-Schwarz) at most cq_r·‖δ‖₂
 * and ‖d_r‖₂·‖x̃‖₂; the matmul's fp32 value differs from the exact sum by at most
 * γ·Σ|W[r, c]·x̃[c]| <= γ·min(max|W[r]|·‖x̃‖₁, ‖W[r]‖₂·‖x̃‖₂) whatever its order of
 * operations (at most 2k + 64 roundings on any product's way, fused or not), and by at most
 * 2^-126 per flushed operand or result (bf16 compute's DAZ and FTZ): 2^-126·(‖x̃‖₁ + 2k + 64).
 * So with a = s_r·t·S_r (double),
 *     R = min(cx_r·ε + c1_r·‖x̃‖₁, cq_r·‖δ‖₂ + c2_r·‖x̃‖₂)·(1 + 2^-20) + 2^-50·|a|
 *         + 2^-120·(‖x̃‖₁ + 2k + 64),
 * lo = a - R and hi = a + R rounded outwards to fp32 hold the matmul's value (the 2^-20 and
 * 2^-50 cover the double arithmetic of the bound itself; the norms are inflated by 2^-30
 * for their sums' rounding). A row of x that is not finite, or whose ‖x̃‖₁·max|W| could
 * overflow, gets NaN bounds: the caller computes that row. The 2-norm form is the narrower
 * for rows like Gaussian ones (‖d‖₂·‖x‖₂ ~ 0.29·k·s·rms(x) against e·‖x‖₁ ~ 0.4·k·s·rms(x)):
 * half-widths 0.24 of the logits' spread instead of 0.33 on tests/test_screen.c's rows of
 * 896, and half the rows read in full on the small decoder (4.8 a token instead of 9.2).
 *
 * Why int8 x int16: the products are exact integers, so the bounds are the same bits on
 * every kernel set (AVX-512 BW, AVX2, portable), and x's quantisation (15 bits) adds ~1e-4
 * of the weight's own error; int8 weights are the half of bf16's bytes that decode reads. */
#ifndef DG_CPU_SCREEN_H
#define DG_CPU_SCREEN_H

#include <stdint.h>

#include "cpu_kernels.h"

#define DG_SCREEN_Q 127        /* the weights' levels: q in [-127, 127] */
#define DG_SCREEN_KP 64        /* a row of the copy (and of xq) is cols rounded up to this */

/* The constants of eight rows of the copy, field by field (the VNNI kernel loads a field
 * of eight rows at once; one stream, where six arrays were six: screen.c). */
typedef struct {
    float   scale[8];          /* s_r */
    float   cx[8];             /* s_r·Σ|q_r|, rounded up */
    float   c1[8];             /* e_r + γ·max|W[r]|, rounded up */
    float   cq[8];             /* s_r·‖q_r‖₂, rounded up */
    float   c2[8];             /* ‖d_r‖₂ + γ·‖W[r]‖₂, rounded up */
    int32_t qsum[8];           /* Σ q_r (VPDPBUSD's offset) */
} dg_screen_rows8;

struct dg_screen {
    int64_t rows, cols, kp;
    int     bf16_x;            /* the matmul rounds x to bf16 (bf16 compute, a BF16 weight) */
    int     levels;            /* L: xq in [-L, L] */
    int     isa;               /* the dot kernel: 2 AVX-512 BW, 1 AVX2, 0 portable */
    int     vnni;              /* 1: VPDPBUSD's kernels (AVX-512 VNNI; screen.c) */
    float   wmax;              /* max |W| over the matrix (the overflow guard) */
    int8_t *q;                 /* [rows, kp] */
    dg_screen_rows8 *k;        /* [ceil(rows / 8)]: row r's constants at k[r / 8], lane r % 8 */
};

/* backend.h screen_new / screen_free / matmul_bounds / matmul_pick on the CPU. */
int  dg_cpu_screen_new(const dg_cpu *c, const dg_weight *w, dg_screen **out, char *err, size_t errlen);
void dg_cpu_screen_free(dg_screen *sc);
void dg_cpu_matmul_bounds(const dg_cpu *c, float *lo, float *hi, const float *x, const dg_screen *sc, int m);
void dg_cpu_matmul_pick(const dg_cpu *c, float *out, const float *x, const dg_weight *w, const int32_t *ids,
                        int n);

#endif
