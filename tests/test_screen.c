/* The logit screen (kernels/cpu/screen.h; backend.h screen_new, matmul_bounds,
 * matmul_pick): the bounds hold every output of the matmul as the same backend computes it
 * (bit for bit: lo <= y <= hi, no tolerance, for that is what makes the greedy token exact),
 * in fp32 and bf16 compute, for BF16, F16 and F32 weights, row-major and blocked, on every
 * kernel set and thread count; they are the same bits on every kernel set (the products are
 * exact integers); a row of x that cannot be bounded gets NaN; picked outputs are the
 * matmul's bits; the bounds are narrow enough to screen; and a matrix whose rows do not fit
 * the backend's scratch has no screen. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common/gemm_check.h"
#include "common/harness.h"
#include "backend.h"
#include "cpu/cpu_backend.h"
#include "dtype.h"

#define TEST_RNG_SEED 0x9e3779b97f4a7c15ull
#include "common/rng.h"

/* IEEE binary16 of v, rounded to nearest even (the compiler's _Float16 conversion). */
static uint16_t to_f16(float v) {
    _Float16 h = (_Float16)v;
    uint16_t u;
    memcpy(&u, &h, sizeof u);
    return u;
}

/* Every kernel set this machine has, one and two threads; a group each (all must agree). */
static const gemm_config CONFIGS[] = {
    {"portable t1", DG_CPU_PORTABLE, 1, 0},
    {"avx2 t2", DG_CPU_AVX2, 2, 0},
    {"best t1", DG_CPU_AVX512_BF16, 1, 0},
    {"best t2", DG_CPU_AVX512_BF16, 2, 0},
};
#define N_CONFIGS (int)(sizeof CONFIGS / sizeof CONFIGS[0])

/* A weight of n x k in dtype, stored at *buf (owned by the caller): rows at scales from
 * 1e-3 to 1e3, one row of zeros, one with a single large value, one with fp32 denormals
 * (F32 only: F16 and BF16 flush or keep them as they can). */
static dg_weight make_weight(dg_dtype dtype, int n, int k, void **buf) {
    const size_t es = dtype == DG_DTYPE_F32 ? 4 : 2;
    *buf = malloc(es * (size_t)n * (size_t)k);
    for (int r = 0; r < n; r++) {
        const float scale = powf(10.0f, (float)(r % 7) - 3.0f) * 0.05f;
        for (int c = 0; c < k; c++) {
            float v = scale * gauss();
            if (r == 1) v = 0.0f;
            if (r == 2) v = c == k / 3 ? 7.5f : 1e-4f * frand();
            if (r == 3 && dtype == DG_DTYPE_F32) v = 1e-40f * frand();
            if (dtype == DG_DTYPE_F32) ((float *)*buf)[(size_t)r * k + c] = v;
            else if (dtype == DG_DTYPE_BF16) ((uint16_t *)*buf)[(size_t)r * k + c] = dg_f32_to_bf16(v);
            else ((uint16_t *)*buf)[(size_t)r * k + c] = to_f16(v);
        }
    }
    return (dg_weight){.data = *buf, .dtype = dtype, .rows = n, .cols = k};
}

/* make_weight's, row-major or (blocked) in the blocked layout of backend.h: *buf the
 * row-major data, *bbuf the blocked copy or NULL (both the caller's to free). */
static dg_weight make_weight_in(dg_dtype dtype, int n, int k, int blocked, void **buf, void **bbuf) {
    dg_weight w = make_weight(dtype, n, k, buf), wb;
    *bbuf = NULL;
    if (!blocked) return w;
    *bbuf = gemm_blocked_copy(&w, &wb);
    return wb;
}

#define X_ROWS 7
#define X_NAN 6

/* x [X_ROWS, k]: Gaussian; outliers (one value 3e3 among 1e-3s); zeros; fp32 denormals;
 * values straddling bf16's rounding (1 + odd multiples of 2^-9); a wide range of
 * magnitudes; and a row with a NaN (row X_NAN). */
static float *make_x(int k) {
    float *x = malloc(sizeof(float) * (size_t)X_ROWS * (size_t)k);
    for (int c = 0; c < k; c++) {
        x[c] = gauss();
        x[k + c] = c == k / 2 ? 3e3f : 1e-3f * frand();
        x[2 * k + c] = 0.0f;
        x[3 * k + c] = 1e-39f * frand();
        x[4 * k + c] = (1.0f + (float)(2 * (rnd32() % 64) + 1) * 0x1p-9f) * (rnd32() % 2 ? 1.0f : -1.0f);
        x[5 * k + c] = powf(10.0f, (float)(rnd32() % 13) - 6.0f) * frand();
        x[X_NAN * k + c] = gauss();
    }
    x[X_NAN * k + k - 1] = NAN;
    return x;
}

/* The case: each dtype, shape and compute; each config's bounds against its own matmul,
 * and against the first config's bounds. */
TEST(bounds_hold_every_output_on_every_kernel_set) {
    const dg_dtype dtypes[] = {DG_DTYPE_BF16, DG_DTYPE_F16, DG_DTYPE_F32};
    const int shapes[][2] = {{300, 96}, {517, 896}, {70, 3584}, {33, 17}};
    char err[256];
    long checked = 0;
    for (int bf16 = 0; bf16 < 2; bf16++) {
        dg_backend *be[N_CONFIGS] = {0};
        if (gemm_open_backends(be, CONFIGS, N_CONFIGS, bf16) < 0) goto done;
        for (size_t d = 0; d < sizeof dtypes / sizeof dtypes[0]; d++)
            for (size_t sh = 0; sh < sizeof shapes / sizeof shapes[0]; sh++)
                for (int blocked = 0; blocked < 2; blocked++) {
                    const int n = shapes[sh][0], k = shapes[sh][1];
                    if (blocked && k <= DG_WEIGHT_KB) continue;
                    void *buf, *bbuf;
                    const dg_weight w = make_weight_in(dtypes[d], n, k, blocked, &buf, &bbuf);
                    float *x = make_x(k), *y = malloc(sizeof(float) * X_ROWS * (size_t)n);
                    float *lo = malloc(sizeof(float) * X_ROWS * (size_t)n), *hi = malloc(sizeof(float) * X_ROWS * (size_t)n);
                    float *lo0 = malloc(sizeof(float) * X_ROWS * (size_t)n), *hi0 = malloc(sizeof(float) * X_ROWS * (size_t)n);
                    for (int cf = 0; cf < N_CONFIGS; cf++) {
                        dg_screen *sc = NULL;
                        if (be[cf]->screen_new(be[cf], &w, &sc, err, sizeof err) < 0) {
                            test_fail(__FILE__, __LINE__, "screen_new: %s", err);
                            continue;
                        }
                        be[cf]->matmul(be[cf], y, x, &w, NULL, X_ROWS);
                        /* m = X_ROWS at once, and row by row from the third (tiles of 4 rows
                         * meet each row at another place) */
                        be[cf]->matmul_bounds(be[cf], lo, hi, x, sc, X_ROWS);
                        int bad = 0;
                        for (int i = 0; i < X_ROWS && !bad; i++)
                            for (int r = 0; r < n && !bad; r++) {
                                const float l = lo[(size_t)i * n + r], h = hi[(size_t)i * n + r], v = y[(size_t)i * n + r];
                                if (i == X_NAN ? !(isnan(l) && isnan(h)) : !(l <= v && v <= h)) {
                                    test_fail(__FILE__, __LINE__, "%s %s dtype %d %dx%d%s row %d output %d: %.9g in [%.9g, %.9g]",
                                              CONFIGS[cf].label, bf16 ? "bf16" : "fp32", (int)dtypes[d], n, k,
                                              blocked ? " blocked" : "", i, r, v, l, h);
                                    bad = 1;
                                }
                                checked++;
                            }
                        for (int i = 2; i < X_ROWS; i++)
                            be[cf]->matmul_bounds(be[cf], lo0 + (size_t)i * n, hi0 + (size_t)i * n, x + (size_t)i * k, sc, 1);
                        if (memcmp(lo0 + 2 * (size_t)n, lo + 2 * (size_t)n, sizeof(float) * (X_ROWS - 2) * (size_t)n) ||
                            memcmp(hi0 + 2 * (size_t)n, hi + 2 * (size_t)n, sizeof(float) * (X_ROWS - 2) * (size_t)n))
                            test_fail(__FILE__, __LINE__, "%s: a row's bounds depend on the rows beside it", CONFIGS[cf].label);
                        if (cf == 0) {
                            memcpy(lo0, lo, sizeof(float) * X_ROWS * (size_t)n);
                            memcpy(hi0, hi, sizeof(float) * X_ROWS * (size_t)n);
                        } else if (memcmp(lo0, lo, sizeof(float) * X_ROWS * (size_t)n) ||
                                   memcmp(hi0, hi, sizeof(float) * X_ROWS * (size_t)n)) {
                            test_fail(__FILE__, __LINE__, "%s: bounds not the bits of %s (%dx%d)", CONFIGS[cf].label,
                                      CONFIGS[0].label, n, k);
                        }
                        be[cf]->screen_free(be[cf], sc);
                    }
                    free(x); free(y); free(lo); free(hi); free(lo0); free(hi0); free(buf); free(bbuf);
                }
    done:
        for (int cf = 0; cf < N_CONFIGS; cf++) dg_backend_free(be[cf]);
    }
    printf("  %ld outputs within their bounds\n", checked);
}

/* The exact outputs of chosen rows are the whole matmul's bits: ascending ids with the first
 * and last rows, on each kernel set, compute, dtype and layout. */
TEST(picked_outputs_are_the_matmuls_bits) {
    const dg_dtype dtypes[] = {DG_DTYPE_BF16, DG_DTYPE_F32};
    const int shapes[][2] = {{300, 96}, {200, 4700}};
    for (int bf16 = 0; bf16 < 2; bf16++) {
        dg_backend *be[N_CONFIGS] = {0};
        if (gemm_open_backends(be, CONFIGS, N_CONFIGS, bf16) < 0) goto done;
        for (size_t d = 0; d < 2; d++)
            for (size_t sh = 0; sh < 2; sh++)
                for (int blocked = 0; blocked < 2; blocked++) {
                    const int n = shapes[sh][0], k = shapes[sh][1];
                    if (blocked && k <= DG_WEIGHT_KB) continue;
                    void *buf, *bbuf;
                    const dg_weight w = make_weight_in(dtypes[d], n, k, blocked, &buf, &bbuf);
                    float *x = make_x(k), *y = malloc(sizeof(float) * (size_t)n), out[64];
                    int32_t ids[64];
                    int m = 0;
                    for (int r = 0; r < n && m < 64; r++)
                        if (r == 0 || r == n - 1 || rnd32() % 8 == 0) ids[m++] = r;
                    for (int cf = 0; cf < N_CONFIGS; cf++) {
                        be[cf]->matmul(be[cf], y, x, &w, NULL, 1);
                        be[cf]->matmul_pick(be[cf], out, x, &w, ids, m);
                        for (int i = 0; i < m; i++)
                            if (memcmp(&out[i], &y[ids[i]], sizeof(float))) {
                                test_fail(__FILE__, __LINE__, "%s %s %dx%d%s: output %d picked %.9g, matmul %.9g",
                                          CONFIGS[cf].label, bf16 ? "bf16" : "fp32", n, k, blocked ? " blocked" : "",
                                          ids[i], out[i], y[ids[i]]);
                                break;
                            }
                    }
                    free(x); free(y); free(buf); free(bbuf);
                }
    done:
        for (int cf = 0; cf < N_CONFIGS; cf++) dg_backend_free(be[cf]);
    }
}

/* How narrow: Gaussian rows of 896 (an lm_head's shape, 20000 of its rows) against a
 * Gaussian x. A row's half-width is about ‖d_r‖₂·‖x‖₂ (screen.h), d_r's elements the int8
 * rounding's, uniform within ±s_r/2 with s_r = max|W[r]|/127 ~ 4.5σ/127: ~0.29·k·s_r·σx,
 * against the logits' spread σ·√k·σx, ~0.3 of it at k = 896 (the rounding terms are ~1e-4
 * of it; measured 0.24). The candidates of a greedy choice are the rows whose upper bound
 * reaches the best lower bound: at that width a handful of the top of 20000 Gaussian logits
 * (measured at most 12 here; asserted below 100, a tenth of DG_SAMPLER_BOUNDS_MAX), and the
 * half-width asserted below 0.4 of the spread. */
TEST(bounds_are_narrow_enough_to_screen) {
    enum { N = 20000, K = 896 };
    char err[256];
    dg_backend *be = NULL;
    CHECK_EQ_INT(dg_backend_new("cpu", 2, &be, err, sizeof err), 0);
    if (!be) return;
    uint16_t *wb = malloc(sizeof(uint16_t) * N * K);
    for (size_t i = 0; i < (size_t)N * K; i++) wb[i] = dg_f32_to_bf16(0.02f * gauss());
    const dg_weight w = {.data = wb, .dtype = DG_DTYPE_BF16, .rows = N, .cols = K};
    dg_screen *sc = NULL;
    CHECK_EQ_INT(be->screen_new(be, &w, &sc, err, sizeof err), 0);
    float *x = malloc(sizeof(float) * K), *lo = malloc(sizeof(float) * N), *hi = malloc(sizeof(float) * N),
          *y = malloc(sizeof(float) * N);
    int worst = 0;
    double width = 0, spread = 0;
    for (int trial = 0; trial < 8 && sc; trial++) {
        for (int c = 0; c < K; c++) x[c] = gauss();
        be->matmul_bounds(be, lo, hi, x, sc, 1);
        be->matmul(be, y, x, &w, NULL, 1);
        float best = -INFINITY;
        double s2 = 0, wsum = 0;
        for (int r = 0; r < N; r++) {
            best = lo[r] > best ? lo[r] : best;
            s2 += (double)y[r] * y[r];
            wsum += (hi[r] - lo[r]) / 2.0;
        }
        int cand = 0;
        for (int r = 0; r < N; r++) cand += hi[r] >= best;
        worst = cand > worst ? cand : worst;
        width += wsum / N;
        spread += sqrt(s2 / N);
    }
    printf("  half-width %.3f of the logits' spread; at most %d candidates of %d\n", width / spread, worst, N);
    CHECK(worst >= 1 && worst < 100);
    CHECK(width / spread < 0.4);
    if (sc) be->screen_free(be, sc);
    free(wb); free(x); free(lo); free(hi); free(y);
    dg_backend_free(be);
}

/* A matrix with a value that is not finite has no screen (the error names the row); nor has
 * one in the panel layout (its rows are not the canonical order's). */
TEST(screen_refuses_what_it_cannot_bound) {
    char err[256] = "";
    dg_backend *be = NULL;
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    if (!be) return;
    float wf[4 * 8];
    for (int i = 0; i < 32; i++) wf[i] = (float)i;
    wf[2 * 8 + 5] = INFINITY;
    dg_weight w = {.data = wf, .dtype = DG_DTYPE_F32, .rows = 4, .cols = 8};
    dg_screen *sc = NULL;
    CHECK_EQ_INT(be->screen_new(be, &w, &sc, err, sizeof err), DG_EINVAL);
    CHECK(sc == NULL && strstr(err, "row 2") != NULL);
    uint16_t wb[64 * 8] = {0};
    w = (dg_weight){.data = wb, .dtype = DG_DTYPE_BF16, .rows = 64, .cols = 8, .kb = DG_WEIGHT_PANELS};
    CHECK_EQ_INT(be->screen_new(be, &w, &sc, err, sizeof err), DG_EINVAL);
    CHECK(sc == NULL && strstr(err, "panel") != NULL);
    dg_backend_free(be);
}

/* The bounds and the pick take their rows of x and of W in the backend's scratch (16 MiB on
 * the CPU): a row too long for it gave chunks of 0 rows and an endless loop, so such a
 * matrix has no screen. The longest row that fits (2^21 - 64 columns) still screens, its
 * bounds holding the matmul's output and the pick giving its bits. */
TEST(screen_refuses_rows_longer_than_its_scratch) {
    char err[256] = "";
    dg_backend *be = NULL;
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    if (!be) return;
    const int k = (1 << 21) - 64;
    float *wf = malloc(sizeof(float) * ((size_t)k + 64)), *x = malloc(sizeof(float) * (size_t)k);
    for (int c = 0; c < k + 64; c++) wf[c] = gauss();
    for (int c = 0; c < k; c++) x[c] = gauss();
    dg_weight w = {.data = wf, .dtype = DG_DTYPE_F32, .rows = 1, .cols = k};
    dg_screen *sc = NULL;
    CHECK_EQ_INT(be->screen_new(be, &w, &sc, err, sizeof err), 0);
    if (sc) {
        float y, lo, hi, picked;
        const int32_t id = 0;
        be->matmul(be, &y, x, &w, NULL, 1);
        be->matmul_bounds(be, &lo, &hi, x, sc, 1);
        be->matmul_pick(be, &picked, x, &w, &id, 1);
        CHECK(lo <= y && y <= hi);
        CHECK(memcmp(&picked, &y, sizeof y) == 0);
        be->screen_free(be, sc);
        sc = NULL;
    }
    w.cols = k + 64;
    CHECK_EQ_INT(be->screen_new(be, &w, &sc, err, sizeof err), DG_EINVAL);
    CHECK(sc == NULL && strstr(err, "1 x 2097152 matrix") != NULL && strstr(err, "scratch") != NULL);
    be->screen_free(be, sc);
    free(wf);
    free(x);
    dg_backend_free(be);
}

int main(void) { return test_main(); }
