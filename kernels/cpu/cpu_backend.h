/* cpu_backend.h — the CPU backend: fp32 compute, OpenMP, our own matmul (GEMV and GEMM in one
 * order whatever m: kernels/cpu/matmul.h) and OpenBLAS for the activation products of the
 * vision and VAE attention and the VAE convolution. */
#ifndef DG_CPU_BACKEND_H
#define DG_CPU_BACKEND_H

#include <stddef.h>

#include "backend.h"

/* Kernel sets, each wider one requiring the ones before it. */
enum {
    DG_CPU_PORTABLE = 0,   /* plain C: "cpu-scalar" */
    DG_CPU_AVX2     = 1,   /* AVX2 + FMA + F16C */
    DG_CPU_AVX512   = 2,   /* and AVX-512 F (the GEMM tile only) */
    DG_CPU_AVX512_BF16 = 3,/* and AVX-512 BW and BF16 (the bf16 compute order's kernels) */
};

/* The widest kernel set of this machine (DG_CPU_*), its operating system's support of the
 * registers included. */
int dg_cpu_simd_level(void);

/* A CPU backend using the widest kernel set that the machine has and that is at most
 * max_simd (DG_CPU_*): "cpu" is DG_CPU_AVX512_BF16, "cpu-scalar" DG_CPU_PORTABLE. The name
 * is "cpu-scalar" for the portable set, else "cpu"; the AVX2 and AVX-512 matmuls give the
 * same bits (matmul.h). bf16_compute 1: matmuls over BF16 weights take the bf16 compute
 * order (matmul.h; every kernel set gives the same bits in it); 0: the fp32 order.
 * n_threads <= 0: one per processor. */
int dg_cpu_backend_new(int n_threads, int max_simd, int bf16_compute, dg_backend **out, char *err,
                       size_t errlen);

/* The memory this process's control groups still give it: over every level of its cgroup
 * (v2: memory.max; v1: memory.limit_in_bytes), from its own group up to the hierarchy's
 * root, the least of the limit less the group's working set (usage less its inactive file
 * pages, which the kernel reclaims first, as MemAvailable counts them); SIZE_MAX where no
 * level sets a limit, or the files cannot be read. proc_cgroup: /proc/self/cgroup;
 * cgroup_root: /sys/fs/cgroup (tests point both at a tree of their own). A systemd unit's
 * MemoryMax= or a container's memory limit is what this sees, and /proc/meminfo does not. */
size_t dg_cgroup_memory_room(const char *proc_cgroup, const char *cgroup_root);

#endif
