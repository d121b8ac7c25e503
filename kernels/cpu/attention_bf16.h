/* attention_bf16.h — the two products of the segment attention (vision_ops.c) in bf16 on
 * AVX-512 BF16, for a backend with bf16 compute (not a public interface).
 *
 * With bf16 compute, PyTorch's bf16 attention (the baselines of `make bench-vision` and
 * `make bench-image`) multiplies bf16 queries by bf16 keys and bf16 probabilities by bf16
 * values, accumulating in fp32; these kernels do the same with VDPBF16PS, twice the fp32
 * FMA's work an instruction. The softmax between them stays in fp32 (vision_ops.c's online
 * softmax, here with its probabilities rounded as they are written: dg_att_bf16_softmax).
 *
 * The order. q, k, v and the probabilities p are rounded to bf16 as the matmul's step 0
 * (matmul.h). A score s[i, j] is one lane's chain over the head's pairs of dimensions
 * (2t, 2t + 1), t = 0, 1, ..: a = F(a + q[2t+1]·k[2t+1]); a = F(a + q[2t]·k[2t]) from a = +0
 * (F: VDPBF16PS's fused step with DAZ and FTZ, matmul.h), then times the scale in fp32. An
 * output o[i, d] continues from its fp32 value the chain over the tile's pairs of keys
 * (2t, 2t + 1): o = F(o + p[2t+1]·v[2t+1, d]); o = F(o + p[2t]·v[2t, d]). Nothing depends on
 * the rows computed beside a row, so a query row has the bits it has alone. */
#ifndef DG_CPU_ATTENTION_BF16_H
#define DG_CPU_ATTENTION_BF16_H

#include <stdint.h>

/* The kernels apply when head_dim is a multiple of 16 up to 256 (the vision tower's 80, the
 * DiT's 128). */
#define DG_ATT_BF16_OK(head_dim) ((head_dim) % 16 == 0 && (head_dim) <= 256)

/* The scratch of one (query block, key tile) for at most qb queries (a multiple of 4) and
 * kc keys (a multiple of 64), head_dim up to 256: uint32 words, 64-byte aligned. */
#define DG_ATT_BF16_WORDS(qb, kc) ((int64_t)(qb) * 128 + 2 * (int64_t)(kc) * 128 + (int64_t)(qb) * (kc) / 2 + 16)

typedef struct {
    uint32_t *q;     /* [round4(nq)][hd/2 padded to 16] the rounded queries, pairs */
    const uint32_t *k; /* [round64(nc)/16][hd/2][16] the tile's keys, a pair of dims by 16 keys */
    const uint32_t *v; /* [hd/16][nc/2 rounded up][16] the tile's values, a pair of keys by 16 dims */
    uint32_t *kv;    /* the scratch dg_att_bf16_tile packs a tile into (k, then v) */
    uint32_t *p;     /* [round4(nq)][kc/2 padded to 16] the rounded probabilities, pairs */
    int nq, hd;
} dg_att_bf16;

/* The words of a tile of nc keys packed (its keys, then its values). */
static inline int64_t dg_att_bf16_tile_words(int nc, int hd) {
    return (int64_t)(nc + 63) / 64 * 64 * (hd / 2) + (int64_t)hd * ((nc + 1) / 2);
}

/* Carves the scratch (DG_ATT_BF16_WORDS(qb, kc) words) and rounds nq query rows of hd at
 * q + i·q_stride into it. */
void dg_att_bf16_begin(dg_att_bf16 *a, uint32_t *scratch, int qb, int kc, const float *q, int q_stride, int nq,
                       int hd);
/* nc keys and values of hd (rows at k + j·kv_stride, v + j·kv_stride) rounded and packed
 * into dst (dg_att_bf16_tile_words(nc, hd) words): the keys, then the values. */
void dg_att_bf16_pack(uint32_t *dst, const float *k, const float *v, int kv_stride, int nc, int hd);
/* The tile's nc keys and values packed into the scratch (dg_att_bf16_pack), the tile the
 * products read next. */
void dg_att_bf16_tile(dg_att_bf16 *a, const float *k, const float *v, int kv_stride, int nc);
/* The tile of nc keys dg_att_bf16_pack left at packed (read there, not copied), the tile the
 * products read next. */
void dg_att_bf16_use(dg_att_bf16 *a, const uint32_t *packed, int nc);
/* s[i·lds + j] = scale · q_i·k_j for the begun rows and the tile's keys (j < nc; lds a
 * multiple of 64 and at least nc rounded up to 64: columns up to there are written). */
void dg_att_bf16_scores(const dg_att_bf16 *a, float *s, int lds, int nc, float scale);
/* o[i·hd + d] += Σ_j p[i·lds + j]·v[j, d] in the order above, p rounded first. */
void dg_att_bf16_pv(dg_att_bf16 *a, float *o, const float *p, int lds, int nc);
/* The online softmax's step for row i of the tile's scores s[0 .. nc-1] (vision_ops.c): with
 * m' = max(*mx, max s), the probabilities exp(s - m') rounded straight into the row's pairs
 * for dg_att_bf16_pv_rows (not stored as floats), *corr = exp(*mx - m') (0 from *mx = -inf),
 * *mx = m'; returns Σ exp(s - m') over the unrounded values. exp is dg_exp512_nonpos
 * (simd_math.h: 1.3e-6 relative at worst, well under the probabilities' rounding to bf16,
 * 2^-9; dg_exp512's Cephes form, 17 instructions to its 10, was 5-7% of the attention), the
 * sum 16 lanes wide; *corr is libm's expf. */
float dg_att_bf16_softmax(dg_att_bf16 *a, int i, const float *s, int nc, float *mx, float *corr);
/* dg_att_bf16_pv on the pairs dg_att_bf16_softmax left for rows 0 .. nq-1, each row of o
 * first multiplied by corr[i] (the online softmax's correction: the same fp32 product as a
 * separate pass) when corr is not NULL. */
void dg_att_bf16_pv_rows(dg_att_bf16 *a, float *o, int nc, const float *corr);

#endif
