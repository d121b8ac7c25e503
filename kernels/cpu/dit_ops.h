/* dit_ops.h — the CPU kernels of the image-generation operations (DiT, VAE), whose
 * contracts backend.h states; implemented in dit_ops.c. Each takes the backend itself so
 * that cpu_backend.c puts it in the table as it is. Not a public interface. */
#ifndef DG_CPU_DIT_OPS_H
#define DG_CPU_DIT_OPS_H

#include <stdint.h>

#include "backend.h"
#include "cpu_kernels.h"

void dg_cpu_conv3d(dg_backend *be, float *y, const float *x, const float *w, const float *bias,
                   const dg_conv3d_shape *s);
void dg_cpu_channel_rmsnorm(dg_backend *be, float *y, const float *x, const float *gamma,
                            int n_frames, int channels, int64_t plane, int silu);
void dg_cpu_upsample2x(dg_backend *be, float *y, const float *x, int64_t n_planes, int h, int w);
void dg_cpu_spatial_attention(dg_backend *be, float *out, const float *qkv, int channels,
                              int64_t plane);
void dg_cpu_silu(dg_backend *be, float *y, const float *x, int64_t n);
void dg_cpu_modulate(dg_backend *be, float *y, const float *x, const float *shift,
                     const float *scale, int m, int n, float eps);
void dg_cpu_add_gated(dg_backend *be, float *y, const float *x, const float *gate, int m, int n);
void dg_cpu_standardize(dg_backend *be, float *y, const float *x, int m, int n, float eps);

#endif
