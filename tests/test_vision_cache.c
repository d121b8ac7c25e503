/* The vision cache (engine/vision_cache.c): LRU order, byte budget, counters, and
 * dg_vision_encode: a second request with the same image takes its rows from the cache
 * without running the tower, gives the same bytes, a picture repeated within one request
 * runs once, and mixed hits and misses land in the right rows. Uses the tiny package and the images of tests/golden/vision; embeddings are
 * compared with the transformers goldens at the tolerance of test_vision.c. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "common/package.h"
#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "duogen.h"
#include "io/image.h"
#include "io/image_preprocess.h"
#include "io/safetensors.h"
#include "mllm/vision.h"
#include "cache/vision_cache.h"

#define GOLDEN_DIR "tests/golden/vision"
#define EMB_ABS 2e-4
#define REL_TOL 1e-4

static char pkg[256];
static json_t *goldens;

static void *read_file(const char *name, size_t *len) { return test_read_file(GOLDEN_DIR, name, len); }

static int setup(void) {
    static int state = 0;
    if (state) return state > 0;
    state = -1;
    if (!(goldens = test_golden_package(GOLDEN_DIR, pkg, sizeof pkg))) return 0;
    state = 1;
    return 1;
}

typedef struct {
    dg_qwen2vl_config cfg;
    dg_backend       *be;
    dg_st            *st;
    dg_vision         vm;
    dg_vision_state  *vs;
    dg_image         *img[3];   /* the golden images, decoded */
    float            *out;      /* [512, O] */
} fixture;

static int open_fixture(fixture *x, int max_patches) {
    char err[512];
    memset(x, 0, sizeof *x);
    if (!setup() || dg_config_load(pkg, &x->cfg, err, sizeof err) < 0 ||
        dg_backend_new("cpu", 0, &x->be, err, sizeof err) < 0 ||
        dg_st_open(pkg, &x->st, err, sizeof err) < 0 ||
        dg_vision_load(&x->vm, &x->cfg.vision, x->st, x->be, err, sizeof err) < 0 ||
        dg_vision_state_new(&x->vm, x->vm.be, max_patches, &x->vs, err, sizeof err) < 0) {
        fprintf(stderr, "open_fixture: %s\n", err);
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        size_t len;
        json_t *g = json_array_get(json_object_get(goldens, "images"), (size_t)i);
        uint8_t *png = read_file(json_string_value(json_object_get(g, "file")), &len);
        if (!png || dg_image_decode(png, len, NULL, &(dg_image_limits){0}, &x->img[i], err, sizeof err) < 0) {
            free(png);
            return -1;
        }
        free(png);
    }
    x->out = x->be->alloc(x->be, sizeof(float) * 512 * (size_t)x->cfg.vision.out_hidden_size);
    return 0;
}

static void close_fixture(fixture *x) {
    for (int i = 0; i < 3; i++) dg_image_free(x->img[i]);
    if (x->be) x->be->release(x->be, x->out);
    dg_vision_state_free(&x->vm, x->vs);
    dg_vision_unload(&x->vm);
    dg_st_close(x->st);
    dg_backend_free(x->be);
}

static int tokens_of(int i) {
    return (int)json_integer_value(json_object_get(json_array_get(json_object_get(goldens, "images"), (size_t)i), "tokens"));
}

/* rows [n_tok, O] against golden image i's embeddings */
static void check_golden(const float *rows, int i, int O) {
    json_t *g = json_array_get(json_object_get(goldens, "images"), (size_t)i);
    size_t len;
    float *want = read_file(json_string_value(json_object_get(g, "embeddings")), &len);
    const int64_t n = (int64_t)tokens_of(i) * O;
    CHECK(want && len == (size_t)n * sizeof(float));
    for (int64_t k = 0; want && k < n; k++)
        if (fabs(rows[k] - want[k]) > EMB_ABS + REL_TOL * fabs(want[k])) {
            test_fail(__FILE__, __LINE__, "image %d value %lld: %.7f, golden %.7f", i, (long long)k, rows[k], want[k]);
            break;
        }
    free(want);
}

TEST(second_request_with_the_same_images_skips_the_tower) {
    fixture x;
    dg_vision_cache *c = NULL;
    dg_image_preprocess_config pp;
    char err[256];
    int computed = -1;
    if (open_fixture(&x, 2048) < 0 || dg_vision_cache_new(1 << 20, &c) < 0) { CHECK(!"setup"); goto out; }
    dg_image_preprocess_config_default(&pp);
    const int O = x.cfg.vision.out_hidden_size, n_tok = tokens_of(0) + tokens_of(1);
    const dg_image *req[2] = {x.img[0], x.img[1]};
    float *first = malloc(sizeof(float) * (size_t)n_tok * O), *second = malloc(sizeof(float) * (size_t)n_tok * O);

    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, req, 2, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 2);
    x.be->download(x.be, first, x.out, (int64_t)n_tok * O);
    check_golden(first, 0, O);
    check_golden(first + (int64_t)tokens_of(0) * O, 1, O);

    memset(second, 0, sizeof(float) * (size_t)n_tok * O);
    x.be->upload(x.be, x.out, second, (int64_t)n_tok * O);   /* clear: the hit must write */
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, req, 2, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 0);
    x.be->download(x.be, second, x.out, (int64_t)n_tok * O);
    CHECK(memcmp(first, second, sizeof(float) * (size_t)n_tok * O) == 0);

    dg_vision_cache_counters st;
    dg_vision_cache_stats(c, &st);
    CHECK_EQ_INT(st.misses, 2);
    CHECK_EQ_INT(st.hits, 2);
    CHECK_EQ_INT(st.n_entries, 2);
    CHECK_EQ_INT(st.bytes, sizeof(float) * (size_t)n_tok * O);
    free(first);
    free(second);
out:
    dg_vision_cache_free(c);
    close_fixture(&x);
}

/* The same picture twice in one request (and a third copy after another image), with and
 * without a cache: the tower runs once per distinct picture, and every copy's rows equal
 * the goldens. */
TEST(the_same_image_twice_in_one_request_runs_once) {
    fixture x;
    dg_vision_cache *c = NULL;
    dg_image_preprocess_config pp;
    char err[256];
    int computed = -1;
    if (open_fixture(&x, 2048) < 0 || dg_vision_cache_new(1 << 20, &c) < 0) { CHECK(!"setup"); goto out; }
    dg_image_preprocess_config_default(&pp);
    const int O = x.cfg.vision.out_hidden_size, t0 = tokens_of(0), t1 = tokens_of(1);
    const int n_tok = 3 * t0 + t1;
    const dg_image *req[4] = {x.img[0], x.img[0], x.img[1], x.img[0]};
    float *rows = malloc(sizeof(float) * (size_t)n_tok * O);
    for (int with_cache = 0; with_cache < 2; with_cache++) {
        memset(rows, 0, sizeof(float) * (size_t)n_tok * O);
        x.be->upload(x.be, x.out, rows, (int64_t)n_tok * O);   /* the copies must write */
        CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, with_cache ? c : NULL, &pp, req, 4, x.out, &computed, err,
                                      sizeof err), 0);
        CHECK_EQ_INT(computed, 2);
        x.be->download(x.be, rows, x.out, (int64_t)n_tok * O);
        check_golden(rows, 0, O);
        check_golden(rows + (int64_t)t0 * O, 0, O);
        check_golden(rows + (int64_t)2 * t0 * O, 1, O);
        check_golden(rows + (int64_t)(2 * t0 + t1) * O, 0, O);
        CHECK(memcmp(rows, rows + (int64_t)(2 * t0 + t1) * O, sizeof(float) * (size_t)t0 * O) == 0);
    }
    dg_vision_cache_counters st;
    dg_vision_cache_stats(c, &st);
    CHECK_EQ_INT(st.misses, 2);   /* the repeats never asked the cache */
    CHECK_EQ_INT(st.n_entries, 2);
    free(rows);
out:
    dg_vision_cache_free(c);
    close_fixture(&x);
}

/* A hit between two misses, and a state too small for all misses at once (several tower
 * calls): every image's rows still land at its place. */
TEST(mixed_hits_and_misses_in_several_calls) {
    fixture x;
    dg_vision_cache *c = NULL;
    dg_image_preprocess_config pp;
    char err[256];
    int computed = -1;
    if (open_fixture(&x, 320) < 0 || dg_vision_cache_new(1 << 20, &c) < 0) { CHECK(!"setup"); goto out; }
    dg_image_preprocess_config_default(&pp);
    const int O = x.cfg.vision.out_hidden_size;
    const dg_image *warm[1] = {x.img[1]}, *req[3] = {x.img[0], x.img[1], x.img[2]};
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, warm, 1, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 1);
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, req, 3, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 2);
    const int n_tok = tokens_of(0) + tokens_of(1) + tokens_of(2);
    float *rows = malloc(sizeof(float) * (size_t)n_tok * O);
    x.be->download(x.be, rows, x.out, (int64_t)n_tok * O);
    check_golden(rows, 0, O);
    check_golden(rows + (int64_t)tokens_of(0) * O, 1, O);
    check_golden(rows + (int64_t)(tokens_of(0) + tokens_of(1)) * O, 2, O);
    free(rows);

    /* no cache; two misses that do not fit the state together (160 + 256 > 320 patches) */
    const dg_image *pair[2] = {x.img[0], x.img[2]};
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, NULL, &pp, pair, 2, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 2);
    rows = malloc(sizeof(float) * (size_t)(tokens_of(0) + tokens_of(2)) * O);
    x.be->download(x.be, rows, x.out, (int64_t)(tokens_of(0) + tokens_of(2)) * O);
    check_golden(rows, 0, O);
    check_golden(rows + (int64_t)tokens_of(0) * O, 2, O);
    free(rows);

    /* an image over the state's patches: refused */
    dg_image *big = NULL;
    CHECK_EQ_INT(dg_image_new(600, 600, &big), 0);
    const dg_image *one[1] = {big};
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, one, 1, x.out, &computed, err, sizeof err), DG_ELIMIT);
    CHECK(strstr(err, "patches") != NULL);
    dg_image_free(big);
out:
    dg_vision_cache_free(c);
    close_fixture(&x);
}

/* A hit beside a miss in one call, under a budget of one image: the miss is stored when the
 * hit breaks the batch, and storing it evicts the entry that just hit. The hit's rows are
 * copied out before that; they were read after, from freed memory (B, of A's size, takes
 * A's chunk: A came out with B's rows). A is a golden image, B the same picture inverted. */
TEST(a_hit_evicted_by_the_batch_it_breaks_keeps_its_rows) {
    fixture x;
    dg_vision_cache *c = NULL;
    dg_image_preprocess_config pp;
    dg_image *inv = NULL;
    char err[256];
    int computed = -1;
    if (open_fixture(&x, 2048) < 0) { CHECK(!"setup"); goto out; }
    dg_image_preprocess_config_default(&pp);
    const int O = x.cfg.vision.out_hidden_size, t = tokens_of(1);
    const dg_image *A = x.img[1];
    if (dg_image_new(A->width, A->height, &inv) < 0) { CHECK(!"image"); goto out; }
    for (int64_t k = 0; k < (int64_t)A->width * A->height * 3; k++) inv->rgb[k] = (uint8_t)(255 - A->rgb[k]);
    if (dg_vision_cache_new(sizeof(float) * (size_t)t * O, &c) < 0) { CHECK(!"cache"); goto out; }
    const dg_image *a[1] = {A}, *ba[2] = {inv, A};
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, a, 1, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(dg_vision_encode(&x.vm, x.vs, c, &pp, ba, 2, x.out, &computed, err, sizeof err), 0);
    CHECK_EQ_INT(computed, 1);   /* B ran; A was a hit */
    float *rows = malloc(sizeof(float) * (size_t)(2 * t) * O);
    x.be->download(x.be, rows, x.out, (int64_t)(2 * t) * O);
    check_golden(rows + (int64_t)t * O, 1, O);
    free(rows);
out:
    dg_image_free(inv);
    dg_vision_cache_free(c);
    close_fixture(&x);
}

/* The LRU alone, with host rows (the CPU backend's download is a copy). */
TEST(lru_order_budget_and_counters) {
    dg_backend *be = NULL;
    dg_vision_cache *c = NULL;
    char err[128];
    float rows[4][8 * 4];
    dg_image_digest k[4];
    const int32_t grid[3] = {1, 4, 8};
    int n_tok, width;
    CHECK_EQ_INT(dg_backend_new("cpu", 1, &be, err, sizeof err), 0);
    CHECK_EQ_INT(dg_vision_cache_new(2 * sizeof rows[0], &c), 0);   /* room for two entries */
    for (int i = 0; i < 4; i++) {
        memset(&k[i], 0, sizeof k[i]);
        k[i].bytes[0] = (uint8_t)(i + 1);
        for (int j = 0; j < 32; j++) rows[i][j] = (float)(i * 100 + j);
    }
    CHECK_EQ_INT(dg_vision_cache_put(c, &k[0], grid, be, rows[0], 8, 4), 0);
    CHECK_EQ_INT(dg_vision_cache_put(c, &k[1], grid, be, rows[1], 8, 4), 0);
    CHECK(dg_vision_cache_get(c, &k[0], grid, &n_tok, &width) != NULL);   /* 0 most recent */
    CHECK_EQ_INT(dg_vision_cache_put(c, &k[2], grid, be, rows[2], 8, 4), 0);   /* evicts 1 */
    CHECK(dg_vision_cache_get(c, &k[1], grid, &n_tok, &width) == NULL);
    const float *r = dg_vision_cache_get(c, &k[0], grid, &n_tok, &width);
    CHECK(r && n_tok == 8 && width == 4 && memcmp(r, rows[0], sizeof rows[0]) == 0);
    const int32_t other[3] = {1, 8, 4};   /* same picture, other grid: another key */
    CHECK(dg_vision_cache_get(c, &k[0], other, &n_tok, &width) == NULL);
    /* larger than the whole budget: not stored, nothing evicted */
    float big[3 * 32] = {0};
    CHECK_EQ_INT(dg_vision_cache_put(c, &k[3], grid, be, big, 24, 4), 0);
    dg_vision_cache_counters st;
    dg_vision_cache_stats(c, &st);
    CHECK_EQ_INT(st.n_entries, 2);
    CHECK_EQ_INT(st.bytes, 2 * sizeof rows[0]);
    CHECK_EQ_INT(st.evictions, 1);
    CHECK_EQ_INT(st.hits, 2);
    CHECK_EQ_INT(st.misses, 2);
    dg_vision_cache_free(c);
    dg_backend_free(be);
}

int main(void) {
    int rc = test_main();   /* the package goes at exit (test_make_package) */
    json_decref(goldens);
    return rc;
}
