/* cpu_backend.h — the CPU backend (fp32 compute, OpenBLAS GEMM, OpenMP, AVX2/FMA GEMV). */
#ifndef DG_CPU_BACKEND_H
#define DG_CPU_BACKEND_H

#include <stddef.h>

#include "backend.h"

/* force_scalar: use the portable kernels even where AVX2/FMA/F16C is present. */
int dg_cpu_backend_new(int n_threads, int force_scalar, dg_backend **out, char *err, size_t errlen);

#endif
