/* matmul.c — the CPU matmul: the GEMV (m = 1) and GEMM (m > 1) drivers over the kernel set
 * the backend uses, and the portable kernels ("cpu-scalar"). The canonical order every
 * kernel follows, which makes a row of y the same whatever m, is stated in matmul.h.
 *
 * GEMV. Decode is bandwidth-bound: every weight byte is read once per token, in its stored
 * dtype (bf16: half the bytes of fp32), widened in registers. One row at a time: the
 * weights are then one sequential stream. (Four rows side by side read four short
 * interleaved streams, which the hardware prefetcher follows badly: 8.5 GB/s against
 * 19-21 GB/s for one stream, measured again on this project's EPYC for this order.) A
 * weight whose row of x is long is stored in blocks of DG_WEIGHT_KB columns (backend.h
 * dg_weight_kb_for), and the GEMV takes it a block at a time over all its rows (gemv_span),
 * the sums of the blocks before waiting in y: one stream still, with only the block's part
 * of x in L1. (Row-major, the fp32 x of the down projection, 19 KB, shared the 32 KB L1
 * with the weight stream and the matrix was read at 16-17 GB/s; in blocks 31, as the
 * others.)
 *
 * GEMM. Dot-product tiles (the tinyBLAS approach): each output of an mr x nr tile has its
 * own 16-lane accumulator over k, so the tile computes each output exactly as the GEMV
 * does. A panel of nr weight rows is widened to fp32 once per k-block and used by every
 * tile of the m-block; the blocking constants are in matmul.h. Threads take whole tasks
 * (an m-block against a chunk of W rows): an output is computed by one thread, in one
 * order, whatever the thread count.
 *
 * The bf16 compute order (matmul.h) has drivers of the same shape over its own kernels:
 * x is rounded to bf16 once per call into the backend's buffer (a span of it at a time when
 * it is larger), then the GEMV or the GEMM reads the rounded rows as the fp32 drivers read
 * x, the GEMM's panels being copies of the weights, not widened. */
#include "matmul.h"

#include <omp.h>
#include <math.h>
#include <string.h>

/* The portable kernels must not fuse a multiply and an add (GCC does not in ISO C mode;
 * clang would within one expression where the target has FMA). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

/* ---- portable kernels --------------------------------------------------------------------- */

#define PORTABLE_MR 4
#define PORTABLE_NR 4

static void rows_portable(float *y, const float *x, const dg_weight *w, const float *bias, int64_t r0,
                          int64_t r1, int64_t p0, int64_t p1) {
    const int64_t k = w->cols, ld = dg_weight_ld(w, p0);
    const size_t es = dg_dtype_size(w->dtype);
    const char *w0 = dg_weight_at(w, 0, p0);   /* row r's column p0 + j: w0 + (r·ld + j)·es */
    for (int64_t r = r0; r < r1; r++) {
        float s = p0 ? y[r] : 0.0f;   /* the sum of the blocks before p0 */
        for (int64_t k0 = p0; k0 < p1; k0 += DG_MATMUL_KB) {
            const int64_t end = k0 + DG_MATMUL_KB < k ? k0 + DG_MATMUL_KB : k;
            float a[DG_MATMUL_LANES] = {0};
            for (int64_t j = k0; j < k0 + (end - k0 + 15) / 16 * 16; j++) {
                const float wv = j < k ? dg_load_f32(w0 + (size_t)(r * ld) * es, w->dtype, (size_t)(j - p0)) : 0.0f;
                a[(j - k0) % 16] += (j < k ? x[j] : 0.0f) * wv;
            }
            s = k0 == 0 ? dg_matmul_reduce16(a) : s + dg_matmul_reduce16(a);
        }
        y[r] = p1 == k && bias ? s + bias[r] : s;
    }
}

static void pack_portable(float *panel, const dg_weight *w, int64_t r0, int nn, int nr, int64_t k0,
                          int64_t kc) {
    const int64_t steps = (kc + 15) / 16, ld = dg_weight_ld(w, k0);
    const char *w0 = dg_weight_at(w, r0, k0);   /* row r0 + j's column k0 + col: element j·ld + col */
    for (int64_t s = 0; s < steps; s++)
        for (int j = 0; j < nr; j++)
            for (int l = 0; l < 16; l++) {
                const int64_t col = s * 16 + l;
                panel[(s * nr + j) * 16 + l] =
                    j < nn && col < kc ? dg_load_f32(w0, w->dtype, (size_t)(j * ld + col)) : 0.0f;
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
        for (int j = 0; j < nn; j++)
            dg_matmul_store(y + i * ldy + j, dg_matmul_reduce16(a[i][j]), flags, bias ? bias + j : NULL);
}

/* The fp32 panel order (matmul.h) in C: fmaf is the fused multiply-add the SIMD tiles do,
 * so the same bits. */
static void panel_f32_portable(int rm, const float *x, int64_t ldx, const uint32_t *panel, int np, int64_t steps,
                               float *y, int64_t ldy, const float *bias) {
    for (int i = 0; i < rm; i++)
        for (int j = 0; j < np; j++) {
            float a = 0.0f;
            for (int64_t s = 0; s < steps; s++) {
                uint32_t d, lo, hi;
                memcpy(&d, panel + s * np + j, sizeof d);   /* a panel may not be 4-byte aligned */
                lo = d << 16;
                hi = d & 0xffff0000u;
                float we, wo;
                memcpy(&we, &lo, 4);
                memcpy(&wo, &hi, 4);
                a = fmaf(x[i * ldx + 2 * s + 1], wo, fmaf(x[i * ldx + 2 * s], we, a));
            }
            y[i * ldy + j] = bias ? a + bias[j] : a;
        }
}

const dg_matmul_panel_f32_tile dg_matmul_panel_f32_portable = panel_f32_portable;

const dg_matmul_kernels dg_matmul_portable = {PORTABLE_MR, PORTABLE_NR, rows_portable, NULL, pack_portable,
                                              tile_portable};

/* ---- drivers ---------------------------------------------------------------------------- */

/* The GEMVs' split of W's rows: tiles handed out in runs that shrink as the tiles run out
 * (OpenMP's guided schedule: a thread's next run is the tiles left over the threads), so
 * that each thread streams long contiguous stretches of weight memory, and a thread slowed
 * down by another process (the cores are shared) does not hold the others back, as a static
 * split would. Tiles handed out one at a time, each thread's stream restarting every 64
 * rows, took 1.2x as long at two threads (a decode step's products, 21.9 against 17.8 ms;
 * 36.3 against 34.6 at 8 rows of x; static halves 18.1 and 33.9). 64 rows a tile, or fewer
 * (down to 16) where that would leave under 4 tiles a thread: the k and v projections (128
 * rows) were one pair of tiles, which one thread took while the other waited. */
static int64_t gemv_tile(const dg_cpu *c, int64_t n) {
    const int64_t per = (n + 4 * c->n_threads - 1) / (4 * c->n_threads);
    return per >= 64 ? 64 : per <= 16 ? 16 : (per + 15) / 16 * 16;
}

/* The columns a GEMV reads in one pass over W's rows: all of k where W is row-major (each
 * row to its end, one stream), one block at a time where it is blocked (backend.h: each
 * block one stream, and only the block's part of x in L1). Taken a block at a time but
 * each tile's rows through all the blocks, the blocks were three streams in turn, and the
 * down projection read at 29-31 GB/s against 33 in bf16 compute. */
static int64_t gemv_span(const dg_weight *w) { return w->kb ? w->kb : w->cols; }

static void gemv(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                 const dg_weight *w, const float *bias) {
    const int64_t n = w->rows, k = w->cols, span = gemv_span(w), tile = gemv_tile(c, n),
                  n_tiles = (n + tile - 1) / tile;
    const int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
    for (int64_t p0 = 0; p0 < k; p0 += span) {
        const int64_t p1 = k - p0 < span ? k : p0 + span;
#pragma omp parallel for num_threads(nt) schedule(guided)
        for (int64_t t = 0; t < n_tiles; t++)
            K->rows(y, x, w, bias, t * tile, (t + 1) * tile < n ? (t + 1) * tile : n, p0, p1);
    }
}

/* The tile of W rows for a GEMV of m rows of x over kc columns of esize bytes: gemv_tile's;
 * past DG_MATMUL_GEMV_ROWS rows of x, each tile is taken by the kernel once for each 8 of
 * them, the first time from memory and then from L2, so it is cut to DG_MATMUL_GEMV_L2
 * bytes (16 rows at the least). */
static int64_t gemv_tile_for(const dg_cpu *c, int64_t n, int m, int64_t kc, int64_t esize) {
    const int64_t tile = gemv_tile(c, n), cap = DG_MATMUL_GEMV_L2 / (kc * esize) / 16 * 16;
    if (m <= DG_MATMUL_GEMV_ROWS || tile <= cap) return tile;
    return cap < 16 ? 16 : cap;
}

/* m = 2 .. DG_MATMUL_GEMV_MAX rows of x (the decode step of several sequences): W's rows
 * split as the GEMV splits them, each read once from memory for all of x's rows. */
static void gemv_multi(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                       const dg_weight *w, const float *bias, int m) {
    const int64_t n = w->rows, k = w->cols, span = gemv_span(w),
                  tile = gemv_tile_for(c, n, m, span < k ? span : k, (int64_t)dg_dtype_size(w->dtype)),
                  n_tiles = (n + tile - 1) / tile;
    const int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
    for (int64_t p0 = 0; p0 < k; p0 += span) {
        const int64_t p1 = k - p0 < span ? k : p0 + span;
#pragma omp parallel for num_threads(nt) schedule(guided)
        for (int64_t t = 0; t < n_tiles; t++)
            for (int i = 0; i < m; i += DG_MATMUL_GEMV_ROWS)
                K->rows_multi(y + i * n, x + i * k, m - i < DG_MATMUL_GEMV_ROWS ? m - i : DG_MATMUL_GEMV_ROWS, w, bias,
                              t * tile, (t + 1) * tile < n ? (t + 1) * tile : n, p0, p1);
    }
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
    if (b.nn <= 0) return;
    const int64_t esize = (int64_t)dg_dtype_size(w->dtype), lines = (b.kc * esize + 63) / 64,
                  ld = dg_weight_ld(w, b.k0) * esize;
    const char *w0 = dg_weight_at(w, b.r0, b.k0);
    for (int64_t q = b.nn * lines * part / parts; q < b.nn * lines * (part + 1) / parts; q++)
        __builtin_prefetch(w0 + q / lines * ld + q % lines * 64, 0, 2);
}

/* The panel a task packs after the one of rows n0 + p (nr of them) in the block of k at k0
 * of kc columns (blocks of DG_MATMUL_KB): the next rows of this block, else the first of
 * the next block (nn = 0 after the last). */
static w_block next_panel(const dg_weight *w, int64_t n0, int nc, int p, int nr, int64_t k0, int64_t kc) {
    const int64_t k = w->cols, kb = DG_MATMUL_KB;
    w_block next = {n0 + p + nr, k0, kc, nc - p - nr < nr ? nc - p - nr : nr};
    if (next.nn <= 0)
        next = (w_block){n0, k0 + kc, k - k0 - kc < kb ? k - k0 - kc : kb, k0 + kc < k ? (nc < nr ? nc : nr) : 0};
    return next;
}

/* Rows m0 .. m0+mc-1 of x against rows n0 .. n0+nc-1 of W, all of k (matmul.h, blocking). */
static void gemm_task(const dg_matmul_kernels *K, float *panel, float *y, const float *x,
                      const dg_weight *w, const float *bias, int64_t m0, int mc, int64_t n0, int nc) {
    const int64_t n = w->rows, k = w->cols, tiles_m = (mc + K->mr - 1) / K->mr;
    for (int64_t k0 = 0; k0 < k; k0 += DG_MATMUL_KB) {
        const int64_t kc = k - k0 < DG_MATMUL_KB ? k - k0 : DG_MATMUL_KB;
        const int flags = dg_matmul_block_flags(k0, kc, k);
        for (int p = 0; p < nc; p += K->nr) {
            const int nn = nc - p < K->nr ? nc - p : K->nr;
            const w_block next = next_panel(w, n0, nc, p, K->nr, k0, kc);
            K->pack(panel, w, n0 + p, nn, K->nr, k0, kc);
            for (int i = 0; i < mc; i += K->mr) {
                prefetch_slice(w, next, i / K->mr, (int)tiles_m);
                K->tile(mc - i < K->mr ? mc - i : K->mr, x + (m0 + i) * k + k0, k, panel, kc, flags,
                        y + (m0 + i) * n + n0 + p, n, nn, bias ? bias + n0 + p : NULL);
            }
        }
    }
}

/* The GEMM's tasks: m-blocks of mc rows of x (from the slab of x a block of k may take)
 * against chunks of nc rows of W, task t = (chunk t / n_mb, m-block t % n_mb), so that
 * neighbouring tasks share a W chunk. */
typedef struct {
    int64_t mc, nc, n_mb, n_tasks;
    int     nt;                /* threads */
} gemm_plan;

static gemm_plan plan(const dg_cpu *c, int64_t m, int64_t n, int64_t slab_rows, int nr) {
    gemm_plan g;
    /* rows of x per m-block: the slab's, in whole tiles of any mr (12 | MC) */
    g.mc = slab_rows / 12 * 12;
    g.mc = g.mc < 12 ? 12 : g.mc > DG_MATMUL_MC_MAX ? DG_MATMUL_MC_MAX : g.mc;
    g.n_mb = (m + g.mc - 1) / g.mc;
    /* Chunks of W rows: NC, or fewer where that leaves under 4 tasks a thread (a small n
     * or m), down to one panel. */
    const int64_t want = (4 * c->n_threads + g.n_mb - 1) / g.n_mb;
    g.nc = ((n + want - 1) / want + nr - 1) / nr * nr;
    if (g.nc > DG_MATMUL_NC) g.nc = DG_MATMUL_NC;
    g.n_tasks = g.n_mb * ((n + g.nc - 1) / g.nc);
    g.nt = g.n_tasks < c->n_threads ? (int)g.n_tasks : c->n_threads;
    return g;
}

static void gemm(const dg_cpu *c, const dg_matmul_kernels *K, float *y, const float *x,
                 const dg_weight *w, const float *bias, int m) {
    const int64_t n = w->rows, k = w->cols, kc = k < DG_MATMUL_KB ? k : DG_MATMUL_KB;
    const gemm_plan g = plan(c, m, n, DG_MATMUL_XSLAB / kc, K->nr);
#pragma omp parallel for num_threads(g.nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < g.n_tasks; t++) {
        const int64_t m0 = t % g.n_mb * g.mc, n0 = t / g.n_mb * g.nc;
        gemm_task(K, c->gemm + (int64_t)omp_get_thread_num() * DG_MATMUL_SCRATCH_FLOATS, y, x, w,
                  bias, m0, (int)(m - m0 < g.mc ? m - m0 : g.mc), n0, (int)(n - n0 < g.nc ? n - n0 : g.nc));
    }
}

/* ---- the bf16 compute order's drivers (matmul.h) ---------------------------------------- */

/* Rounded x in c->xbf16 (step 0, once per element): mi rows of x, columns k0 .. k0+kc-1
 * (whole blocks of the order, the last of k perhaps shorter), a row every ld (kc rounded up
 * to 32) elements. */
typedef struct {
    const uint16_t *xb;
    int64_t         k0, kc, ld;
    int             mi;
} x_span;

/* m = 1 .. DG_MATMUL_GEMV_MAX: W's rows split as the GEMV splits them, each read once from
 * memory for all of x's rows (8 at a time against a tile: gemv_tile_for), to the span's
 * end before the next row (the kernels walk the blocks). */
static void gemv_bf16(const dg_cpu *c, const dg_matmul_bf16_kernels *K, float *y, const dg_weight *w,
                      const float *bias, const x_span *s) {
    const int64_t n = w->rows, span = gemv_span(w) < s->kc ? gemv_span(w) : s->kc,   /* within x's span */
                  tile = gemv_tile_for(c, n, s->mi, span, 2), n_tiles = (n + tile - 1) / tile;
    const int nt = n_tiles < c->n_threads ? (int)n_tiles : c->n_threads;
    for (int64_t b = 0; b < s->kc; b += span) {
        const int64_t bc = s->kc - b < span ? s->kc - b : span;
#pragma omp parallel for num_threads(nt) schedule(guided)
        for (int64_t t = 0; t < n_tiles; t++)
            for (int i = 0; i < s->mi; i += DG_MATMUL_GEMV_ROWS)
                K->rows(y + i * n, n, s->xb + i * s->ld + b, s->ld,
                        s->mi - i < DG_MATMUL_GEMV_ROWS ? s->mi - i : DG_MATMUL_GEMV_ROWS, w, t * tile,
                        (t + 1) * tile < n ? (t + 1) * tile : n, s->k0 + b, bc, bias);
    }
}

/* The bf16 GEMM's task: rows n0 .. n0+nc-1 of W against all the span's rows of x. For each
 * block of k the task packs its nc rows once (DG_MATMUL_BF16_PANEL per thread: kept in L2
 * beside an m-block of x), then runs them against x's rows an m-block of mc at a time
 * (each m-block's rows in L2, a panel in L1). */
static void gemm_task_bf16(const dg_matmul_bf16_kernels *K, uint16_t *panels, float *y, const dg_weight *w,
                           const float *bias, const x_span *s, int64_t mc, int64_t n0, int nc) {
    const int64_t n = w->rows, k = w->cols;
    for (int64_t k0 = s->k0; k0 < s->k0 + s->kc; k0 += DG_MATMUL_BF16_KB) {
        const int64_t kc = k - k0 < DG_MATMUL_BF16_KB ? k - k0 : DG_MATMUL_BF16_KB;
        const int64_t psize = (kc + 31) / 32 * 32 * K->nr;
        const int flags = dg_matmul_block_flags(k0, kc, k);
        for (int p = 0; p < nc; p += K->nr)
            dg_matmul_bf16_pack(panels + p / K->nr * psize, w, n0 + p, nc - p < K->nr ? nc - p : K->nr, K->nr, k0, kc);
        for (int64_t m0 = 0; m0 < s->mi; m0 += mc) {
            const int64_t m1 = s->mi - m0 < mc ? s->mi : m0 + mc;
            for (int p = 0; p < nc; p += K->nr) {
                const int nn = nc - p < K->nr ? nc - p : K->nr;
                for (int64_t i = m0; i < m1; i += K->mr)
                    K->tile(m1 - i < K->mr ? (int)(m1 - i) : K->mr, s->xb + i * s->ld + (k0 - s->k0), s->ld,
                            panels + p / K->nr * psize, kc, flags, y + i * n + n0 + p, n, nn,
                            bias ? bias + n0 + p : NULL);
            }
        }
    }
}

static void gemm_bf16(const dg_cpu *c, const dg_matmul_bf16_kernels *K, float *y, const dg_weight *w,
                      const float *bias, const x_span *s) {
    const int64_t n = w->rows, kc = s->kc < DG_MATMUL_BF16_KB ? s->kc : DG_MATMUL_BF16_KB;
    /* planned as for one m-block (m = 1): a task is a chunk of W, and walks x's m-blocks itself */
    const gemm_plan g = plan(c, 1, n, DG_MATMUL_BF16_XSLAB / ((kc + 31) / 32 * 32), K->nr);
#pragma omp parallel for num_threads(g.nt) schedule(dynamic, 1)
    for (int64_t t = 0; t < g.n_tasks; t++)
        gemm_task_bf16(K, c->gemm_bf16 + (int64_t)omp_get_thread_num() * DG_MATMUL_BF16_PANEL, y, w, bias, s, g.mc,
                       t * g.nc, (int)(n - t * g.nc < g.nc ? n - t * g.nc : g.nc));
}

/* Step 0 of mi rows of x (columns k0 .. k0+kc-1, a row every k) into xb, a row every ld:
 * 8 rows a task over the threads where there are more than DG_MATMUL_GEMV_ROWS. */
static void round_x(const dg_cpu *c, const dg_matmul_bf16_kernels *K, uint16_t *xb, int64_t ld, const float *x,
                    int64_t k, int mi, int64_t kc) {
    if (mi <= DG_MATMUL_GEMV_ROWS) {
        K->round(xb, ld, x, k, mi, kc);
        return;
    }
    const int nt = mi / 8 < c->n_threads ? mi / 8 : c->n_threads;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int i = 0; i < mi; i += 8) K->round(xb + i * ld, ld, x + i * k, k, mi - i < 8 ? mi - i : 8, kc);
}

/* The panel orders (matmul.h) over a W in the panel layout (backend.h): a panel a task,
 * each against all of x's rows DG_MATMUL_PANEL_MR at a time: the panel (64 rows x k, 160
 * KiB at k = 1280) is read from memory by the first tile and from L2 by the others, x's
 * rows stream from L3. Smaller tasks (an m-block of x against a chunk of panels, x then
 * in L2) measured alike or slower. The bf16 order (R and tile16 not NULL) rounds x first,
 * as many rows at a time as c->xbf16 holds; the fp32 order reads x as it is. */
static void matmul_panels(const dg_cpu *c, const dg_matmul_bf16_kernels *R, dg_matmul_panel_tile tile16,
                          dg_matmul_panel_f32_tile tile32, float *y, const float *x, const dg_weight *w,
                          const float *bias, int m) {
    const int64_t n = w->rows, k = w->cols, kp = (k + 31) / 32 * 32, steps = k / 2;
    const int64_t panels = (n + DG_WEIGHT_PANEL_ROWS - 1) / DG_WEIGHT_PANEL_ROWS;
    const int rows = !tile16 ? m : m < DG_MATMUL_BF16_XBUF / kp ? m : (int)(DG_MATMUL_BF16_XBUF / kp);
    const int nt = panels < c->n_threads ? (int)panels : c->n_threads;
    for (int i0 = 0; i0 < m; i0 += rows) {
        const int mi = m - i0 < rows ? m - i0 : rows;
        if (tile16) round_x(c, R, c->xbf16, kp, x + (int64_t)i0 * k, k, mi, k);
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
        for (int64_t p = 0; p < panels; p++) {
            const int64_t r0 = p * DG_WEIGHT_PANEL_ROWS;
            const int np = n - r0 < DG_WEIGHT_PANEL_ROWS ? (int)(n - r0) : DG_WEIGHT_PANEL_ROWS;
            const uint32_t *panel = (const uint32_t *)dg_weight_at(w, r0, 0);
            for (int i = 0; i < mi; i += DG_MATMUL_PANEL_MR) {
                const int rm = mi - i < DG_MATMUL_PANEL_MR ? mi - i : DG_MATMUL_PANEL_MR;
                float *yi = y + (int64_t)(i0 + i) * n + r0;
                if (tile16) tile16(rm, c->xbf16 + (int64_t)i * kp, kp, panel, np, steps, yi, n, bias ? bias + r0 : NULL);
                else tile32(rm, x + (int64_t)(i0 + i) * k, k, panel, np, steps, yi, n, bias ? bias + r0 : NULL);
            }
        }
    }
}

/* x is rounded once, a span of it at a time into c->xbf16 (DG_MATMUL_BF16_XBUF elements):
 * all of it when it fits, else as many rows as fit with a block each (at most
 * DG_MATMUL_BF16_XBUF / DG_MATMUL_BF16_KB), and as many blocks as fit with those rows. */
static void matmul_bf16(const dg_cpu *c, const dg_matmul_bf16_kernels *K, float *y, const float *x,
                        const dg_weight *w, const float *bias, int m) {
    const int64_t k = w->cols, kp = (k + 31) / 32 * 32, block = kp < DG_MATMUL_BF16_KB ? kp : DG_MATMUL_BF16_KB;
    const int rows = m < DG_MATMUL_BF16_XBUF / block ? m : (int)(DG_MATMUL_BF16_XBUF / block);
    const int64_t blocks = DG_MATMUL_BF16_XBUF / ((int64_t)rows * DG_MATMUL_BF16_KB),
                  span = blocks > 1 ? blocks * DG_MATMUL_BF16_KB : DG_MATMUL_BF16_KB;
    for (int i0 = 0; i0 < m; i0 += rows)
        for (int64_t k0 = 0; k0 < k; k0 += span) {
            x_span s = {c->xbf16, k0, k - k0 < span ? k - k0 : span, 0, m - i0 < rows ? m - i0 : rows};
            s.ld = (s.kc + 31) / 32 * 32;
            round_x(c, K, c->xbf16, s.ld, x + i0 * k + k0, k, s.mi, s.kc);
            if (m <= DG_MATMUL_GEMV_MAX) gemv_bf16(c, K, y + i0 * w->rows, w, bias, &s);
            else gemm_bf16(c, K, y + i0 * w->rows, w, bias, &s);
        }
}

void dg_cpu_matmul(const dg_cpu *c, float *y, const float *x, const dg_weight *w, const float *bias,
                   int m) {
    if (m <= 0) return;   /* no rows: nothing to do (the GEMM's blocking would divide by zero) */
    if (c->bf16_compute && w->dtype == DG_DTYPE_BF16) {
        const dg_matmul_bf16_kernels *K = c->simd >= DG_CPU_AVX512_BF16 ? &dg_matmul_bf16_avx512
                                        : c->simd >= DG_CPU_AVX2        ? &dg_matmul_bf16_avx2
                                                                        : &dg_matmul_bf16_portable;
        if (w->kb == DG_WEIGHT_PANELS)
            matmul_panels(c, K,
                          c->simd >= DG_CPU_AVX512_BF16 ? dg_matmul_panel_avx512
                          : c->simd >= DG_CPU_AVX2      ? dg_matmul_panel_avx2
                                                        : dg_matmul_panel_portable,
                          NULL, y, x, w, bias, m);
        else
            matmul_bf16(c, K, y, x, w, bias, m);
        return;
    }
    if (w->kb == DG_WEIGHT_PANELS) {
        matmul_panels(c, NULL, NULL,
                      c->simd >= DG_CPU_AVX512 ? dg_matmul_panel_f32_avx512
                      : c->simd >= DG_CPU_AVX2 ? dg_matmul_panel_f32_avx2
                                               : dg_matmul_panel_f32_portable,
                      y, x, w, bias, m);
        return;
    }
    const dg_matmul_kernels *K = c->simd >= DG_CPU_AVX512 ? &dg_matmul_avx512
                               : c->simd >= DG_CPU_AVX2   ? &dg_matmul_avx2
                                                          : &dg_matmul_portable;
    if (m == 1) gemv(c, K, y, x, w, bias);
    else if (m <= DG_MATMUL_GEMV_MAX && K->rows_multi) gemv_multi(c, K, y, x, w, bias, m);
    else gemm(c, K, y, x, w, bias, m);
}
