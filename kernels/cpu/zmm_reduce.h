/* zmm_reduce.h — a zmm of 16 lanes summed by the matmul's tree (matmul.h step 2), one at a
 * time or sixteen side by side. Included after the includer defines TARGET (its instruction
 * sets, AVX-512 F at the least) and INLINE: the GEMM tiles (matmul_zmm.h) and the decoder's
 * attention (attention_zmm.c). */
#ifndef DG_CPU_ZMM_REDUCE_H
#define DG_CPU_ZMM_REDUCE_H

#include <immintrin.h>

/* matmul.h step 2: lanes l + 8, then + 4, + 2, + 1. */
TARGET INLINE float zmm_reduce(__m512 a) {
    const __m256 b = _mm256_add_ps(_mm512_castps512_ps256(a),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    const __m128 c = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 d = _mm_add_ps(c, _mm_movehl_ps(c, c));
    return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

/* Step 2 for sixteen accumulators at once: lane l is zmm_reduce(a[l]) bit for bit (the same
 * adds, lanes l + 8, + 4, + 2, + 1 of each, done on pairs of accumulators side by side), for
 * l < n; zeros past. 16 sums take 15 adds and 30 shuffles instead of 64 and 64. */
TARGET INLINE __m512 zmm_reduce16(__m512 const *a, const int n) {
    __m512 v[16], u[8];
    /* v[4r + q] = a[4q + r]: after the four levels lane 4q + r holds v[4r + q]'s sum */
#pragma GCC unroll 16
    for (int l = 0; l < 16; l++) v[l % 4 * 4 + l / 4] = l < n ? a[l] : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int p = 0; p < 8; p++)   /* [A lanes l + l+8 | B lanes l + l+8] */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
#pragma GCC unroll 4
    for (int p = 0; p < 4; p++)   /* four accumulators, + 4, one per 128-bit lane */
        u[p] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
#pragma GCC unroll 2
    for (int p = 0; p < 2; p++)   /* + 2 */
        u[p] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(u[2 * p], u[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),   /* + 1 */
                         _mm512_shuffle_ps(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

#endif
