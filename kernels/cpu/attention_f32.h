/* attention_f32.h — the two products of the segment attention (vision_ops.c) in fp32 on
 * AVX-512 F, where its fp32 products ran on OpenBLAS's sgemm (not a public interface).
 *
 * The order. A score s[i, j] is one lane's chain of FMAs over the dims d = 0, 1, .. from
 * +0, then times the scale; an output o[i, d] continues from its fp32 value (times the
 * online softmax's correction) the chain over the tile's keys j = 0, 1, ..: o = fma(p[i, j],
 * v[j, d], o). Nothing depends on the rows computed beside a row. */
#ifndef DG_CPU_ATTENTION_F32_H
#define DG_CPU_ATTENTION_F32_H

#include <stdint.h>

/* The kernels apply when head_dim is a multiple of 16 up to 256. */
#define DG_ATT_F32_OK(head_dim) ((head_dim) % 16 == 0 && (head_dim) <= 256)

/* The floats of a tile of nc keys packed: its keys a dim by 16 keys, then its values' rows. */
static inline int64_t dg_att_f32_tile_floats(int nc, int hd) {
    return ((int64_t)(nc + 15) / 16 * 16 + nc) * hd;
}

/* nc keys and values of hd (rows at k + j·kv_stride, v + j·kv_stride) packed into dst
 * (dg_att_f32_tile_floats(nc, hd) floats). */
void dg_att_f32_pack(float *dst, const float *k, const float *v, int kv_stride, int nc, int hd);
/* s[i·lds + j] = scale · q_i·k_j for nq query rows at q + i·q_stride and the packed tile's
 * keys (j < nc rounded up to 16: columns up to there are written, 0 past nc). */
void dg_att_f32_scores(float *s, int lds, const float *q, int q_stride, int nq, const float *packed, int nc,
                       int hd, float scale);
/* o[i·hd + d] = o[i·hd + d]·corr[i] (corr NULL: as it is) + Σ_j p[i·lds + j]·v[j, d] over the
 * packed tile's nc values, for i < nq. */
void dg_att_f32_pv(float *o, int hd, const float *p, int lds, int nq, const float *packed, int nc,
                   const float *corr);

#endif
