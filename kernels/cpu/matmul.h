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
 * lanes of every output would have to be kept between pieces, 16 times the traffic. */
#ifndef DG_CPU_MATMUL_H
#define DG_CPU_MATMUL_H

#include <stdint.h>

#include "cpu_kernels.h"

#define DG_MATMUL_LANES 16     /* the canonical order's lanes */
#define DG_MATMUL_KB 1024      /* the canonical order's block of k (a multiple of 16) */
#define DG_MATMUL_MR_MAX 4     /* the most rows of x a tile computes */
#define DG_MATMUL_NR_MAX 6     /* the most rows of W a tile computes */
#define DG_MATMUL_GEMV_ROWS 8  /* the most rows of x the multi-row GEMV takes (the decode of
                                  a few sequences); more go to the GEMM */

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
    /* GEMV: y[r] for W rows r0 <= r < r1, in the canonical order, from x[k]. */
    void (*rows)(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                 int64_t r1);
    /* The GEMV of m = 2 .. DG_MATMUL_GEMV_ROWS rows of x [m, k]: y[i·w.rows + r] for W rows
     * r0 <= r < r1, each the same bits as `rows` gives for x's row i. NULL: such m go to
     * the GEMM (the AVX2 and portable kernels). */
    void (*rows_multi)(float *y, const float *x, int m, const dg_weight *w, const float *bias,
                       int64_t r0, int64_t r1);
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
                         int64_t r1);
void dg_matmul_pack_avx2(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                         int64_t kc);

/* y[m, w.rows] = x[m, w.cols] · Wᵀ (+ bias): GEMV for m = 1, the multi-row GEMV up to
 * DG_MATMUL_GEMV_ROWS where the kernels have one, GEMM above; rows split over
 * c->n_threads; scratch is c->gemm (DG_MATMUL_SCRATCH_FLOATS per thread). */
void dg_cpu_matmul(const dg_cpu *c, float *y, const float *x, const dg_weight *w, const float *bias,
                   int m);

#endif
