/* Fidelity of the Qwen2.5-VL vision tower and of the multimodal prefill against Hugging Face
 * transformers.
 *
 * The goldens (tests/golden/vision/, made by tools/reference/make_vision_goldens.py) come
 * from Qwen2_5_VLForConditionalGeneration in float32 with eager attention, on the tiny
 * package that build/mkmodel writes for seed 1 with the real Qwen2 vocabulary (the one
 * of the decoder goldens; the test writes it again and checks its checksum). Each test
 * image is decoded and preprocessed here (engine/image.c, engine/image_preprocess.c:
 * equal to the Pillow processor the goldens used), then:
 *   - the window layout (window_index, cu_window_seqlens) equals transformers' exactly;
 *   - the merged embeddings of each image alone, and of two images of different sizes in
 *     one call, match;
 *   - a prompt with those two images: get_rope_index positions equal exactly; the prefill
 *     logits (top-16 of every position, the whole last row) match; 16 greedy steps give
 *     the same tokens and top-16 logits.
 *
 * Tolerance: |ours - golden| <= 2e-4 + 1e-4·|golden| for embeddings (magnitude ~1-3) and
 * 1e-3 + 1e-4·|golden| for logits (magnitude ~5), as in test_qwen2.c. Both sides compute
 * in fp32 from the same bf16 weights and the same pixel values; they differ in summation
 * order (OpenBLAS vs PyTorch) and online vs two-pass softmax: errors of order 1e-6..1e-5
 * (the largest seen is printed). A wrong rotary pairing, window order, merge layout or
 * position gives errors of order 0.1..1. */
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/device.h"
#include "common/harness.h"
#include "common/package.h"
#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "duogen.h"
#include "io/image.h"
#include "io/image_preprocess.h"
#include "cache/kv_cache.h"
#include "mllm/mrope.h"
#include "mllm/qwen2.h"
#include "io/safetensors.h"
#include "mllm/vision.h"

#define GOLDEN_DIR "tests/golden/vision"
#define MAX_PATCHES 2048

/* Tolerances of the CPU backends (see the top); the CUDA backend rounds the activations
 * entering each GEMM to bf16 (2^-9 relative) unless DG_CUDA_GEMM=precise: its bounds are
 * those of tests/test_cuda_parity.c, scaled to these magnitudes. Measured on an H200:
 * embeddings 1.7e-2, logits 2.9e-2 (default); 2.7e-5, 3.5e-5 (precise). */
typedef struct {
    double emb_abs, logit_abs, rel;
} tolerance;
static const tolerance CPU_TOL = {2e-4, 1e-3, 1e-4}, CUDA_TOL = {3e-2, 5e-2, 1e-2};
static tolerance tol = {2e-4, 1e-3, 1e-4};

static json_t *goldens;
static char pkg[256];            /* the package's mllm/ directory */
static double max_emb_err, max_logit_err;

static int setup(void) {
    static int state = 0;   /* 0 not yet, 1 ready, -1 failed */
    if (state) return state > 0;
    state = -1;
    if (!(goldens = test_golden_package(GOLDEN_DIR, pkg, sizeof pkg))) return 0;
    state = 1;
    return 1;
}

static void *read_file(const char *name, size_t *len) { return test_read_file(GOLDEN_DIR, name, len); }

typedef struct {
    dg_qwen2vl_config cfg;
    dg_backend       *be;
    dg_st            *st;
    dg_vision         vm;
    dg_vision_state  *vs;
    float            *emb;     /* [MAX_PATCHES / 4, O] backend memory */
} tower;

/* The tower on `backend` ("cpu" with bf16: bf16 compute). */
static int tower_open_opts(tower *x, const char *backend, int bf16) {
    char err[512];
    memset(x, 0, sizeof *x);
    if (!setup() || dg_config_load(pkg, &x->cfg, err, sizeof err) < 0 ||
        dg_backend_new_opts(backend, &(dg_backend_opts){.cpu_bf16_compute = bf16}, &x->be, err, sizeof err) < 0 ||
        dg_st_open(pkg, &x->st, err, sizeof err) < 0 ||
        dg_vision_load(&x->vm, &x->cfg.vision, x->st, x->be, err, sizeof err) < 0 ||
        dg_vision_state_new(&x->vm, x->vm.be, MAX_PATCHES, &x->vs, err, sizeof err) < 0) {
        fprintf(stderr, "tower_open: %s\n", err);
        return -1;
    }
    x->emb = x->be->alloc(x->be, sizeof(float) * MAX_PATCHES / 4 * (size_t)x->cfg.vision.out_hidden_size);
    return 0;
}

static int tower_open(tower *x, const char *backend) { return tower_open_opts(x, backend, 0); }

static void tower_close(tower *x) {
    if (x->be) x->be->release(x->be, x->emb);
    dg_vision_state_free(&x->vm, x->vs);
    dg_vision_unload(&x->vm);
    dg_st_close(x->st);
    dg_backend_free(x->be);
}

/* Golden image `i`, decoded and preprocessed as the engine does it. */
static dg_image_patches *patches_of(int i) {
    json_t *g = json_array_get(json_object_get(goldens, "images"), (size_t)i);
    dg_image_preprocess_config pc;
    dg_image *img = NULL;
    dg_image_patches *p = NULL;
    char err[256];
    size_t len;
    uint8_t *png = read_file(json_string_value(json_object_get(g, "file")), &len);
    dg_image_preprocess_config_default(&pc);
    if (!png || dg_image_decode(png, len, NULL, &(dg_image_limits){0}, &img, err, sizeof err) < 0 ||
        dg_image_patches_new(img, &pc, &p, err, sizeof err) < 0)
        test_fail(__FILE__, __LINE__, "image %d: %s", i, png ? err : "cannot read");
    free(png);
    dg_image_free(img);
    return p;
}

static void check_rows(const float *ours, const char *golden_file, int64_t n, double abs_tol,
                       double *worst_out, const char *what) {
    size_t len;
    float *want = read_file(golden_file, &len);
    CHECK(want && len == (size_t)n * sizeof(float));
    if (!want || len != (size_t)n * sizeof(float)) { free(want); return; }
    double worst = 0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs(ours[i] - want[i]);
        if (d > worst) worst = d;
        if (d > abs_tol + tol.rel * fabs(want[i])) {
            test_fail(__FILE__, __LINE__, "%s: value %lld is %.7f, golden %.7f", what, (long long)i,
                      ours[i], want[i]);
            break;
        }
    }
    if (worst > *worst_out) *worst_out = worst;
    free(want);
}

TEST(package_is_reproduced) {
    char path[512], got[32];
    if (!setup()) { CHECK(!"setup"); return; }
    snprintf(path, sizeof path, "%s/model.safetensors", pkg);
    snprintf(got, sizeof got, "%016" PRIx64, test_file_fnv1a64(path));
    CHECK_EQ_STR(got, json_string_value(json_object_get(json_object_get(goldens, "package"), "weights_fnv1a64")));
}

/* Each image alone: grid, window layout, embeddings; on both kernel sets. */
static void single_images(const char *backend) {
    tower x;
    char err[256];
    if (tower_open(&x, backend) < 0) { CHECK(!"setup"); return; }
    const int O = x.cfg.vision.out_hidden_size;
    size_t i;
    json_t *g;
    json_array_foreach(json_object_get(goldens, "images"), i, g) {
        dg_image_patches *p = patches_of((int)i);
        if (!p) continue;
        json_t *grid = json_object_get(g, "grid");
        CHECK_EQ_INT(p->grid_t, json_integer_value(json_array_get(grid, 0)));
        CHECK_EQ_INT(p->grid_h, json_integer_value(json_array_get(grid, 1)));
        CHECK_EQ_INT(p->grid_w, json_integer_value(json_array_get(grid, 2)));
        const int n_tok = dg_vision_tokens(&x.vm, p->grid_t, p->grid_h, p->grid_w);
        CHECK_EQ_INT(n_tok, json_integer_value(json_object_get(g, "tokens")));
        const dg_image_patches *list[1] = {p};
        int rc = dg_vision_forward(&x.vm, x.vs, list, 1, x.emb, err, sizeof err);
        CHECK_EQ_INT(rc, 0);
        if (rc == 0) {
            json_t *wi = json_object_get(g, "window_index"), *cu = json_object_get(g, "cu_window_seqlens");
            CHECK_EQ_INT(json_array_size(wi), n_tok);
            for (int k = 0; k < n_tok; k++)
                if (x.vs->window_index[k] != json_integer_value(json_array_get(wi, (size_t)k))) {
                    test_fail(__FILE__, __LINE__, "image %zu: window_index[%d] %d, golden %lld", i, k,
                              x.vs->window_index[k], (long long)json_integer_value(json_array_get(wi, (size_t)k)));
                    break;
                }
            for (size_t k = 0; k < json_array_size(cu); k++)
                CHECK_EQ_INT(x.vs->cu_window[k], json_integer_value(json_array_get(cu, k)));
            float *host = malloc(sizeof(float) * (size_t)n_tok * O);
            x.be->download(x.be, host, x.emb, (int64_t)n_tok * O);
            check_rows(host, json_string_value(json_object_get(g, "embeddings")), (int64_t)n_tok * O,
                       tol.emb_abs, &max_emb_err, "embeddings");
            free(host);
        }
        dg_image_patches_free(p);
    }
    tower_close(&x);
    printf("  %s: largest |embedding error| so far %.3g\n", backend, max_emb_err);
}

TEST(single_images_match_transformers) { single_images("cpu"); }
TEST(single_images_scalar_kernels) { single_images("cpu-scalar"); }

/* bf16 compute (dg_backend_opts.cpu_bf16_compute): the tower's matrices take the panel
 * layout and the bf16 panel order (kernels/cpu/matmul.h), the segment attention's products
 * bf16 inputs on AVX-512 BF16 (attention_bf16.h), as transformers in bfloat16 rounds its
 * matmuls' inputs. Against the float32 goldens: an input rounded to bf16 is off by up to
 * 2^-9 = 0.2% relative, and each of the products on a path through the tiny tower (the
 * patch embedding, per block q/k/v, the scores and the weighted values, the projection,
 * the MLP's three; the merger's two) adds an error of that order on values of magnitude
 * ~1-3: 3e-2 + 2e-2·|golden|. Seen: 1.5e-2. fp32 compute stays within 2e-4 (above); a wrong
 * pairing or panel layout gives errors of order 1. And each image of a call of two gives
 * the bits it gives alone: every operation of the tower is row-local or per image. */
TEST(bf16_compute_matches_transformers_and_rows_are_their_own) {
    tower x;
    char err[256];
    if (tower_open_opts(&x, "cpu", 1) < 0) { CHECK(!"setup"); return; }
    CHECK(x.vm.blocks[0].qkv.kb == DG_WEIGHT_PANELS && x.vm.mlp0.kb == DG_WEIGHT_PANELS);
    json_t *pr = json_object_get(goldens, "prompt"), *which = json_object_get(pr, "images");
    dg_image_patches *p[2] = {patches_of((int)json_integer_value(json_array_get(which, 0))),
                              patches_of((int)json_integer_value(json_array_get(which, 1)))};
    if (p[0] && p[1]) {
        const int O = x.cfg.vision.out_hidden_size;
        const int n0 = dg_vision_tokens(&x.vm, p[0]->grid_t, p[0]->grid_h, p[0]->grid_w),
                  n1 = dg_vision_tokens(&x.vm, p[1]->grid_t, p[1]->grid_h, p[1]->grid_w);
        float *pair = malloc(sizeof(float) * (size_t)(n0 + n1) * O), *alone = malloc(sizeof(float) * (size_t)n1 * O);
        const dg_image_patches *list[2] = {p[0], p[1]};
        CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, list, 2, x.emb, err, sizeof err), 0);
        x.be->download(x.be, pair, x.emb, (int64_t)(n0 + n1) * O);
        const tolerance saved = tol;
        double worst = 0;
        tol.rel = 2e-2;
        check_rows(pair, json_string_value(json_object_get(pr, "pair_embeddings")), (int64_t)(n0 + n1) * O, 3e-2,
                   &worst, "bf16 compute pair embeddings");
        tol = saved;
        printf("  bf16 compute: largest |embedding error| %.3g\n", worst);
        for (int i = 0; i < 2; i++) {
            CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, list + i, 1, x.emb, err, sizeof err), 0);
            x.be->download(x.be, alone, x.emb, (int64_t)(i ? n1 : n0) * O);
            CHECK(!memcmp(alone, pair + (i ? (size_t)n0 * O : 0), sizeof(float) * (size_t)(i ? n1 : n0) * O));
        }
        free(pair);
        free(alone);
    }
    dg_image_patches_free(p[0]);
    dg_image_patches_free(p[1]);
    tower_close(&x);
}

/* The two prompt images (different sizes) in one call: the rows of each stay its own. */
TEST(two_images_of_different_sizes_in_one_call) {
    tower x;
    char err[256];
    if (tower_open(&x, "cpu") < 0) { CHECK(!"setup"); return; }
    json_t *pr = json_object_get(goldens, "prompt"), *which = json_object_get(pr, "images");
    dg_image_patches *p[2] = {patches_of((int)json_integer_value(json_array_get(which, 0))),
                              patches_of((int)json_integer_value(json_array_get(which, 1)))};
    const dg_image_patches *list[2] = {p[0], p[1]};
    if (p[0] && p[1]) {
        const int n_tok = dg_vision_tokens(&x.vm, p[0]->grid_t, p[0]->grid_h, p[0]->grid_w) +
                          dg_vision_tokens(&x.vm, p[1]->grid_t, p[1]->grid_h, p[1]->grid_w);
        const int O = x.cfg.vision.out_hidden_size;
        CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, list, 2, x.emb, err, sizeof err), 0);
        float *host = malloc(sizeof(float) * (size_t)n_tok * O);
        x.be->download(x.be, host, x.emb, (int64_t)n_tok * O);
        check_rows(host, json_string_value(json_object_get(pr, "pair_embeddings")), (int64_t)n_tok * O,
                   tol.emb_abs, &max_emb_err, "pair embeddings");
        printf("  two images in one call: largest |embedding error| so far %.3g\n", max_emb_err);
        free(host);
    }
    /* too many patches for the state: refused, nothing run */
    const dg_image_patches *many[8] = {p[1], p[1], p[1], p[1], p[1], p[1], p[1], p[1]};
    CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, many, 8, x.emb, err, sizeof err), DG_ELIMIT);
    dg_image_patches_free(p[0]);
    dg_image_patches_free(p[1]);
    tower_close(&x);
}

static int argmax(const float *row, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (row[i] > row[best]) best = i;
    return best;
}

static void check_topk(const float *row, json_t *topk, const char *what, int idx) {
    size_t i;
    json_t *e;
    json_array_foreach(topk, i, e) {
        int id = (int)json_integer_value(json_array_get(e, 0));
        double want = json_real_value(json_array_get(e, 1)), d = fabs(row[id] - want);
        if (d > max_logit_err) max_logit_err = d;
        if (d > tol.logit_abs + tol.rel * fabs(want))
            test_fail(__FILE__, __LINE__, "%s %d: logit[%d] %.7f, golden %.7f", what, idx, id, row[id], want);
    }
}

/* The whole multimodal path: vision -> positions -> prefill with the image rows -> greedy. */
static void multimodal(const char *backend) {
    tower x;
    dg_qwen2 lm;
    dg_qwen2_state *s = NULL;
    dg_kv_cache *kv = NULL;
    dg_kv_seq seq = {0};
    char err[512];
    if (tower_open(&x, backend) < 0) { CHECK(!"setup"); return; }
    const dg_text_config *tc = &x.cfg.text;
    const int V = tc->vocab_size;
    json_t *pr = json_object_get(goldens, "prompt"), *jids = json_object_get(pr, "ids");
    const int n = (int)json_array_size(jids);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)n), *pos = malloc(sizeof(int32_t) * 3 * (size_t)n);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(jids, (size_t)i));
    json_t *which = json_object_get(pr, "images");
    dg_image_patches *p[2] = {patches_of((int)json_integer_value(json_array_get(which, 0))),
                              patches_of((int)json_integer_value(json_array_get(which, 1)))};
    const dg_image_patches *list[2] = {p[0], p[1]};
    int32_t grids[2][3];
    for (int i = 0; i < 2; i++) {
        grids[i][0] = p[i]->grid_t;
        grids[i][1] = p[i]->grid_h;
        grids[i][2] = p[i]->grid_w;
    }
    int next = 0;
    if (dg_qwen2_load(&lm, tc, x.st, x.be, err, sizeof err) < 0 ||
        dg_qwen2_state_new(&lm, lm.be, 256, 256, &s, err, sizeof err) < 0 ||
        dg_kv_cache_new(x.be, tc->n_layers, tc->n_kv_heads * tc->head_dim, 16, 32, DG_DTYPE_F32, &kv, err, sizeof err) < 0 ||
        dg_kv_seq_init(&seq, 512, 16) < 0 ||
        dg_vision_forward(&x.vm, x.vs, list, 2, x.emb, err, sizeof err) < 0 ||
        dg_mrope_index(ids, n, 0, &(dg_mrope_params){tc->image_token_id, x.cfg.vision.spatial_merge_size},
                       grids, 2, pos, &next, err, sizeof err) < 0) {
        test_fail(__FILE__, __LINE__, "%s", err);
        goto out;
    }
    /* positions: exact */
    json_t *gpos = json_object_get(pr, "positions");
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < n; i++)
            if (pos[r * n + i] != json_integer_value(json_array_get(json_array_get(gpos, (size_t)r), (size_t)i))) {
                test_fail(__FILE__, __LINE__, "position row %d token %d: %d", r, i, pos[r * n + i]);
                r = 3;
                break;
            }
    const int delta = dg_mrope_delta(next, n);
    CHECK_EQ_INT(delta, json_integer_value(json_object_get(pr, "rope_delta")));

    dg_qwen2_input in = {.ids = ids, .pos = pos, .image_embeds = x.emb, .n = n, .n_logits = n};
    CHECK_EQ_INT(dg_qwen2_forward(&lm, s, kv, &seq, &in, NULL, err, sizeof err), 0);
    json_t *pre = json_object_get(pr, "prefill_topk");
    for (int i = 0; i < n; i++) check_topk(s->logits + (int64_t)i * V, json_array_get(pre, (size_t)i), "prefill pos", i);
    check_rows(s->logits + (int64_t)(n - 1) * V, json_string_value(json_object_get(pr, "last_row")), V,
               tol.logit_abs, &max_logit_err, "last prefill row");

    json_t *greedy = json_object_get(pr, "greedy"), *steps = json_object_get(pr, "decode_topk");
    int tok = argmax(s->logits + (int64_t)(n - 1) * V, V);
    for (int t = 0; t < (int)json_array_size(greedy); t++) {
        int want = (int)json_integer_value(json_array_get(greedy, (size_t)t));
        if (tok != want) {
            test_fail(__FILE__, __LINE__, "step %d: greedy token %d, golden %d", t, tok, want);
            break;
        }
        int32_t id = tok;
        dg_qwen2_input step = {.ids = &id, .rope_delta = delta, .n = 1, .n_logits = 1};
        CHECK_EQ_INT(dg_qwen2_forward(&lm, s, kv, &seq, &step, NULL, err, sizeof err), 0);
        check_topk(s->logits, json_array_get(steps, (size_t)t), "decode step", t);
        tok = argmax(s->logits, V);
    }
    printf("  %s: largest |logit error| so far %.3g\n", backend, max_logit_err);
out:
    if (kv) dg_kv_seq_release(kv, &seq);
    dg_kv_seq_free(&seq);
    dg_kv_cache_free(kv);
    dg_qwen2_state_free(&lm, s);
    dg_qwen2_unload(&lm);
    dg_image_patches_free(p[0]);
    dg_image_patches_free(p[1]);
    free(ids);
    free(pos);
    tower_close(&x);
}

TEST(multimodal_prefill_and_greedy_match_transformers) { multimodal("cpu"); }

/* The same on the CUDA backend (skipped where there is no GPU). */
TEST(cuda_matches_transformers) {
    if (!test_cuda_present()) SKIP("%s", test_cuda_absent_reason());
    max_emb_err = max_logit_err = 0;
    tol = CUDA_TOL;
    single_images("cuda:0");
    multimodal("cuda:0");
    tol = CPU_TOL;   /* the CPU cases report their own largest errors */
    max_emb_err = max_logit_err = 0;
}

/* Spec §4.4's example: grid 1x34x46 (17x23 tokens) gives 30 windows; partial ones at the
 * right (3 tokens wide) and the bottom (1 token high). */
TEST(window_layout_of_the_spec_example) {
    tower x;
    char err[256];
    if (tower_open(&x, "cpu") < 0) { CHECK(!"setup"); return; }
    float *pix = calloc((size_t)34 * 46 * 1176, sizeof(float));
    dg_image_patches g = {.grid_t = 1, .grid_h = 34, .grid_w = 46, .patch_dim = 1176, .pixel_values = pix};
    const dg_image_patches *list[1] = {&g};
    CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, list, 1, x.emb, err, sizeof err), 0);
    const int32_t head[18] = {0, 1, 2, 3, 23, 24, 25, 26, 46, 47, 48, 49, 69, 70, 71, 72, 4, 5};
    for (int k = 0; k < 18; k++) CHECK_EQ_INT(x.vs->window_index[k], head[k]);
    const int32_t cu_head[8] = {0, 64, 128, 192, 256, 320, 368, 432};
    const int32_t cu_tail[7] = {1472, 1488, 1504, 1520, 1536, 1552, 1564};
    for (int k = 0; k < 8; k++) CHECK_EQ_INT(x.vs->cu_window[k], cu_head[k]);
    for (int k = 0; k < 7; k++) CHECK_EQ_INT(x.vs->cu_window[24 + k], cu_tail[k]);
    free(pix);
    tower_close(&x);
}

/* A patch grid that does not fit the model is refused with a message. */
TEST(bad_patch_grid_is_refused) {
    tower x;
    char err[256];
    if (tower_open(&x, "cpu") < 0) { CHECK(!"setup"); return; }
    float pix[1];
    dg_image_patches odd = {.grid_t = 1, .grid_h = 3, .grid_w = 4, .patch_dim = 1176, .pixel_values = pix};
    const dg_image_patches *list[1] = {&odd};
    CHECK_EQ_INT(dg_vision_forward(&x.vm, x.vs, list, 1, x.emb, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "image 0") != NULL);
    tower_close(&x);
}

int main(void) {
    int rc = test_main();   /* the package goes at exit (test_make_package) */
    json_decref(goldens);
    return rc;
}
