/* sample_ops.h — the CPU kernels of the sampling operations (logits_adjust, topk), whose
 * contracts backend.h states; implemented in sample_ops.c. Each takes the backend itself so
 * that cpu_backend.c puts it in the table as it is. Not a public interface. */
#ifndef DG_CPU_SAMPLE_OPS_H
#define DG_CPU_SAMPLE_OPS_H

#include <stdint.h>

#include "backend.h"

void dg_cpu_logits_adjust(dg_backend *be, float *x, int n, const int32_t *seen, int n_seen,
                          float penalty, const dg_logit_bias *bias, int n_bias);
void dg_cpu_topk(dg_backend *be, const float *x, int n, int k, float inv_temp, float *val,
                 int32_t *idx, double *lse);

#endif
