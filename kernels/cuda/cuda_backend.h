/* cuda_backend.h — the CUDA backend (bf16 weights in device memory, fp32 activations and
 * accumulation, cuBLAS GEMMs, own kernels for the rest). Made only through
 * dg_backend_new("cuda:N") in engine/backend.c, which is compiled with DG_HAVE_CUDA when
 * the build found nvcc.
 *
 * Memory: one cudaMalloc arena taken when the backend is made, `budget` bytes (0: the
 * DG_GPU_MEMORY environment variable, e.g. "24G" or "24000M", else 90% of the device's
 * free memory). be->alloc, weights and the backend's own scratch come from it, so nothing
 * calls cudaMalloc once the backend exists. Its forks (be->fork, backend.h) share the
 * arena (a lock guards its bookkeeping) and take their own scratch from it: 304 MiB each
 * (staging ring, scratch, cuBLAS workspace), besides their own stream and handles.
 *
 * Threads: the CUDA runtime's current device is per host thread; every operation makes
 * its backend's device current on the calling thread, so a fork may run on any thread. */
#ifndef DG_CUDA_BACKEND_H
#define DG_CUDA_BACKEND_H

#include <stddef.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* DG_EINVAL when there is no such device (the message says "no CUDA device" when the
 * machine has none at all) or the budget is below the backend's own buffers; DG_EDEVICE when
 * a CUDA call fails (the budget's cudaMalloc included: a budget over the free memory is cut
 * to it); DG_ENOMEM when host memory runs out. */
int dg_cuda_backend_new(int device, size_t budget, dg_backend **out, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
