/* The weight binder (io/weights.h): every kind on small safetensors files this test writes
 * (one file, and two shards behind an index), and every error (missing tensor, wrong shape,
 * wrong dtype) as DG_EMODEL with a message naming the tensor, the expected and the found;
 * and a matrix whose GEMV reads a long row of x, which the CPU reads in the blocked layout
 * (backend.h dg_weight_kb_for): rewritten where the set's memory lies (mapped and in huge
 * pages), found so by a second bind, read through the layout by the other kinds,
 * row-major again for a backend without the layout, copied where the set borrows its
 * buffer; and left alone where the row of x is short (bf16 compute).
 *
 * Values are compared exactly: widening BF16, F16 and F32 to fp32 is exact, and the conv
 * reorder only moves values. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/harness.h"
#include "backend.h"
#include "duogen.h"
#include "io/safetensors.h"
#include "io/weights.h"

typedef struct {
    const char *name, *dtype;   /* dtype as safetensors spells it */
    int         n_dims;
    int64_t     shape[5];
    const void *data;
    size_t      nbytes;
} tensor_spec;

/* A safetensors file of the given tensors: 8-byte header length, JSON header, data. */
static void write_st(const char *path, const tensor_spec *t, int n) {
    char header[4096];
    size_t h = 0, off = 0;
    h += (size_t)snprintf(header + h, sizeof header - h, "{");
    for (int i = 0; i < n; i++) {
        h += (size_t)snprintf(header + h, sizeof header - h,
                              "%s\"%s\":{\"dtype\":\"%s\",\"shape\":[", i ? "," : "", t[i].name,
                              t[i].dtype);
        for (int d = 0; d < t[i].n_dims; d++)
            h += (size_t)snprintf(header + h, sizeof header - h, "%s%lld", d ? "," : "",
                                  (long long)t[i].shape[d]);
        h += (size_t)snprintf(header + h, sizeof header - h, "],\"data_offsets\":[%zu,%zu]}", off,
                              off + t[i].nbytes);
        off += t[i].nbytes;
    }
    h += (size_t)snprintf(header + h, sizeof header - h, "}");
    while ((8 + h) % 8) header[h++] = ' ';   /* the data aligned, as the format's writers pad it */
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (!f) return;
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)((uint64_t)h >> (8 * i));
    CHECK(fwrite(len, 1, 8, f) == 8 && fwrite(header, 1, h, f) == h);
    for (int i = 0; i < n; i++) CHECK(fwrite(t[i].data, 1, t[i].nbytes, f) == t[i].nbytes);
    fclose(f);
}

/* conv [o=2, i=3, kt=2, kh=1, kw=2] F32 holding 0 .. 23; the others small known values. */
static float conv5[24], mat[12], vec_f32[3] = {1.5f, -2.0f, 0.25f};
static const uint16_t vec_bf16[2] = {0x3f00, 0xc040};   /* 0.5, -3 */
static const uint16_t vec_f16[2] = {0x3c00, 0xc000};    /* 1, -2 */
static const uint16_t mat_bf16[6] = {0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0};   /* 1 .. 6 */

typedef struct {
    char        dir[64];
    dg_st      *st;
    dg_backend *be;
} fixture;

/* Two shards and their index in a fresh folder, opened as one set. */
static int fixture_open(fixture *fx) {
    char path[128], err[256];
    for (int i = 0; i < 24; i++) conv5[i] = (float)i;
    for (int i = 0; i < 12; i++) mat[i] = (float)(i - 6);
    const tensor_spec a[] = {
        {"mat", "F32", 2, {3, 4}, mat, sizeof mat},
        {"conv", "F32", 5, {2, 3, 2, 1, 2}, conv5, sizeof conv5},
        {"conv2d", "F32", 4, {2, 3, 2, 2}, conv5, sizeof conv5},
        {"vec_f32", "F32", 1, {3}, vec_f32, sizeof vec_f32},
    };
    const tensor_spec b[] = {
        {"blocks.0.vec_bf16", "BF16", 1, {2}, vec_bf16, sizeof vec_bf16},
        {"blocks.0.vec_f16", "F16", 1, {2}, vec_f16, sizeof vec_f16},
        {"blocks.0.gamma", "BF16", 4, {2, 1, 1, 1}, vec_bf16, sizeof vec_bf16},
        {"mat_bf16", "BF16", 2, {2, 3}, mat_bf16, sizeof mat_bf16},
    };
    snprintf(fx->dir, sizeof fx->dir, "/tmp/dg_test_weights_XXXXXX");
    if (!mkdtemp(fx->dir)) return -1;
    snprintf(path, sizeof path, "%s/model-00001-of-00002.safetensors", fx->dir);
    write_st(path, a, 4);
    snprintf(path, sizeof path, "%s/model-00002-of-00002.safetensors", fx->dir);
    write_st(path, b, 4);
    const char *index = "{\"weight_map\":{"
                        "\"mat\":\"model-00001-of-00002.safetensors\","
                        "\"conv\":\"model-00001-of-00002.safetensors\","
                        "\"conv2d\":\"model-00001-of-00002.safetensors\","
                        "\"vec_f32\":\"model-00001-of-00002.safetensors\","
                        "\"blocks.0.vec_bf16\":\"model-00002-of-00002.safetensors\","
                        "\"blocks.0.vec_f16\":\"model-00002-of-00002.safetensors\","
                        "\"blocks.0.gamma\":\"model-00002-of-00002.safetensors\","
                        "\"mat_bf16\":\"model-00002-of-00002.safetensors\"}}";
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", fx->dir);
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fputs(index, f);
    fclose(f);
    if (dg_st_open(fx->dir, &fx->st, err, sizeof err) < 0 ||
        dg_backend_new("cpu", 1, &fx->be, err, sizeof err) < 0) {
        printf("  %s\n", err);
        return -1;
    }
    return 0;
}

static void fixture_close(fixture *fx) {
    char cmd[128];
    dg_st_close(fx->st);
    dg_backend_free(fx->be);
    snprintf(cmd, sizeof cmd, "rm -rf %s", fx->dir);
    CHECK(system(cmd) == 0);
}

TEST(matrix_is_a_prepared_view_of_the_mapped_tensor) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    dg_binder b = {.st = fx.st, .be = fx.be, .err = err, .errlen = sizeof err};
    dg_weight w = {0}, wb = {0}, wc = {0};
    CHECK_EQ_INT(dg_bind_matrix(&b, &w, DG_SHAPE(3, 4), "mat"), 0);
    CHECK(w.data == dg_st_find(fx.st, "mat")->data && w.dtype == DG_DTYPE_F32 && w.rows == 3 && w.cols == 4);
    CHECK_EQ_INT(dg_bind_matrix(&b, &wb, DG_SHAPE(2, 3), "mat_bf16"), 0);   /* from the other shard */
    CHECK(wb.dtype == DG_DTYPE_BF16 && wb.rows == 2 && wb.cols == 3);
    CHECK(dg_load_f32(wb.data, wb.dtype, 5) == 6.0f);
    /* any rank: the row-major [shape[0], product of the rest] */
    CHECK_EQ_INT(dg_bind_matrix(&b, &wc, DG_SHAPE(2, 3, 2, 1, 2), "conv"), 0);
    CHECK(wc.rows == 2 && wc.cols == 12);
    CHECK_EQ_INT(b.rc, 0);
    fixture_close(&fx);
}

TEST(vectors_widen_to_fp32_on_the_host_and_in_backend_memory) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    dg_buffer_list owned = {0};
    dg_binder b = {.st = fx.st, .be = fx.be, .owned = &owned, .err = err, .errlen = sizeof err};
    float host[7], got[2];
    float *dev_f16 = NULL, *dev_gamma = NULL;
    CHECK_EQ_INT(dg_bind_fp32_host(&b, host, DG_SHAPE(3), "vec_f32"), 0);
    b.prefix = "blocks.0.";
    CHECK_EQ_INT(dg_bind_fp32_host(&b, host + 3, DG_SHAPE(2), "vec_bf16"), 0);
    CHECK_EQ_INT(dg_bind_fp32_host(&b, host + 5, DG_SHAPE(2), "vec_%s", "f16"), 0);
    CHECK(host[0] == 1.5f && host[1] == -2.0f && host[2] == 0.25f);
    CHECK(host[3] == 0.5f && host[4] == -3.0f && host[5] == 1.0f && host[6] == -2.0f);
    /* a backend buffer each, owned by the list; a small tensor of any rank */
    CHECK_EQ_INT(dg_bind_fp32(&b, &dev_f16, DG_SHAPE(2), "vec_f16"), 0);
    CHECK_EQ_INT(dg_bind_fp32(&b, &dev_gamma, DG_SHAPE(2, 1, 1, 1), "gamma"), 0);
    CHECK(dev_f16 && dev_gamma && owned.n == 2 && owned.be == fx.be);
    if (dev_f16 && dev_gamma) {
        fx.be->download(fx.be, got, dev_f16, 2);
        CHECK(got[0] == 1.0f && got[1] == -2.0f);
        fx.be->download(fx.be, got, dev_gamma, 2);
        CHECK(got[0] == 0.5f && got[1] == -3.0f);
    }
    dg_buffer_list_release(&owned);
    CHECK(owned.n == 0 && owned.p == NULL);
    dg_buffer_list_release(&owned);   /* an empty list */
    fixture_close(&fx);
}

TEST(conv_weights_move_kt_first) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    dg_buffer_list owned = {0};
    dg_binder b = {.st = fx.st, .be = fx.be, .owned = &owned, .err = err, .errlen = sizeof err};
    float *w5 = NULL, *w4 = NULL, got[24];
    CHECK_EQ_INT(dg_bind_conv(&b, &w5, DG_SHAPE(2, 3, 2, 1, 2), "conv"), 0);
    CHECK_EQ_INT(dg_bind_conv(&b, &w4, DG_SHAPE(2, 3, 2, 2), "conv2d"), 0);
    if (w5 && w4) {
        /* [o, i, kt, kh·kw] stored as [o, kt, i, kh·kw] */
        fx.be->download(fx.be, got, w5, 24);
        int same = 1;
        for (int o = 0; o < 2; o++)
            for (int i = 0; i < 3; i++)
                for (int k = 0; k < 2; k++)
                    for (int p = 0; p < 2; p++)
                        same &= got[((o * 2 + k) * 3 + i) * 2 + p] == conv5[((o * 3 + i) * 2 + k) * 2 + p];
        CHECK(same);
        /* by hand: [0, kt 0, i 1, 0] <- source [0, i 1, kt 0, 0] = (1·2 + 0)·2 = 4;
         * [0, kt 1, i 0, 0] <- source [0, i 0, kt 1, 0] = (0·2 + 1)·2 = 2 */
        CHECK(got[2] == 4.0f && got[6] == 2.0f);
        fx.be->download(fx.be, got, w4, 24);   /* 2-D: as stored */
        CHECK(memcmp(got, conv5, sizeof conv5) == 0);
    }
    dg_buffer_list_release(&owned);
    fixture_close(&fx);
}

TEST(optional_tensors_are_reported_absent) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    dg_binder b = {.st = fx.st, .be = fx.be, .err = err, .errlen = sizeof err};
    dg_weight w = {0};
    CHECK_EQ_INT(dg_bind_has(&b, "mat"), 1);
    CHECK_EQ_INT(dg_bind_has(&b, "crossattn_proj.0.weight"), 0);
    b.prefix = "blocks.0.";
    CHECK_EQ_INT(dg_bind_has(&b, "vec_bf16"), 1);
    CHECK_EQ_INT(dg_bind_has(&b, "mat"), 0);
    CHECK_EQ_INT(b.rc, 0);   /* absence is not an error */
    CHECK(err[0] == 0);
    b.prefix = NULL;
    if (dg_bind_has(&b, "lm_head.weight")) dg_bind_matrix(&b, &w, DG_SHAPE(3, 4), "lm_head.weight");
    CHECK(w.data == NULL && b.rc == 0);
    fixture_close(&fx);
}

/* err after "DIR: ", the directory a load error names first (the set's); NULL without it
 * (the comparison then fails). */
static const char *after_dir(const char *dir, const char *err) {
    const size_t n = strlen(dir);
    return !strncmp(err, dir, n) && !strncmp(err + n, ": ", 2) ? err + n + 2 : NULL;
}

/* Each failing bind gets a fresh binder: errors are sticky. */
static int bind_one(fixture *fx, unsigned dtypes, const char *prefix, dg_shape shape,
                    const char *name, char *err, size_t errlen) {
    dg_binder b = {.st = fx->st, .be = fx->be, .prefix = prefix, .dtypes = dtypes, .err = err,
                   .errlen = errlen};
    dg_weight w;
    return dg_bind_matrix(&b, &w, shape, "%s", name);
}

TEST(errors_name_tensor_expected_and_found) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    CHECK_EQ_INT(bind_one(&fx, 0, NULL, DG_SHAPE(3, 4), "lm_head.weight", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"lm_head.weight\": missing from the checkpoint");
    CHECK_EQ_INT(bind_one(&fx, 0, NULL, DG_SHAPE(4, 3), "mat", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"mat\": expected shape [4, 3], found [3, 4]");
    CHECK_EQ_INT(bind_one(&fx, 0, NULL, DG_SHAPE(12), "mat", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"mat\": expected shape [12], found [3, 4]");
    CHECK_EQ_INT(bind_one(&fx, DG_DTYPE_BIT(DG_DTYPE_BF16), NULL, DG_SHAPE(3, 4), "mat", err, sizeof err),
                 DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"mat\": expected dtype BF16, found F32");
    CHECK_EQ_INT(bind_one(&fx, DG_DTYPE_BIT(DG_DTYPE_BF16) | DG_DTYPE_BIT(DG_DTYPE_F16), NULL,
                          DG_SHAPE(3, 4), "mat", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"mat\": expected dtype BF16 or F16, found F32");
    CHECK_EQ_INT(bind_one(&fx, DG_DTYPE_BIT(DG_DTYPE_BF16), NULL, DG_SHAPE(2, 3), "mat_bf16", err,
                          sizeof err), 0);
    /* the full name, prefix included */
    CHECK_EQ_INT(bind_one(&fx, 0, "blocks.0.", DG_SHAPE(3), "vec_bf16", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"blocks.0.vec_bf16\": expected shape [3], found [2]");
    CHECK_EQ_INT(bind_one(&fx, 0, "blocks.1.", DG_SHAPE(2), "vec_bf16", err, sizeof err), DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"blocks.1.vec_bf16\": missing from the checkpoint");
    /* a path that would crowd out the reason: its tail */
    char small[40];
    CHECK_EQ_INT(bind_one(&fx, 0, NULL, DG_SHAPE(3, 4), "lm_head.weight", small, sizeof small), DG_EMODEL);
    CHECK(!strncmp(small, "...", 3) && strstr(small, ": tensor \"lm_he") != NULL);
    fixture_close(&fx);
}

TEST(first_error_sticks_and_later_binds_do_nothing) {
    fixture fx = {0};
    char err[256] = "";
    if (fixture_open(&fx) < 0) { CHECK(!"fixture"); fixture_close(&fx); return; }
    dg_buffer_list owned = {0};
    dg_binder b = {.st = fx.st, .be = fx.be, .owned = &owned, .err = err, .errlen = sizeof err};
    float *dev = NULL, host[3] = {7, 7, 7};
    const dg_st_tensor *t = dg_st_find(fx.st, "mat");
    CHECK_EQ_INT(dg_bind_fp32(&b, &dev, DG_SHAPE(4), "vec_f32"), DG_EMODEL);
    CHECK_EQ_INT(dg_bind_fp32_host(&b, host, DG_SHAPE(3), "vec_f32"), DG_EMODEL);
    CHECK_EQ_INT(dg_bind_find(&b, DG_SHAPE(3), &t, "vec_f32"), DG_EMODEL);
    CHECK_EQ_INT(dg_bind_has(&b, "vec_f32"), 0);
    CHECK(dev == NULL && host[0] == 7.0f && t == NULL && owned.n == 0 && b.rc == DG_EMODEL);
    CHECK_EQ_STR(after_dir(fx.dir, err), "tensor \"vec_f32\": expected shape [4], found [3]");
    dg_buffer_list_release(&owned);
    fixture_close(&fx);
}

/* ---- the blocked layout (backend.h) ---- */

enum { WR = 3, WC = 4500 };   /* three blocks of the layout: 2048, 2048 and 404 columns */
static uint16_t wide[WR * WC];

static float wide_at(int64_t r, int64_t c) { return dg_bf16_to_f32(wide[r * WC + c]); }

/* Every element of w (any layout, through dg_weight_at) is src's, a row-major BF16 matrix
 * of w's shape. */
static int matches(const dg_weight *w, const uint16_t *src) {
    for (int64_t r = 0; r < w->rows; r++)
        for (int64_t c = 0; c < w->cols; c++)
            if (dg_load_f32(dg_weight_at(w, r, c), w->dtype, 0) != dg_bf16_to_f32(src[r * w->cols + c])) return 0;
    return 1;
}
static int wide_matches(const dg_weight *w) { return matches(w, wide); }

/* A file of the n tensors t in a fresh folder; its path in path. */
static int st_folder(char *dir, size_t dlen, char *path, size_t plen, const tensor_spec *t, int n) {
    snprintf(dir, dlen, "/tmp/dg_test_weights_XXXXXX");
    if (!mkdtemp(dir)) return -1;
    snprintf(path, plen, "%s/model.safetensors", dir);
    write_st(path, t, n);
    return 0;
}

/* A layout test's end: its two backends freed, its folder removed. */
static void layout_test_end(dg_backend *be, dg_backend *be16, const char *dir) {
    char cmd[128];
    dg_backend_free(be);
    dg_backend_free(be16);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
}

/* A file holding `wide` (BF16 [3, 4500]) in a fresh folder; its path in path. */
static int wide_file(char *dir, size_t dlen, char *path, size_t plen) {
    for (int i = 0; i < WR * WC; i++) wide[i] = dg_f32_to_bf16((float)(i % 509 - 254));   /* exact in bf16 */
    const tensor_spec t[] = {{"wide", "BF16", 2, {WR, WC}, wide, sizeof wide}};
    return st_folder(dir, dlen, path, plen, t, 1);
}

/* A backend without the layout that copies at weight_prepare, as the GPU's does. */
static int copying_prepare(dg_backend *be, dg_weight *w, char *err, size_t errlen) {
    (void)be; (void)err; (void)errlen;
    const size_t bytes = (size_t)w->rows * (size_t)w->cols * dg_dtype_size(w->dtype);
    void *p = malloc(bytes);
    if (!p) return DG_ENOMEM;
    memcpy(p, w->data, bytes);
    w->data = p;
    return 0;
}

TEST(wide_matrices_are_rewritten_into_blocks_for_the_cpu) {
    char dir[64], path[128], err[256] = "";
    if (wide_file(dir, sizeof dir, path, sizeof path) < 0) { CHECK(!"folder"); return; }
    dg_backend *be = NULL, *be16 = NULL;
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    CHECK_EQ_INT(dg_backend_new_opts("cpu", &(dg_backend_opts){.n_threads = 1, .cpu_bf16_compute = 1}, &be16,
                                     err, sizeof err), 0);
    CHECK(be && be->weights_blocked == 1 && be16);
    if (be && be16) {   /* blocked where x's row, as the matmul reads it, passes 12 KiB */
        CHECK(dg_weight_kb_for(be, DG_DTYPE_BF16, 3072) == 0 && dg_weight_kb_for(be, DG_DTYPE_BF16, 3073) == DG_WEIGHT_KB);
        CHECK(dg_weight_kb_for(be16, DG_DTYPE_BF16, 6144) == 0 && dg_weight_kb_for(be16, DG_DTYPE_BF16, 6145) == DG_WEIGHT_KB);
        CHECK(dg_weight_kb_for(be16, DG_DTYPE_F32, 3073) == DG_WEIGHT_KB);   /* F32 weights: the fp32 order */
    }
    for (int flags = 0; be && be16 && flags <= DG_ST_HUGEPAGES; flags += DG_ST_HUGEPAGES) {   /* mapped; huge pages */
        dg_st *st = NULL;
        CHECK_EQ_INT(dg_st_open_flags(dir, flags, NULL, NULL, &st, err, sizeof err), 0);
        if (!st) break;
        const dg_st_tensor *t = dg_st_find(st, "wide");
        dg_buffer_list owned = {0};
        dg_binder b = {.st = st, .be = be16, .owned = &owned, .err = err, .errlen = sizeof err};
        dg_weight w = {0}, tied = {0}, w16 = {0};
        float *host = malloc(sizeof(float) * WR * WC);
        /* bf16 compute reads x's 4500 columns as 9 KB: row-major, untouched */
        CHECK_EQ_INT(dg_bind_matrix(&b, &w16, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(w16.kb == 0 && t->kb == 0 && w16.data == t->data && wide_matches(&w16));
        b.be = be;
        /* fp32 compute, 18 KB: in place, in the set's own memory, no copy */
        CHECK_EQ_INT(dg_bind_matrix(&b, &w, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(w.kb == DG_WEIGHT_KB && t->kb == DG_WEIGHT_KB && w.data == t->data && owned.n == 0);
        CHECK(wide_matches(&w));
        /* by the definition: block 1 (columns 2048 .. 4095) at 2048·rows, its row 1 2048 on;
         * block 2 (404 columns) at 4096·rows, its rows 404 apart */
        CHECK(dg_bf16_to_f32(((const uint16_t *)w.data)[2048 * WR + 1 * 2048 + 5]) == wide_at(1, 2053));
        CHECK(dg_bf16_to_f32(((const uint16_t *)w.data)[4096 * WR + 2 * 404 + 403]) == wide_at(2, 4499));
        /* bound again (a tied lm_head): found so */
        CHECK_EQ_INT(dg_bind_matrix(&b, &tied, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(tied.data == w.data && tied.kb == DG_WEIGHT_KB);
        /* and bf16 compute now reads it blocked, as it lies */
        b.be = be16;
        CHECK_EQ_INT(dg_bind_matrix(&b, &w16, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(w16.kb == DG_WEIGHT_KB && w16.data == t->data && wide_matches(&w16));
        b.be = be;
        /* the other kinds read through the layout; the raw tensor is refused */
        CHECK_EQ_INT(dg_bind_fp32_host(&b, host, DG_SHAPE(WR, WC), "wide"), 0);
        int same = 1;
        for (int i = 0; i < WR * WC; i++) same &= host[i] == wide_at(i / WC, i % WC);
        CHECK(same);
        const dg_st_tensor *raw = NULL;
        CHECK_EQ_INT(dg_bind_find(&b, DG_SHAPE(WR, WC), &raw, "wide"), DG_EMODEL);
        CHECK_EQ_STR(after_dir(dir, err), "tensor \"wide\": bound as a matrix already, not readable as stored");
        CHECK(raw == NULL);
        /* a backend without the layout (the GPU's kind) gets it row-major again */
        dg_backend dev = {.weights_blocked = 0, .weight_prepare = copying_prepare};
        dg_binder bd = {.st = st, .be = &dev, .err = err, .errlen = sizeof err};
        dg_weight wd = {0};
        CHECK_EQ_INT(dg_bind_matrix(&bd, &wd, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(wd.kb == 0 && wd.data && wd.data != w.data && wide_matches(&wd));
        CHECK(wd.data && !memcmp(wd.data, wide, sizeof wide));
        free((void *)wd.data);
        free(host);
        dg_buffer_list_release(&owned);
        dg_st_close(st);
    }
    /* a buffer the set borrows is not written: a copy in the binder's list, else row-major */
    FILE *f = fopen(path, "rb");
    static uint8_t image[WR * WC * 2 + 4096];
    const size_t size = f ? fread(image, 1, sizeof image, f) : 0;
    if (f) fclose(f);
    dg_st *st = NULL;
    CHECK_EQ_INT(dg_st_new(&st), 0);
    CHECK_EQ_INT(dg_st_add_buffer(st, image, size, "image", err, sizeof err), 0);
    if (be && st && dg_st_find(st, "wide")) {
        dg_buffer_list owned = {0};
        dg_binder b = {.st = st, .be = be, .owned = &owned, .err = err, .errlen = sizeof err};
        dg_weight w = {0}, plain = {0};
        CHECK_EQ_INT(dg_bind_matrix(&b, &w, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(w.kb == DG_WEIGHT_KB && w.data != dg_st_find(st, "wide")->data && owned.n == 1 && wide_matches(&w));
        CHECK(dg_st_find(st, "wide")->kb == 0);
        b.owned = NULL;
        CHECK_EQ_INT(dg_bind_matrix(&b, &plain, DG_SHAPE(WR, WC), "wide"), 0);
        CHECK(plain.kb == 0 && plain.data == dg_st_find(st, "wide")->data && wide_matches(&plain));
        dg_buffer_list_release(&owned);
    }
    dg_st_close(st);
    layout_test_end(be, be16, dir);
}

/* ---- the panel layout (backend.h) ---- */

enum { TR = 130, TC = 10 };   /* two full panels of 64 rows and one of 2 */
static uint16_t tall[TR * TC], odd_cols[5 * 7];

static float tall_at(int64_t r, int64_t c) { return dg_bf16_to_f32(tall[r * TC + c]); }

static int tall_matches(const dg_weight *w) { return matches(w, tall); }

/* A CPU-like weight_prepare: the matrix read where it lies. */
static int in_place_prepare(dg_backend *be, dg_weight *w, char *err, size_t errlen) {
    (void)be; (void)w; (void)err; (void)errlen;
    return 0;
}

TEST(offered_bf16_matrices_take_the_panel_layout_on_the_cpu) {
    char dir[64], path[128], err[256] = "";
    for (int i = 0; i < TR * TC; i++) tall[i] = dg_f32_to_bf16((float)(i % 251 - 125));   /* exact in bf16 */
    for (int i = 0; i < 5 * 7; i++) odd_cols[i] = dg_f32_to_bf16((float)i);
    const tensor_spec ts[] = {{"tall", "BF16", 2, {TR, TC}, tall, sizeof tall},
                              {"odd", "BF16", 2, {5, 7}, odd_cols, sizeof odd_cols}};
    if (st_folder(dir, sizeof dir, path, sizeof path, ts, 2) < 0) { CHECK(!"folder"); return; }
    dg_backend *be = NULL, *be16 = NULL;
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    CHECK_EQ_INT(dg_backend_new_opts("cpu", &(dg_backend_opts){.n_threads = 1, .cpu_bf16_compute = 1}, &be16,
                                     err, sizeof err), 0);
    CHECK(be && be16 && be->weights_panels == 1 && be16->weights_panels == 1);
    /* a CPU-like backend that does not read them */
    dg_backend blocked_only = {.weights_blocked = 1, .weights_panels = 0, .weight_prepare = in_place_prepare};
    if (be && be16) {   /* only offered, BF16, an even number of columns, on a backend that reads them */
        blocked_only.alloc = be->alloc;   /* host memory: the CPU's functions ignore their backend */
        blocked_only.release = be->release;
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_BF16, TC, 1) == DG_WEIGHT_PANELS);
        CHECK(dg_weight_layout_for(be, DG_DTYPE_BF16, TC, 1) == DG_WEIGHT_PANELS);
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_BF16, TC, 0) == 0);
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_BF16, 7, 1) == 0);
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_BF16, DG_WEIGHT_PANEL_COLS_MAX, 1) == DG_WEIGHT_PANELS);
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_BF16, DG_WEIGHT_PANEL_COLS_MAX + 2, 1) != DG_WEIGHT_PANELS);
        CHECK(dg_weight_layout_for(be16, DG_DTYPE_F32, TC, 1) == 0);
        CHECK(dg_weight_layout_for(&blocked_only, DG_DTYPE_BF16, TC, 1) == 0);
    }
    dg_st *st = NULL;
    if (be && be16) CHECK_EQ_INT(dg_st_open_flags(dir, DG_ST_HUGEPAGES, NULL, NULL, &st, err, sizeof err), 0);
    if (st) {
        const dg_st_tensor *t = dg_st_find(st, "tall");
        dg_buffer_list owned = {0};
        dg_binder b = {.st = st, .be = be16, .owned = &owned, .panels = 1, .err = err, .errlen = sizeof err};
        dg_weight w = {0}, wo = {0}, wf = {0}, again = {0};
        /* rewritten where it lies, no copy */
        CHECK_EQ_INT(dg_bind_matrix(&b, &w, DG_SHAPE(TR, TC), "tall"), 0);
        CHECK(w.kb == DG_WEIGHT_PANELS && t->kb == DG_WEIGHT_PANELS && w.data == t->data && owned.n == 0);
        CHECK(tall_matches(&w));
        /* by the definition: row 65 is row 1 of panel 1 (64 rows), column 3 the odd half of
         * step 1; row 129 row 1 of panel 2 (2 rows), column 9 the odd half of step 4 */
        const uint16_t *raw = w.data;
        CHECK(dg_bf16_to_f32(raw[64 * TC + 1 * 2 * 64 + 1 * 2 + 1]) == tall_at(65, 3));
        CHECK(dg_bf16_to_f32(raw[128 * TC + 4 * 2 * 2 + 1 * 2 + 1]) == tall_at(129, 9));
        CHECK(dg_bf16_to_f32(raw[0 * TC + 0 * 2 * 64 + 63 * 2 + 0]) == tall_at(63, 0));
        CHECK_EQ_INT(dg_bind_matrix(&b, &again, DG_SHAPE(TR, TC), "tall"), 0);
        CHECK(again.data == w.data && again.kb == DG_WEIGHT_PANELS);
        /* an odd number of columns stays row-major */
        CHECK_EQ_INT(dg_bind_matrix(&b, &wo, DG_SHAPE(5, 7), "odd"), 0);
        CHECK(wo.kb == 0 && wo.data == dg_st_find(st, "odd")->data);
        /* the other kinds read through the layout */
        float *host = malloc(sizeof(float) * TR * TC);
        CHECK_EQ_INT(dg_bind_fp32_host(&b, host, DG_SHAPE(TR, TC), "tall"), 0);
        int same = 1;
        for (int i = 0; i < TR * TC; i++) same &= host[i] == tall_at(i / TC, i % TC);
        CHECK(same);
        free(host);
        /* fp32 compute reads the same panels (its own order over them) */
        b.be = be;
        CHECK_EQ_INT(dg_bind_matrix(&b, &wf, DG_SHAPE(TR, TC), "tall"), 0);
        CHECK(wf.kb == DG_WEIGHT_PANELS && wf.data == w.data && owned.n == 0);
        /* a backend that does not read panels gets a copy in its own layout */
        b.be = &blocked_only;
        CHECK_EQ_INT(dg_bind_matrix(&b, &wf, DG_SHAPE(TR, TC), "tall"), 0);
        CHECK(wf.kb == 0 && wf.data != w.data && owned.n == 1 && tall_matches(&wf));
        CHECK(wf.data && !memcmp(wf.data, tall, sizeof tall));
        b.be = be;
        /* which needs the binder's list */
        b.be = &blocked_only;
        b.owned = NULL;
        CHECK_EQ_INT(dg_bind_matrix(&b, &wf, DG_SHAPE(TR, TC), "tall"), DG_EINVAL);
        CHECK_EQ_STR(after_dir(dir, err), "tensor \"tall\": in another bind's panel layout, and no buffer list for a copy out of it");
        /* a backend without the blocked or panel layout (the GPU's kind) gets it row-major */
        dg_backend dev = {.weights_blocked = 0, .weight_prepare = copying_prepare};
        dg_binder bd = {.st = st, .be = &dev, .panels = 1, .err = err, .errlen = sizeof err};
        dg_weight wd = {0};
        CHECK_EQ_INT(dg_bind_matrix(&bd, &wd, DG_SHAPE(TR, TC), "tall"), 0);
        CHECK(wd.kb == 0 && wd.data && !memcmp(wd.data, tall, sizeof tall));
        free((void *)wd.data);
        dg_buffer_list_release(&owned);
        dg_st_close(st);
    }
    layout_test_end(be, be16, dir);
}

int main(void) { return test_main(); }
