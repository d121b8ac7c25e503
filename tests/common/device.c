#include "device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_kernels.h"
#include "harness.h"

static int  state;          /* 0 not tried, 1 present, -1 absent, -2 broken */
static char reason[320];

int test_cuda_present(void) {
    if (!state) {
        dg_backend *be = NULL;
        char err[256] = "";
        if (!getenv("DG_GPU_MEMORY")) setenv("DG_GPU_MEMORY", "8G", 1);
        if (dg_backend_new("cuda:0", 0, &be, err, sizeof err) == 0) {
            state = 1;
        } else if (strstr(err, "has no CUDA backend") || strstr(err, "no CUDA device")) {
            state = -1;
            snprintf(reason, sizeof reason, "no GPU here (%s)", err);
        } else {
            state = -2;
            snprintf(reason, sizeof reason, "cuda:0 failed to open: %s", err);
        }
        dg_backend_free(be);
    }
    if (state == -2) test_fail(__FILE__, __LINE__, "%s", reason);
    return state > 0;
}

const char *test_cuda_absent_reason(void) { return reason; }

/* The kernel set a "cpu" backend of at most max_simd uses here, as it decides from CPUID. */
static int cpu_simd(int max_simd, int bf16_compute) {
    dg_backend *be = NULL;
    char err[256];
    if (dg_cpu_backend_new(1, max_simd, bf16_compute, &be, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "%s", err);
        return 0;
    }
    const int simd = ((const dg_cpu *)be->impl)->simd;
    dg_backend_free(be);
    return simd;
}

int test_cpu_avx512(void) { return cpu_simd(DG_CPU_AVX512, 0) >= DG_CPU_AVX512; }

int test_cpu_avx512_bf16(void) { return cpu_simd(DG_CPU_AVX512_BF16, 1) >= DG_CPU_AVX512_BF16; }
