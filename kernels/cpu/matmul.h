/* matmul.h — the CPU matmul y[m, n] = x[m, k] · Wᵀ (+ bias) over stored weights (BF16, F16,
 * F32), inside the CPU backend (not a public interface).
 *
 * The canonical order. Every output y[i, r] is computed by one fixed sequence of fp32
 * operations that depends on x's row i, W's row r, k and bias[r] only: never on m, on the
 * place of row i in the batch, on the tile or thread that computes it, or on the kernel
 * (GEMV for m = 1, the multi-row GEMV for a few rows, GEMM above). So a row of y is
 * bit-identical whatever m — the guarantee backend.h states, which a KV cache filled by
 * decode (m = 1) and by prefill (m = 512) relies on to give the same tokens on a warm
 * worker as on a cold one (issue 14), and batched decode (m = the sequences of a step) on
 * giving each job the tokens it gets alone (issue 17).
 *
 * The sequence (SIMD kernels, AVX2 and AVX-512 alike):
 *   1. k is cut into blocks of KB = 1024 columns (the last one shorter). In a block, 16
 *      lanes; lane l accumulates a[l] = fma(x[i, j], W[r, j], a[l]) over the block's
 *      columns j = l, l + 16, l + 32, ... in increasing j, from a[l] = +0; the end of k is
 *      padded with zeros up to a multiple of 16 (there the step is fma(0, 0, a[l])).
 *   2. the block's sum by a fixed tree: b[l] = a[l] + a[l + 8] (l < 8),
 *      c[l] = b[l] + b[l + 4] (l < 4), d[l] = c[l] + c[l + 2] (l < 2), t = d[0] + d[1];
 *   3. s = t of block 0, then s = s + t for each next block in order;
 *   4. y = s + bias[r] when there is a bias, else y = s.
 * The AVX-512 tile holds the 16 lanes in one zmm accumulator, the AVX2 kernels in two ymm
 * (lanes 0-7 and 8-15), so the two give the same bits, and a fleet of mixed CPUs the same
 * answers. The portable
 * kernels ("cpu-scalar") follow the same blocks, lanes and tree with a rounded multiply and
 * a rounded add instead of the fused multiply-add: their own order, with the same
 * invariance. Weights are widened to fp32 exactly (bf16: a shift; f16: IEEE binary16), in
 * registers (GEMV) or into a packed panel (GEMM): the products are the same either way.
 *
 * Why this order: the GEMV streams each weight row once (decode is bandwidth-bound; one
 * row at a time, see matmul.c), and one 16-lane accumulator per output is what a GEMM tile
 * of many outputs can afford in registers (a 4 x 6 tile holds 24 zmm accumulators). The
 * blocks let the GEMM walk k in pieces whose panel stays in L1 and carry only a scalar per
 * output between them (in y itself), as a GEMM carries its C tile; without them the 16
 * lanes of every output would have to be kept between pieces, 16 times the traffic.
 *
 * The bf16 compute order. A second canonical order, for W in BF16 on a backend made with
 * bf16 compute (dg_backend_opts.cpu_bf16_compute; off by default, F32 and F16 weights keep
 * the order above): the activations are rounded to bf16, as llama.cpp's BF16 path does,
 * and each pair of products is one lane step of VDPBF16PS (_mm512_dpbf16_ps), which does
 * 32 bf16 multiply-adds per zmm instruction, twice the fp32 FMA, and reads the weights
 * without widening. The same invariance: y[i, r] depends on x's row i, W's row r, k and
 * bias[r] only.
 *   0. x's row is rounded to bf16 (each element once, as VCVTNEPS2BF16 does): zeros and
 *      fp32 denormals become a zero of their sign, a NaN the quiet NaN (u >> 16) | 0x40,
 *      any other u (the bits) (u + 0x7fff + ((u >> 16) & 1)) >> 16 (round to nearest even;
 *      overflow gives the infinity). xb[j] is that value, W[r, j] the stored one.
 *   1. k is cut into blocks of KB = 2048 columns (the last one shorter). In a block, 16
 *      lanes; step s takes the block's columns 32s .. 32s + 31, lane l the pair
 *      c = 32s + 2l, c + 1:
 *          a[l] = F(a[l] + xb[c + 1]·W[r, c + 1]);  a[l] = F(a[l] + xb[c]·W[r, c]),
 *      the odd column first (Intel's pseudo-code of VDPBF16PS), each a fused multiply-add in
 *      fp32 rounded to nearest even (the product of two bf16 is exact in fp32 unless it
 *      leaves the exponent range), where F reads a denormal input (a weight, the
 *      accumulator) as a zero of its sign and returns a zero of the result's sign for a
 *      tiny result (below 2^-126 after rounding to 24 bits with an unbounded exponent):
 *      MXCSR's DAZ and FTZ, which the instruction applies whatever MXCSR holds. From
 *      a[l] = +0; the end of k is padded with zeros (x = W = +0) up to a multiple of 32.
 *   2. - 4. as in the order above (the tree, the blocks' sums in order, the bias): plain
 *      fp32 adds under the thread's MXCSR (by default no flushing).
 * The AVX-512 BF16 kernels (matmul_bf16.c) are the instruction itself. The fallback
 * (matmul_bf16_fallback.c: AVX2 + FMA, and portable C) computes the same lane steps with
 * fused multiply-adds while MXCSR has DAZ and FTZ set, and gives the same bits (checked
 * against the instruction bit for bit, denormal and underflowing products included), so a
 * fleet with and without avx512_bf16 agrees; it is slower than the fp32 order there.
 *
 * Why these choices: the pairs are adjacent columns, so a weight row is used as stored (the
 * GEMV streams it, the GEMM copies 64-byte pieces into its panel) and a rounded row of x
 * likewise; the 16 lanes, the tree, the block sums and the bias are the fp32 order's, so
 * its tile shape, blocking and drivers carry over. KB is 2048 so that a panel of 6 bf16
 * rows fills 24 KiB of L1 as the fp32 panel does at 1024, and a tile's horizontal sums
 * come half as often (the tile ran 3-5% faster than at 1024). Rounding x is row-local, so
 * m-invariant; the driver rounds it once per call into the backend's buffer (matmul.c).
 *
 * The panel orders. Two more, for a BF16 W in the panel layout (backend.h, which the CPU
 * backend gives only to the matrices of a network whose rows need not be a decoder's
 * GEMV's bits: the vision tower, the DiT), one accumulator per output over all of k:
 *   bf16 compute (the bf16 panel order): step 0 as above; then the lane step of VDPBF16PS
 *     over all of k in order:
 *       a = +0; for s = 0 .. k/2 - 1:  a = F(a + xb[2s + 1]·W[r, 2s + 1]);  a = F(a + xb[2s]·W[r, 2s]);
 *     F as above (DAZ and FTZ);
 *   fp32 compute (the fp32 panel order): x as it is,
 *       a = +0; for c = 0 .. k - 1:  a = fma(x[i, c], W[r, c], a)   (ascending c),
 *     fused multiply-adds rounded to nearest under the thread's MXCSR;
 * then y = a + bias[r] (a plain fp32 add) when there is a bias, else y = a. No lanes of k,
 * no tree, no blocks: the same invariance (y[i, r] depends on x's row i, W's row r, k and
 * bias[r] only). The AVX-512 kernels (matmul_bf16.c, matmul_avx512.c) keep 16 outputs of
 * a panel in each zmm, x's pair (or value) broadcast; the fallbacks (AVX2 + FMA: one tile
 * for both orders in matmul_panel_ymm.h; portable C: matmul_bf16_fallback.c, matmul.c) do
 * the same steps, the same bits
 * (the portable fp32 one with fmaf, unlike the canonical order's portable kernels).
 *
 * Why: the canonical orders' lanes run along k, so every output ends in a horizontal sum
 * (46 cycles a 4 x 6 bf16 tile, 4.5% of the tile at k = 1280) and both operands of a
 * product stream through L1 (a step of that tile loads 10 zmm for 24 VDPBF16PS; at k =
 * 2048 its panel and rows of x are 40 KB, more than L1, and the vision tower's down
 * projection and merger ran at 200 GFLOP/s against 212 at k = 1280), and the GEMM packs
 * panels at run time. Here a step loads 4 zmm of W for 24 VDPBF16PS (or 48 FMAs) with 6
 * rows of x broadcast, W is read once per 6 rows of x as one stream in the order it is
 * stored, and nothing is packed: bf16 219-228 GFLOP/s on the tower's shapes (212 and 200
 * before), fp32 109-114 (the FMA's limit; 94-107 before), the tower 0.94x and 0.90x the
 * time (engine/MODELS.md, "The panel orders"). A decoder's matrices keep the canonical
 * orders: its GEMV reads each row as one stream, and a row's bits must not depend on the
 * batch (a prefill chunk beside decode rows), which a panel's GEMV would also give, but
 * not its speed on a row-major stream. */
#ifndef DG_CPU_MATMUL_H
#define DG_CPU_MATMUL_H

#include <stdint.h>

#include "cpu_kernels.h"

#define DG_MATMUL_LANES 16     /* the canonical order's lanes */
#define DG_MATMUL_KB 1024      /* the canonical order's block of k (a multiple of 16) */
#define DG_MATMUL_MR_MAX 4     /* the most rows of x a tile computes */
#define DG_MATMUL_NR_MAX 6     /* the most rows of W a tile computes */
#define DG_MATMUL_GEMV_ROWS 8  /* the most rows of x a multi-row GEMV kernel call takes (the
                                  decode of a few sequences) */
/* The GEMV takes up to GEMV_MAX rows of x (the GEMM above), past GEMV_ROWS in calls of 8
 * rows against tiles of W of at most GEMV_L2 bytes (matmul.c gemv_tile_for). */
#define DG_MATMUL_GEMV_MAX 48
#define DG_MATMUL_GEMV_L2 (192 * 1024)

/* GEMM blocking (matmul.c). A task is an m-block of x against a chunk of at most NC rows
 * of W. For each block of k, the chunk's panels (nr rows x the block, widened: 24 KiB at
 * nr = 6, in L1) are packed one after the other, each used by every tile of the m-block;
 * the m-block's XSLAB floats of x (512 KiB: 120 rows of a full block, 144 of k = 896) stay
 * in L2 while the chunk's panels pass. */
#define DG_MATMUL_XSLAB (128 * 1024)
#define DG_MATMUL_MC_MAX 240   /* a multiple of every mr (2, 3, 4) */
#define DG_MATMUL_NC 96        /* a multiple of every nr (2, 3, 4, 6) */
/* Per-thread GEMM scratch, floats: one panel. */
#define DG_MATMUL_SCRATCH_FLOATS (DG_MATMUL_NR_MAX * DG_MATMUL_KB)

/* flags of a tile call */
#define DG_TILE_FIRST 1        /* k's first block: y = t (else y = y + t) */
#define DG_TILE_LAST  2        /* k's last block: then y = y + bias (bias != NULL) */

/* One instruction set's kernels. */
typedef struct {
    int mr, nr;                /* tile: rows of x, rows of W */
    /* GEMV: y[r] for W rows r0 <= r < r1, in the canonical order, from x[k], over the
     * columns p0 .. p1-1 (a GEMV span, matmul.c: all of k, or one block of W's blocked
     * layout), each row of W read across the span before the next: the sum of the blocks
     * before p0 is taken from y, the bias added when p1 = k. */
    void (*rows)(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                 int64_t r1, int64_t p0, int64_t p1);
    /* The GEMV of m = 2 .. DG_MATMUL_GEMV_ROWS rows of x [m, k]: y[i·w.rows + r] for W rows
     * r0 <= r < r1 over the span, each the same bits as `rows` gives for x's row i. NULL:
     * such m go to the GEMM (the AVX2 and portable kernels). */
    void (*rows_multi)(float *y, const float *x, int m, const dg_weight *w, const float *bias,
                       int64_t r0, int64_t r1, int64_t p0, int64_t p1);
    /* panel[ceil(kc/16)][nr][16] = W rows r0 .. r0+nn-1, columns k0 .. k0+kc-1, as fp32;
     * rows nn .. nr-1 and the columns past kc are zeros. kc <= KB. */
    void (*pack)(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                 int64_t kc);
    /* An rm x nr tile (rm <= mr) over one block of k of kc columns (steps 1-3 of the order,
     * then 4 on DG_TILE_LAST): x rows at x + i·ldx (the block's first column); the outputs
     * are y[i·ldy + j] for j < nn, bias + j when bias != NULL. */
    void (*tile)(int rm, const float *x, int64_t ldx, const float *panel, int64_t kc, int flags,
                 float *y, int64_t ldy, int nn, const float *bias);
} dg_matmul_kernels;

extern const dg_matmul_kernels dg_matmul_portable, dg_matmul_avx2, dg_matmul_avx512;

/* The GEMV and the panel packing of the AVX2 file, which the AVX-512 kernels share. */
void dg_matmul_rows_avx2(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                         int64_t r1, int64_t p0, int64_t p1);
void dg_matmul_pack_avx2(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                         int64_t kc);

/* The plain fp32 adds of the tree (step 2 of both orders), in the order's sequence. */
static inline float dg_matmul_reduce16(const float a[DG_MATMUL_LANES]) {
    float b[8], c[4];
    for (int l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) c[l] = b[l] + b[l + 4];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* The flags of a tile call for the block of kc columns at k0 of a row of k. */
static inline int dg_matmul_block_flags(int64_t k0, int64_t kc, int64_t k) {
    return (k0 == 0 ? DG_TILE_FIRST : 0) | (k0 + kc == k ? DG_TILE_LAST : 0);
}

/* Steps 3 - 4 of both orders for one output: the block's sum t into *o (set on k's first
 * block, added after: *o + t), then the bias (when not NULL) after k's last (flags of a
 * tile call). */
static inline void dg_matmul_store(float *o, float t, int flags, const float *bias) {
    *o = flags & DG_TILE_FIRST ? t : *o + t;
    if ((flags & DG_TILE_LAST) && bias) *o += *bias;
}

/* ---- the bf16 compute order's kernels ---- */

#define DG_MATMUL_BF16_KB 2048          /* its block of k (a multiple of 32) */
#define DG_MATMUL_BF16_NR_MAX 6         /* the most rows of W a tile computes */
/* Per-thread scratch, elements: a GEMM task's chunk of W (at most DG_MATMUL_NC rows) packed
 * for one block of k, 384 KiB, kept in L2 beside an m-block of x while the task runs all of
 * x's rows against it (packed once a block instead of once per m-block, which was 4.7% of
 * the vision tower's time: its GEMMs at one thread 197-203 -> 193-196 ms). */
#define DG_MATMUL_BF16_PANEL ((int64_t)DG_MATMUL_NC * DG_MATMUL_BF16_KB)
/* The rounded x of a matmul call (per backend, elements: 4 MiB): all of it when it fits,
 * else a span of rows and blocks at a time (matmul.c). */
#define DG_MATMUL_BF16_XBUF (2048 * 1024)
/* The rows of rounded x a GEMM task takes per block of k (its m-block) stay in L2: 256 Ki
 * elements, 512 KiB (120 rows of a full block, 240 of k = 896). */
#define DG_MATMUL_BF16_XSLAB (256 * 1024)

/* One instruction set's bf16 compute kernels. Rounded x (step 0) lives in rows of xb with
 * a stride ldxb (a multiple of 32); a block's row is zero past its kc columns, up to the
 * next multiple of 32. */
typedef struct {
    int mr, nr;                /* GEMM tile: rows of x, rows of W (nr <= DG_MATMUL_BF16_NR_MAX) */
    /* Step 0: xb[i·ldxb + c] = x[i·ldx + c] rounded, for i < m, c < kc; zeros from kc to the
     * next multiple of 32. */
    void (*round)(uint16_t *xb, int64_t ldxb, const float *x, int64_t ldx, int m, int64_t kc);
    /* The GEMV of m = 1 .. DG_MATMUL_GEMV_ROWS rounded rows of x over columns k0 .. k0+kc-1
     * (k0 a multiple of DG_MATMUL_BF16_KB: whole blocks of the order, the last perhaps
     * shorter; a GEMV span, matmul.c: one block where W is in the blocked layout), W read
     * where it lies: y[i·ldy + r] for W rows r0 <= r < r1, steps 1-3 of the order block
     * after block (into y: the first block of k sets it, the others add), then 4 after k's
     * last block. Each row of W is read to the span's end before the next (decode's weights
     * are then one sequential stream: walked block by block over a row-major W, the 896 x
     * 4864 matrix was read at 12 GB/s against 33 here). */
    void (*rows)(float *y, int64_t ldy, const uint16_t *xb, int64_t ldxb, int m, const dg_weight *w,
                 int64_t r0, int64_t r1, int64_t k0, int64_t kc, const float *bias);
    /* An rm x nr tile (rm <= mr) over one block of kc columns: rounded x rows at
     * xb + i·ldxb, the panel of dg_matmul_bf16_pack; the outputs are y[i·ldy + j] for
     * j < nn, bias + j when bias != NULL. */
    void (*tile)(int rm, const uint16_t *xb, int64_t ldxb, const uint16_t *panel, int64_t kc,
                 int flags, float *y, int64_t ldy, int nn, const float *bias);
} dg_matmul_bf16_kernels;

extern const dg_matmul_bf16_kernels dg_matmul_bf16_portable, dg_matmul_bf16_avx2, dg_matmul_bf16_avx512;

/* panel[ceil(kc/32)][nr][32] = W rows r0 .. r0+nn-1 (BF16), columns k0 .. k0+kc-1, as
 * stored; rows nn .. nr-1 and the columns past kc are zeros. kc <= DG_MATMUL_BF16_KB. The
 * pairs of a lane are adjacent columns, so each piece is a copy of 64 bytes. */
void dg_matmul_bf16_pack(uint16_t *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                         int64_t kc);

/* ---- the bf16 panel order's kernels (over the panel layout, backend.h) ---- */

#define DG_MATMUL_PANEL_MR 6   /* the most rows of x a panel tile takes */

/* One instruction set's panel tile: rm <= DG_MATMUL_PANEL_MR rounded rows of x at
 * xb + i·ldxb (pairs: ldxb even) against one panel of np <= DG_WEIGHT_PANEL_ROWS rows of W
 * (panel[s·np + j] the pair of step s of its row j), `steps` steps: y[i·ldy + j] for j < np,
 * plus bias[j] when bias != NULL. */
typedef void (*dg_matmul_panel_tile)(int rm, const uint16_t *xb, int64_t ldxb, const uint32_t *panel, int np,
                                     int64_t steps, float *y, int64_t ldy, const float *bias);

extern const dg_matmul_panel_tile dg_matmul_panel_portable, dg_matmul_panel_avx2, dg_matmul_panel_avx512;

/* The same for the fp32 panel order: x's rows as they are (ldx apart). */
typedef void (*dg_matmul_panel_f32_tile)(int rm, const float *x, int64_t ldx, const uint32_t *panel, int np,
                                         int64_t steps, float *y, int64_t ldy, const float *bias);

extern const dg_matmul_panel_f32_tile dg_matmul_panel_f32_portable, dg_matmul_panel_f32_avx2,
    dg_matmul_panel_f32_avx512;

/* y[m, w.rows] = x[m, w.cols] · Wᵀ (+ bias): GEMV for m = 1, the multi-row GEMV up to
 * DG_MATMUL_GEMV_ROWS where the kernels have one, GEMM above; rows split over
 * c->n_threads; scratch is c->gemm (DG_MATMUL_SCRATCH_FLOATS per thread). A BF16 W on a
 * backend with bf16 compute takes the bf16 order, its kernels (the widest c->simd has)
 * with c->xbf16 and c->gemm_bf16 (DG_MATMUL_BF16_PANEL per thread); a W in the panel
 * layout the panel order of the backend's compute, a panel a task (bf16: with c->xbf16). */
void dg_cpu_matmul(const dg_cpu *c, float *y, const float *x, const dg_weight *w, const float *bias,
                   int m);

#endif
