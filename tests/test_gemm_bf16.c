/* The CPU matmul's bf16 compute order (kernels/cpu/matmul.h): every kernel set gives the same
 * bits, a row of y is the same bits whatever m, and the result is within a stated bound of
 * the exact one on the bf16-rounded inputs.
 *
 * The reference is the portable fallback at 1 thread ("cpu-scalar" with bf16 compute): each
 * row computed alone (m = 1, the GEMV). Against it, bit for bit (memcmp): the portable
 * fallback at 2 threads and the AVX2 fallback (a backend capped at AVX-512 F or at AVX2:
 * this order's kernels below AVX-512 BF16 are the AVX2 ones) at 1 and 2 threads; and, in a
 * case of its own that is skipped where the CPU lacks AVX-512 BF16, the VDPBF16PS kernels
 * at 1 and 2 threads. Each config computes every batch m in {1, 2, 3, 4, 5, 8 (the GEMV of a
 * few rows), 9, 17, 48 (the GEMV 8 rows at a time against tiles of W; at n = 101, k = 2100
 * tiles of 32 rows, cut to the bytes it keeps in L2), 49, 64, 300 (the GEMM: partial tiles,
 * one or several m-blocks)}, from row 0 and from row 3 of x, so that a row meets a
 * different tile position.
 *
 * Shapes (n, k): k = 83 (a tail of 19 columns after 2 steps of 32), k = 2100 (two blocks of
 * the order, 2048 and 52 columns), k = 7 (a tail only), k = 4500 (three blocks, 2048, 2048
 * and 404 columns: there the same weight in the blocked layout of backend.h gives the same
 * bits again, in every batch); n = 37 and 101 (not multiples of any
 * tile's rows of W, nor of the 96-row chunk), n = 5 (less than a tile); two shapes drawn
 * from the seed; with and without a bias. Values uniform in [-1, 1), and a "tiny" set
 * (x and W near 2^-63, a tenth of the weights bf16 denormals, some x fp32 denormals): the
 * products fall below 2^-126, so DAZ and FTZ decide the bits, where an emulation that got
 * them wrong would differ.
 *
 * Accuracy (the uniform values only): the products of the bf16-rounded inputs are exact; a
 * product meets at most 2·ceil(k/32) roundings in its lane's chain (two fused
 * multiply-adds a step), 4 in the tree, one per later block and one for the bias: at most
 * 2·ceil(k/32) + 7 here, so |y - Σ xb_j·w_j - b| <= (2·ceil(k/32) + 7)·2^-24·(Σ|xb_j·w_j| +
 * |b|) to first order; the check allows (2·ceil(k/32) + 8)·2^-24·(Σ|xb_j·w_j| + |b|), the
 * reference computed in double on x rounded by this file's own step 0. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/device.h"
#include "common/gemm_check.h"
#include "common/harness.h"
#include "backend.h"
#include "cpu/cpu_backend.h"
#include "cpu/cpu_kernels.h"
#include "dtype.h"

enum { M_MAX = 300, OFFSET = 3, ROWS = M_MAX + OFFSET };

static const int MS[] = {1, 2, 3, 4, 5, 8, 9, 17, 48, 49, 64, 300};
static const int SHAPES[][2] = {{37, 83}, {101, 2100}, {5, 7}, {21, 4500}};   /* n, k */
/* the panel order's: panels of 64 rows, one partial (37, 5), one full (64), two and a
 * partial (130, 2 rows); k even, one step (2), a few (84), thousands (2100, 4500) */
static const int PANEL_SHAPES[][2] = {{37, 84}, {130, 2100}, {5, 2}, {64, 4500}};
enum { N_RANDOM_SHAPES = 2 };   /* and n in 1..48, k in 1..2200 drawn from the seed */

static uint64_t rng = 2025;
static float frand(void) {   /* uniform in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static float from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Step 0 of the order, written from its text (not the kernels'). */
static float rounded(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if (!(u & 0x7f800000u)) return from_bits(u & 0x80000000u);
    return from_bits(((u + 0x7fffu + ((u >> 16) & 1u)) >> 16) << 16);
}

/* the first is the reference */
static const gemm_config FALLBACK[] = {
    {"cpu-scalar t1", DG_CPU_PORTABLE, 1, 0}, {"cpu-scalar t2", DG_CPU_PORTABLE, 2, 0},
    {"cpu below avx512-bf16 t2", DG_CPU_AVX512, 2, 0}, {"cpu avx2 t1", DG_CPU_AVX2, 1, 0},
};
static const gemm_config VDPBF16PS[] = {
    {"cpu-scalar t1", DG_CPU_PORTABLE, 1, 0}, {"cpu avx512-bf16 t1", DG_CPU_AVX512_BF16, 1, 0},
    {"cpu avx512-bf16 t2", DG_CPU_AVX512_BF16, 2, 0},
};

/* Weights of n x k (wx: their values in fp32) and x of ROWS x k, uniform or tiny (see the
 * top). */
static void make_inputs(int tiny, int n, int k, uint16_t *w, float *wx, float *x) {
    const float scale = tiny ? ldexpf(1.0f, -63) : 1.0f;
    for (int64_t i = 0; i < (int64_t)n * k; i++) {
        w[i] = dg_f32_to_bf16(frand() * scale);
        if (tiny && frand() < -0.8f) w[i] = (uint16_t)((w[i] & 0x8000) | ((uint16_t)(frand() * 64.0f + 64.0f) & 0x7f));
        wx[i] = dg_bf16_to_f32(w[i]);
    }
    for (int64_t i = 0; i < (int64_t)ROWS * k; i++) {
        x[i] = frand() * scale;
        if (tiny && frand() < -0.9f) x[i] = from_bits((uint32_t)(frand() * 4194304.0f + 4194304.0f));
    }
}

/* One weight: the reference's rows, then every other config's singles and batches. */
static void check_weight(dg_backend **be, const gemm_config *cf, int n_configs, int n, int k, int with_bias, int tiny,
                         int panels) {
    uint16_t *wd = malloc(sizeof(uint16_t) * (size_t)n * k);
    float *wx = malloc(sizeof(float) * (size_t)n * k), *x = malloc(sizeof(float) * (size_t)ROWS * k);
    float *b = malloc(sizeof(float) * (size_t)n), *y = malloc(sizeof(float) * (size_t)ROWS * n);
    float *ref = malloc(sizeof(float) * (size_t)ROWS * n);
    const dg_weight rm = {wd, DG_DTYPE_BF16, n, k, 0};
    dg_weight w = rm;
    const float *bias = with_bias ? b : NULL;
    char what[160];
    make_inputs(tiny, n, k, wd, wx, x);
    void *pan = panels ? gemm_panel_copy(&rm, &w) : NULL;   /* the panel order's layout */
    if (panels && !pan) {
        CHECK(!"out of memory");
        goto out;
    }
    /* a product meets 2 roundings a step of 32 columns, 4 in the tree, 1 a later block and
     * 1 for the bias (the top); in the panel order 2 a pair of columns and the bias's */
    const double chain = panels ? k + 2 : 2 * ((k + 31) / 32) + 8;
    for (int i = 0; i < n; i++) b[i] = frand() * (tiny ? ldexpf(1.0f, -126) : 1.0f);
    for (int c = 0; c < n_configs; c++) {
        snprintf(what, sizeof what, "%s n=%d k=%d%s%s%s", cf[c].label, n, k, with_bias ? " +bias" : "",
                 tiny ? " tiny" : "", panels ? " panels" : "");
        /* the reference computes every row alone, the others a few (each m = 1 call is a
         * parallel region: hundreds of them cost seconds where waiting threads spin) */
        const int singles = c == 0 ? ROWS : 8;
        for (int i = 0; i < singles; i++)
            be[c]->matmul(be[c], (c == 0 ? ref : y) + (int64_t)i * n, x + (int64_t)i * k, &w, bias, 1);
        if (c == 0 ? !tiny && !gemm_within_bound(ref, x, rounded, wx, bias, ROWS, n, k, chain, what)
                   : !gemm_rows_match(y, ref, 0, singles, n, what))
            break;
        if (!gemm_batches_match(be[c], y, x, k, &w, bias, ref, n, MS, (int)(sizeof MS / sizeof MS[0]), OFFSET, what))
            goto out;
        if (!panels && k > DG_WEIGHT_KB) {   /* the blocked layout (backend.h): the same bits */
            dg_weight wb;
            void *blk = gemm_blocked_copy(&w, &wb);
            snprintf(what, sizeof what, "%s n=%d k=%d%s%s blocked", cf[c].label, n, k, with_bias ? " +bias" : "",
                     tiny ? " tiny" : "");
            CHECK(blk != NULL);
            const int ok = blk && gemm_batches_match(be[c], y, x, k, &wb, bias, ref, n, MS,
                                                      (int)(sizeof MS / sizeof MS[0]), OFFSET, what);
            free(blk);
            if (!ok) goto out;
        }
    }
out:
    free(wd); free(wx); free(x); free(b); free(y); free(ref); free(pan);
}

static void check_configs(const gemm_config *cf, int n_configs, int panels) {
    dg_backend *be[8] = {0};
    if (gemm_open_backends(be, cf, n_configs, 1) < 0) goto out;
    enum { N_FIXED = sizeof SHAPES / sizeof SHAPES[0], N_PANEL = sizeof PANEL_SHAPES / sizeof PANEL_SHAPES[0] };
    int shapes[N_PANEL + N_RANDOM_SHAPES][2];
    if (panels) {   /* the panel layout takes an even k */
        gemm_draw_shapes(shapes, PANEL_SHAPES, N_PANEL, N_RANDOM_SHAPES, 2200, frand);
        for (int s = N_PANEL; s < N_PANEL + N_RANDOM_SHAPES; s++) shapes[s][1] += shapes[s][1] % 2;
    } else {
        gemm_draw_shapes(shapes, SHAPES, N_FIXED, N_RANDOM_SHAPES, 2200, frand);
    }
    const int n_shapes = (panels ? N_PANEL : N_FIXED) + N_RANDOM_SHAPES;
    for (int s = 0; s < n_shapes; s++)
        for (int with_bias = 0; with_bias < 2; with_bias++)
            check_weight(be, cf, n_configs, shapes[s][0], shapes[s][1], with_bias, 0, panels);
    check_weight(be, cf, n_configs, panels ? 101 : 37, 2100, 1, 1, panels);
out:
    for (int c = 0; c < n_configs; c++) dg_backend_free(be[c]);
}

TEST(fallback_kernels_agree_row_invariant_and_accurate) {
    check_configs(FALLBACK, sizeof FALLBACK / sizeof FALLBACK[0], 0);
}

TEST(vdpbf16ps_kernels_equal_the_fallback) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    check_configs(VDPBF16PS, sizeof VDPBF16PS / sizeof VDPBF16PS[0], 0);
}

TEST(panel_order_fallback_kernels_agree_row_invariant_and_accurate) {
    check_configs(FALLBACK, sizeof FALLBACK / sizeof FALLBACK[0], 1);
}

TEST(panel_order_vdpbf16ps_kernels_equal_the_fallback) {
    if (!test_cpu_avx512_bf16()) SKIP("%s", TEST_NO_AVX512_BF16);
    check_configs(VDPBF16PS, sizeof VDPBF16PS / sizeof VDPBF16PS[0], 1);
}

/* x rounded a span at a time (matmul.c: more rows than its buffer holds with a block each,
 * 2 Mi elements / 2048 = 1024): M rows of k = K in spans, and every row is still the bits
 * it gets alone. 1100 rows of k = 2100 (the GEMM) are two spans of rows times two of
 * blocks; 48 rows of k = 45000 (the GEMV, 8 rows at a time) two spans of blocks, 21 blocks
 * (43008 columns) and 1992 columns. The same weight in the blocked layout (backend.h) gives
 * the same bits, a row alone and the whole batch. */
static void check_spans(int M, int K) {
    enum { N = 7 };
    dg_backend *be = NULL;
    char err[256];
    CHECK_EQ_INT(dg_backend_new_opts("cpu", &(dg_backend_opts){.n_threads = 2, .cpu_bf16_compute = 1}, &be, err,
                                     sizeof err), 0);
    float *x = malloc(sizeof(float) * M * K), *y = malloc(sizeof(float) * M * N), *one = malloc(sizeof(float) * N);
    uint16_t *wd = malloc(sizeof(uint16_t) * N * K);
    for (int i = 0; i < M * K; i++) x[i] = frand();
    for (int i = 0; i < N * K; i++) wd[i] = dg_f32_to_bf16(frand());
    const dg_weight w = {wd, DG_DTYPE_BF16, N, K, 0};
    dg_weight wb;
    void *blk = gemm_blocked_copy(&w, &wb);   /* and in the blocked layout (backend.h) */
    CHECK(blk != NULL);
    if (be) {
        be->matmul(be, y, x, &w, NULL, M);
        for (int i = 0; i < M; i++) {
            be->matmul(be, one, x + (int64_t)i * K, &w, NULL, 1);
            if (memcmp(one, y + (int64_t)i * N, sizeof(float) * N)) {
                test_fail(__FILE__, __LINE__, "row %d of m = %d differs from its m = 1 result", i, M);
                break;
            }
        }
    }
    dg_weight wp;
    void *pan = K % 2 == 0 ? gemm_panel_copy(&w, &wp) : NULL;   /* the panel order: rows alone, and the batch */
    if (be && pan) {
        float *yp = malloc(sizeof(float) * M * N);
        be->matmul(be, yp, x, &wp, NULL, M);
        for (int i = 0; i < M; i += i < 4 ? 1 : M / 5) {
            be->matmul(be, one, x + (int64_t)i * K, &wp, NULL, 1);
            if (memcmp(one, yp + (int64_t)i * N, sizeof(float) * N)) {
                test_fail(__FILE__, __LINE__, "panels: row %d of m = %d differs from its m = 1 result (k = %d)", i, M, K);
                break;
            }
        }
        free(yp);
    }
    free(pan);
    if (be && blk) {   /* blocked: rows alone, and the whole batch */
        for (int i = 0; i < 4; i++) {
            be->matmul(be, one, x + (int64_t)i * K, &wb, NULL, 1);
            if (memcmp(one, y + (int64_t)i * N, sizeof(float) * N))
                test_fail(__FILE__, __LINE__, "blocked weight: row %d alone differs (k = %d)", i, K);
        }
        float *yb = malloc(sizeof(float) * M * N);
        be->matmul(be, yb, x, &wb, NULL, M);
        if (memcmp(yb, y, sizeof(float) * M * N))
            test_fail(__FILE__, __LINE__, "blocked weight: m = %d differs from row-major (k = %d)", M, K);
        free(yb);
    }
    free(x); free(y); free(one); free(wd); free(blk);
    dg_backend_free(be);
}

TEST(rows_in_spans_of_x_are_the_same_bits) {
    check_spans(1100, 2100);
    check_spans(48, 45000);
}

/* F32 and F16 weights keep the fp32 order in bf16 compute: the same bits as without it. */
TEST(other_dtypes_keep_the_fp32_order) {
    enum { N = 19, K = 150, M = 9 };
    dg_backend *on = NULL, *off = NULL;
    char err[256];
    CHECK_EQ_INT(dg_backend_new_opts("cpu", &(dg_backend_opts){.n_threads = 1, .cpu_bf16_compute = 1}, &on, err,
                                     sizeof err), 0);
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &off, err, sizeof err), 0);
    if (!on || !off) goto out;
    CHECK(on->bf16_compute == 1 && off->bf16_compute == 0);
    static float x[M * K], y_on[M * N], y_off[M * N];
    static uint16_t w16[N * K];
    static float w32[N * K];
    for (int i = 0; i < M * K; i++) x[i] = frand();
    for (int i = 0; i < N * K; i++) w32[i] = dg_bf16_to_f32(w16[i] = dg_f32_to_bf16(frand()));
    for (int m = 1; m <= M; m += M - 1) {
        const dg_weight wf = {w32, DG_DTYPE_F32, N, K, 0}, wb = {w16, DG_DTYPE_BF16, N, K, 0};
        on->matmul(on, y_on, x, &wf, NULL, m);
        off->matmul(off, y_off, x, &wf, NULL, m);
        CHECK(!memcmp(y_on, y_off, sizeof(float) * (size_t)(m * N)));
        /* a BF16 weight of the same values: fp32 off, the bf16 order on (x rounded) */
        off->matmul(off, y_on, x, &wb, NULL, m);
        CHECK(!memcmp(y_on, y_off, sizeof(float) * (size_t)(m * N)));
        on->matmul(on, y_on, x, &wb, NULL, m);
        CHECK(memcmp(y_on, y_off, sizeof(float) * (size_t)(m * N)) != 0);
    }
out:
    dg_backend_free(on);
    dg_backend_free(off);
}

int main(void) { return test_main(); }
