/* simd_math.h — the vector math the CPU kernels share (AVX2 + FMA; callers are compiled
 * for the same target and dispatch on dg_cpu.simd). */
#ifndef DG_CPU_SIMD_MATH_H
#define DG_CPU_SIMD_MATH_H

#include <immintrin.h>

#define DG_SIMD_AVX2 __attribute__((target("avx2,fma")))

/* Cephes' expf: the clamp, ln 2 in two parts, the polynomial; dg_exp256 and dg_exp512 are
 * the same operations on these, so that a lane has the same bits at either width. */
#define DG_EXP_HI 88.3762626647949f
#define DG_EXP_LO -87.3365447504f
#define DG_EXP_LOG2E 1.44269504088896341f
#define DG_EXP_C1 0.693359375f
#define DG_EXP_C2 -2.12194440e-4f
#define DG_EXP_P0 1.9875691500e-4f
#define DG_EXP_P1 1.3981999507e-3f
#define DG_EXP_P2 8.3334519073e-3f
#define DG_EXP_P3 4.1665795894e-2f
#define DG_EXP_P4 1.6666665459e-1f
#define DG_EXP_P5 5.0000001201e-1f

/* exp on 8 lanes: Cephes' expf (range reduction by ln 2 in two parts, degree-5
 * polynomial), within 2 ulp of expf for x in [-87.3, 88.4]; lower x gives 2^-126 (the
 * weight of a score 87 below the row's maximum: nothing next to the maximum's 1), higher
 * x 2.4e38; NaN gives NaN, as expf (the clamps' operands in the order MINPS/MAXPS pass a
 * NaN second operand through), so that a NaN upstream is not hidden by one kernel set. */
DG_SIMD_AVX2 static inline __m256 dg_exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(DG_EXP_LO), _mm256_min_ps(_mm256_set1_ps(DG_EXP_HI), x));   /* NaN stays NaN */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(DG_EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(DG_EXP_C1), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(DG_EXP_C2), r);
    __m256 p = _mm256_set1_ps(DG_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(DG_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(DG_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(DG_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(DG_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(DG_EXP_P5));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* dg_exp256 on 16 lanes: the same operations, so a lane's bits are dg_exp256's. */
__attribute__((target("avx512f"))) static inline __m512 dg_exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(DG_EXP_LO), _mm512_min_ps(_mm512_set1_ps(DG_EXP_HI), x));   /* NaN stays NaN */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(DG_EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(DG_EXP_C1), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(DG_EXP_C2), r);
    __m512 p = _mm512_set1_ps(DG_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DG_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DG_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DG_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DG_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(DG_EXP_P5));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

/* exp(x) on 16 lanes for x <= 0 (the softmax's s - max): 2^n · P(f), n = x·log2(e) rounded
 * to the nearest integer, f = x·log2(e) - n in one rounding (VFMSUB), P degree 5 on
 * [-1/2, 1/2] with P(0) = 1 (tools/reference/fit_exp2.py: 1.9e-7 relative in float32
 * Horner), the scaling by VSCALEFPS: 10 instructions where dg_exp512 takes 17. Relative
 * error under 2e-6 down to x = -87 (log2(e) as a float is 2.2e-8 off, so f is off by up to
 * |x|·2.2e-8), below that denormal or 0 (dg_exp512: 2^-126; x below -200, -inf included,
 * taken as -200); exp(0) = 1 exactly. Not meant for x > 0 (no clamp there). */
__attribute__((target("avx512f"))) static inline __m512 dg_exp512_nonpos(__m512 x) {
    const __m512 l2e = _mm512_set1_ps(DG_EXP_LOG2E);
    x = _mm512_max_ps(_mm512_set1_ps(-200.0f), x);   /* NaN stays NaN (MAXPS returns its second operand) */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, l2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_fmsub_ps(x, l2e, n);
    __m512 p = _mm512_set1_ps(1.330318628e-03f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.671513923e-03f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550601706e-02f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402224243e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931470633e-01f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 rows of 16 32-bit lanes transposed in registers: c[j] lane i = r[i] lane j (the
 * segment attention's packing of 16 keys, attention_bf16.c and attention_f32.c). */
__attribute__((target("avx512f"))) static inline void dg_transpose16(__m512i c[16], const __m512i r[16]) {
    __m512i a[16], b[16];
#pragma GCC unroll 8
    for (int k = 0; k < 8; k++) {   /* lanes of each 128 bits, rows 2k and 2k + 1 */
        a[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        a[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < 4; k++) {   /* b[4k + m], 128-bit lane L: rows 4k .. 4k+3 of column 4L + m */
        b[4 * k] = _mm512_unpacklo_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 1] = _mm512_unpackhi_epi64(a[4 * k], a[4 * k + 2]);
        b[4 * k + 2] = _mm512_unpacklo_epi64(a[4 * k + 1], a[4 * k + 3]);
        b[4 * k + 3] = _mm512_unpackhi_epi64(a[4 * k + 1], a[4 * k + 3]);
    }
#pragma GCC unroll 4
    for (int m = 0; m < 4; m++) {   /* column 4L + m: lane L of b[m], b[4 + m], b[8 + m], b[12 + m] */
        const __m512i p0 = _mm512_shuffle_i32x4(b[m], b[4 + m], _MM_SHUFFLE(1, 0, 1, 0)),
                      p1 = _mm512_shuffle_i32x4(b[m], b[4 + m], _MM_SHUFFLE(3, 2, 3, 2)),
                      q0 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], _MM_SHUFFLE(1, 0, 1, 0)),
                      q1 = _mm512_shuffle_i32x4(b[8 + m], b[12 + m], _MM_SHUFFLE(3, 2, 3, 2));
        c[m] = _mm512_shuffle_i32x4(p0, q0, _MM_SHUFFLE(2, 0, 2, 0));
        c[4 + m] = _mm512_shuffle_i32x4(p0, q0, _MM_SHUFFLE(3, 1, 3, 1));
        c[8 + m] = _mm512_shuffle_i32x4(p1, q1, _MM_SHUFFLE(2, 0, 2, 0));
        c[12 + m] = _mm512_shuffle_i32x4(p1, q1, _MM_SHUFFLE(3, 1, 3, 1));
    }
}

/* The sum of 8 lanes: l + 4, then + 2, + 1. */
DG_SIMD_AVX2 static inline float dg_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
