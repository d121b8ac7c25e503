/* vision_ops.h — CPU kernels of the backend operations added for the vision tower and the
 * DiT (not a public interface): non-causal segment attention, GELU, rotary from a cos/sin
 * table, row gather. Each takes the backend itself so that
 * cpu_backend.c puts it in the table as it is; backend.h states the contracts. */
#ifndef DG_CPU_VISION_OPS_H
#define DG_CPU_VISION_OPS_H

#include <stdint.h>

#include "attention_bf16.h"
#include "attention_f32.h"
#include "backend.h"

/* Segment attention tiles (vision_ops.c): queries of one head per block (the bf16
 * products' blocks larger: a segment of one block packs its keys and values in the block's
 * task, one of several once for all, into dg_cpu.att_kv), keys per tile. */
#define DG_ATT_QB 128
#define DG_ATT_QB_BF16 512
#define DG_ATT_KC 256
/* Its per-thread scratch with bf16 compute on AVX-512 BF16 (dg_cpu.att_bf16), words: the
 * products' (attention_bf16.h), then the block's scores [QB, KC], outputs [QB, 256],
 * running maxima and sums [QB] each. */
#define DG_ATT_SCRATCH_WORDS \
    (DG_ATT_BF16_WORDS(DG_ATT_QB_BF16, DG_ATT_KC) + (int64_t)DG_ATT_QB_BF16 * (DG_ATT_KC + 256 + 2))
/* Its per-thread scratch with the own fp32 products on AVX-512 (dg_cpu.att_f32), floats: a
 * tile of keys and values packed (attention_f32.h), head_dim up to 256. */
#define DG_ATT_F32_SCRATCH_FLOATS (2 * (int64_t)DG_ATT_KC * 256)

void dg_cpu_attention_segments(dg_backend *be, float *out, const float *q, int q_stride,
                               const float *k, const float *v, int kv_stride,
                               const int32_t *q_cu, const int32_t *kv_cu, int n_seg,
                               int n_heads, int n_kv_heads, int head_dim, float scale);
void dg_cpu_gelu(dg_backend *be, float *y, const float *x, int64_t n);
void dg_cpu_rope_table(dg_backend *be, float *x, int stride, const float *cos, const float *sin,
                       int m, int n_heads, int head_dim);
void dg_cpu_gather_rows(dg_backend *be, float *y, const float *x, const int32_t *idx, int m,
                        int64_t n);

#endif
