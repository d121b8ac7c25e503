/* matmul.c — the CPU matmul: the GEMV (m = 1) and GEMM (m > 1) drivers over the kernel set
 * the backend uses, and the portable kernels ("cpu-scalar"). The canonical order every
 * kernel follows, which makes a row of y the same whatever m, is stated in matmul.h.
 *
 * GEMV. Decode is bandwidth-bound: every weight byte is read once per token, in its stored
 * dtype (bf16: half the bytes of fp32), widened in registers. One row at a time: the
 * weights are then one sequential stream. (Four rows side by side read four short
 * interleaved streams, which the hardware prefetcher follows badly: 8.5 GB/s against
 * 19-21 GB/s for one stream, measured again on this project's EPYC for this order.)
 *
 * GEMM. Dot-product tiles (the tinyBLAS approach): each output of an mr x nr tile has its
 * own 16-lane accumulator over k, so the tile computes each output exactly as the GEMV
 * does. A panel of nr weight rows is widened to fp32 once per k-block and used by every
 * tile of the m-block; the blocking constants are in matmul.h. Threads take whole tasks
 * (an m-block against a chunk of W rows): an output is computed by one thread, in one
 * order, whatever the thread count. */
#include "matmul.h"

#include <omp.h>

/* The portable kernels must not fuse a multiply and an add (GCC does not in ISO C mode;
 * clang would within one expression where the target has FMA). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* ---- portable kernels --------------------------------------------------------------------- */

#define PORTABLE_MR 4
#define PORTABLE_NR 4

/* The tree of matmul.h step 2. */
static float reduce16(const float a[DG_MATMUL_LANES]) {
    float b[8], c[4];
    for (int l = 0; l < 8; l++) b[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) c[l] = b[l] + b[l + 4];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

static void rows_portable(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                          int64_t r1) {
    const int64_t k = w->cols;
    for (int64_t r = r0; r < r1; r++) {
        float s = 0.0f;
        for (int64_t k0 = 0; k0 < k; k0 += DG_MATMUL_KB) {
            const int64_t end = k0 + DG_MATMUL_KB < k ? k0 + DG_MATMUL_KB : k;
            float a[DG_MATMUL_LANES] = {0};
            for (int64_t j = k0; j < k0 + (end - k0 + 15) / 16 * 16; j++) {
                const float wv = j < k ? dg_load_f32(w->data, w->dtype, (size_t)(r * k + j)) : 0.0f;
                a[(j - k0) % 16] += (j < k ? x[j] : 0.0f) * wv;
            }
            s = k0 == 0 ? reduce16(a) : s + reduce16(a);
        }
        y[r] = bias ? s + bias[r] : s;
    }
}

static void pack_portable(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                          int64_t kc) {
    const int64_t steps = (kc + 15) / 16;
    for (int64_t s = 0; s < steps; s++)
        for (int j = 0; j < nr; j++)
            for (int l = 0; l < 16; l++) {
                const int64_t col = s * 16 + l;
                panel[(s * nr + j) * 16 + l] =
                    j < nn && col < kc
                        ? dg_load_f32(w->data, w->dtype, (size_t)((r0 + j) * w->cols + k0 + col))
                        : 0.0f;
            }
}

static void tile_portable(int rm, const float *x, int64_t ldx, const float *panel, int64_t kc, int flags,
                          float *y, int64_t ldy, int nn, const float *bias) {
    enum { NR = PORTABLE_NR, L = DG_MATMUL_LANES };
    const int64_t steps = (kc + 15) / 16;
    float a[PORTABLE_MR][NR][L] = {{{0}}};
    for (int64_t s = 0; s < steps; s++)
        for (int i = 0; i < rm; i++) {
            float xs[L];
            for (int l = 0; l < L; l++) xs[l] = s * 16 + l < kc ? x[i * ldx + s * 16 + l] : 0.0f;
            for (int j = 0; j < NR; j++)
                for (int l = 0; l < L; l++) a[i][j][l] += xs[l] * panel[(s * NR + j) * L + l];
        }
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < nn; j++) {
            float *o = y + i * ldy + j;
            *o = flags & DG_TILE_FIRST ? reduce16(a[i][j]) : *o + reduce16(a[i][j]);
            if ((flags & DG_TILE_LAST) && bias) *o += bias[j];
        }
}

const dg_matmul_kernels dg_matmul_portable = {PORTABLE_MR, PORTABLE_NR, rows_portable, NULL, pack_portable,
                                              tile_portable};

/* ---- drivers ---------------------------------------------------------------------------- */

static void gemv(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                 const dg_weight *w, const float *bias) {
    const int64_t n = w->rows;
    /* Tiles of 64 rows handed out dynamically: each thread streams contiguous weight
     * memory, and a thread slowed down by another process (the cores are shared) does
     * not hold the others back, as a static split would. */
    const int64_t tile = 64, n_tiles = (n + tile - 1) / tile;
    const int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 2)
    for (int64_t t = 0; t < n_tiles; t++) K->rows(y, x, w, bias, t * tile, (t + 1) * tile < n ? (t + 1) * tile : n);
}

/* m = 2 .. DG_MATMUL_GEMV_ROWS rows of x (the decode step of several sequences): W's rows
 * split as the GEMV splits them, each read once for all of x's rows. */
static void gemv_multi(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                       const dg_weight *w, const float *bias, int m) {
    const int64_t n = w->rows, tile = 64, n_tiles = (n + tile - 1) / tile;
    const int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 2)
    for (int64_t t = 0; t < n_tiles; t++)
        K->rows_multi(y, x, m, w, bias, t * tile, (t + 1) * tile < n ? (t + 1) * tile : n);
}

/* A block of W: rows r0 .. r0+nn-1, columns k0 .. k0+kc-1 (nn = 0: none). */
typedef struct {
    int64_t r0, k0, kc;
    int     nn;
} w_block;

/* Asks for part `part` of `parts` of block b in L2: the panel packed next is fetched a slice
 * per tile of the panel before it, so that packing does not wait on memory (it did, for a
 * tenth of the GEMM's time) and the requests do not come in one burst. */
static void prefetch_slice(const dg_weight *w, w_block b, int part, int parts) {
    const int64_t esize = (int64_t)dg_dtype_size(w->dtype), lines = (b.kc * esize + 63) / 64;
    for (int64_t q = b.nn * lines * part / parts; q < b.nn * lines * (part + 1) / parts; q++)
        __builtin_prefetch((const char *)w->data + ((b.r0 + q / lines) * w->cols + b.k0) * esize + q % lines * 64, 0, 2);
}

/* Rows m0 .. m0+mc-1 of x against rows n0 .. n0+nc-1 of W, all of k (matmul.h, blocking). */
static void gemm_task(const dg_matmul_kernels *K, float *panel, float *y, const float *x,
                      const dg_weight *w, const float *bias, int64_t m0, int mc, int64_t n0, int nc) {
    const int64_t n = w->rows, k = w->cols, tiles_m = (mc + K->mr - 1) / K->mr;
    for (int64_t k0 = 0; k0 < k; k0 += DG_MATMUL_KB) {
        const int64_t kc = k - k0 < DG_MATMUL_KB ? k - k0 : DG_MATMUL_KB;
        const int flags = (k0 == 0 ? DG_TILE_FIRST : 0) | (k0 + kc == k ? DG_TILE_LAST : 0);
        for (int p = 0; p < nc; p += K->nr) {
            const int nn = nc - p < K->nr ? nc - p : K->nr;
            /* the next panel: the next rows of this block of k, else the first of the next */
            w_block next = {n0 + p + K->nr, k0, kc, nc - p - K->nr < K->nr ? nc - p - K->nr : K->nr};
            if (next.nn <= 0)
                next = (w_block){n0, k0 + kc, k - k0 - kc < DG_MATMUL_KB ? k - k0 - kc : DG_MATMUL_KB,
                                 k0 + kc < k ? (nc < K->nr ? nc : K->nr) : 0};
            K->pack(panel, w, n0 + p, nn, K->nr, k0, kc);
            for (int i = 0; i < mc; i += K->mr) {
                prefetch_slice(w, next, i / K->mr, (int)tiles_m);
                K->tile(mc - i < K->mr ? mc - i : K->mr, x + (m0 + i) * k + k0, k, panel, kc, flags,
                        y + (m0 + i) * n + n0 + p, n, nn, bias ? bias + n0 + p : NULL);
            }
        }
    }
}

static void gemm(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                 const dg_weight *w, const float *bias, int m) {
    const int64_t n = w->rows, k = w->cols, kc = k < DG_MATMUL_KB ? k : DG_MATMUL_KB;
    /* rows of x per m-block: XSLAB floats of them, in whole tiles of any mr (12 | MC) */
    int64_t mc = DG_MATMUL_XSLAB / kc / 12 * 12;
    mc = mc < 12 ? 12 : mc > DG_MATMUL_MC_MAX ? DG_MATMUL_MC_MAX : mc;
    const int64_t n_mb = (m + mc - 1) / mc;
    /* Chunks of W rows: NC, or fewer where that leaves under 4 tasks a thread (a small n
     * or m), down to one panel. */
    const int64_t want = (4 * c->n_threads + n_mb - 1) / n_mb;
    int64_t nc = ((n + want - 1) / want + K->nr - 1) / K->nr * K->nr;
    if (nc > DG_MATMUL_NC) nc = DG_MATMUL_NC;
    const int64_t n_nb = (n + nc - 1) / nc, n_tasks = n_mb * n_nb;
    const int nt = n_tasks < c->n_threads ? (int)n_tasks : c->n_threads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < n_tasks; t++) {
        const int64_t nb = t / n_mb, mb = t % n_mb;   /* neighbouring tasks share a W chunk */
        const int64_t m0 = mb * mc, n0 = nb * nc;
        gemm_task(K, c->gemm + (int64_t)omp_get_thread_num() * DG_MATMUL_SCRATCH_FLOATS, y, x, w,
                  bias, m0, (int)(m - m0 < mc ? m - m0 : mc), n0, (int)(n - n0 < nc ? n - n0 : nc));
    }
}

void dg_cpu_matmul(const dg_cpu *c, float *y, const float *x, const dg_weight *w, const float *bias,
                   int m) {
    const dg_matmul_kernels *K = c->simd >= DG_CPU_AVX512 ? &dg_matmul_avx512
                               : c->simd >= DG_CPU_AVX2   ? &dg_matmul_avx2
                                                          : &dg_matmul_portable;
    if (m == 1) gemv(c, K, y, x, w, bias);
    else if (m <= DG_MATMUL_GEMV_ROWS && K->rows_multi) gemv_multi(c, K, y, x, w, bias, m);
    else gemm(c, K, y, x, w, bias, m);
}
