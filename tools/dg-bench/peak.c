/* The arithmetic limit a compute-bound benchmark is measured against, as the read bandwidth
 * is decode's (bench.h bench_peak_gflops): every thread runs 12 independent chains of one
 * instruction on registers, no loads, for a fixed count, all threads at once. */
#include "bench.h"

#include <immintrin.h>
#include <omp.h>

#include "cpu/cpu_backend.h"

#define CHAINS 12                   /* independent accumulators: past the latency x throughput */
#define ITERS  (8 * 1000 * 1000)    /* ~0.3 s at one VDPBF16PS a cycle */

/* CHAINS x iters VDPBF16PS (16 lanes of two products: 64 flop each); returns their sum so
 * that nothing is left out. The empty asm keeps the inputs opaque to the compiler. */
__attribute__((target("avx512f,avx512bf16"))) static float chains_bf16(long iters) {
    __m512 acc[CHAINS];
    __m512i a = _mm512_set1_epi32(0x3f803f80), b = _mm512_set1_epi32(0x3c003c00);   /* bf16 1.0, 2^-7 */
    for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_setzero_ps();
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));
#pragma GCC unroll 12
        for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)a, (__m512bh)b);
    }
    float s = 0;
    for (int j = 0; j < CHAINS; j++) s += _mm512_reduce_add_ps(acc[j]);
    return s;
}

/* The same with VFMADD231PS (16 lanes of one product and add: 32 flop each). */
__attribute__((target("avx512f"))) static float chains_fp32(long iters) {
    __m512 acc[CHAINS], a = _mm512_set1_ps(1.0f), b = _mm512_set1_ps(1.0f / 128);
    for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_setzero_ps();
    for (long i = 0; i < iters; i++) {
        __asm__ volatile("" : "+v"(a), "+v"(b));
#pragma GCC unroll 12
        for (int j = 0; j < CHAINS; j++) acc[j] = _mm512_fmadd_ps(a, b, acc[j]);
    }
    float s = 0;
    for (int j = 0; j < CHAINS; j++) s += _mm512_reduce_add_ps(acc[j]);
    return s;
}

double bench_peak_gflops(int threads, int bf16) {
    const int level = dg_cpu_simd_level();
    if (level < (bf16 ? DG_CPU_AVX512_BF16 : DG_CPU_AVX512)) return 0;
    double best = 0;
    volatile float sink = 0;
    for (int rep = 0; rep < 3; rep++) {
        const double t0 = bench_now_ms();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += bf16 ? chains_bf16(ITERS) : chains_fp32(ITERS);
        const double s = (bench_now_ms() - t0) / 1e3;
        const double gflops = (double)threads * ITERS * CHAINS * (bf16 ? 64 : 32) / s / 1e9;
        if (gflops > best) best = gflops;
    }
    return best;
}

double bench_record_peak(json_t *out, int threads, int bf16) {
    char name[64];
    const double peak = bench_peak_gflops(threads, bf16);
    snprintf(name, sizeof name, "peak_gflops_t%d", threads);
    if (peak <= 0) {   /* no such instruction here: no figure, and no fractions of one */
        printf("  %-44s %12s (this CPU has no %s)\n", name, "n/a", bf16 ? "VDPBF16PS" : "AVX-512");
        return 0;
    }
    bench_record(out, name, peak, bf16 ? "GFLOP/s (VDPBF16PS, no loads)" : "GFLOP/s (VFMADD231PS, no loads)");
    return peak;
}
