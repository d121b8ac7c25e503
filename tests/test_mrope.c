/* get_rope_index (engine/mrope.c) against the spec's worked example and transformers'
 * positions for the two-image prompt of tests/golden/vision (exact equality: positions are
 * integers), continuation after cached tokens, and refused mismatches. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/harness.h"
#include "duogen.h"
#include "mllm/mrope.h"

#define IMG 151655
static const dg_mrope_params P = {IMG, 2};

TEST(text_only_is_plain_positions) {
    int32_t ids[5] = {1, 2, 3, 4, 5}, pos[15];
    int next = -1;
    char err[128];
    CHECK_EQ_INT(dg_mrope_index(ids, 5, 0, &P, NULL, 0, pos, &next, err, sizeof err), 0);
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < 5; i++) CHECK_EQ_INT(pos[r * 5 + i], i);
    CHECK_EQ_INT(next, 5);
    CHECK_EQ_INT(dg_mrope_delta(next, 5), 0);
}

/* Spec §3.4: 15 tokens of text, a 476x644 image (patch grid 1x34x46, 17x23 tokens),
 * <|vision_end|> at 15 + 23 = 38, then 39, 40, ... */
TEST(spec_worked_example) {
    enum { T0 = 15, H = 17, W = 23, N = T0 + H * W + 4 };
    int32_t ids[N], *pos = malloc(sizeof(int32_t) * 3 * N);
    const int32_t grid[1][3] = {{1, 34, 46}};
    int next;
    char err[128];
    for (int i = 0; i < N; i++) ids[i] = i >= T0 && i < T0 + H * W ? IMG : 100 + i;
    CHECK_EQ_INT(dg_mrope_index(ids, N, 0, &P, grid, 1, pos, &next, err, sizeof err), 0);
    for (int r = 0; r < H; r++)
        for (int c = 0; c < W; c++) {
            const int i = T0 + r * W + c;
            CHECK_EQ_INT(pos[i], 15);
            CHECK_EQ_INT(pos[N + i], 15 + r);
            CHECK_EQ_INT(pos[2 * N + i], 15 + c);
        }
    for (int k = 0; k < 4; k++)
        for (int r = 0; r < 3; r++) CHECK_EQ_INT(pos[r * N + T0 + H * W + k], 38 + k);
    CHECK_EQ_INT(next, 42);
    CHECK_EQ_INT(dg_mrope_delta(next, N), 42 - N);
    free(pos);
}

/* The prompt of the vision goldens: transformers' get_rope_index, whole and continued. */
TEST(two_image_prompt_matches_transformers_whole_and_continued) {
    json_error_t je;
    json_t *g = json_load_file("tests/golden/vision/goldens.json", 0, &je);
    CHECK(g != NULL);
    if (!g) return;
    json_t *pr = json_object_get(g, "prompt"), *jids = json_object_get(pr, "ids");
    json_t *jg = json_object_get(pr, "grids"), *jpos = json_object_get(pr, "positions");
    const int n = (int)json_array_size(jids), n_img = (int)json_array_size(jg);
    int32_t *ids = malloc(sizeof(int32_t) * n), *pos = malloc(sizeof(int32_t) * 3 * n);
    int32_t (*grids)[3] = malloc(sizeof(int32_t[3]) * (size_t)n_img);
    for (int i = 0; i < n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(jids, (size_t)i));
    for (int i = 0; i < n_img; i++)
        for (int k = 0; k < 3; k++)
            grids[i][k] = (int32_t)json_integer_value(json_array_get(json_array_get(jg, (size_t)i), (size_t)k));
    const dg_mrope_params p = P;   /* the golden package has the real Qwen2 vocabulary */
    int next;
    char err[128];
    CHECK_EQ_INT(dg_mrope_index(ids, n, 0, &p, grids, n_img, pos, &next, err, sizeof err), 0);
    for (int r = 0; r < 3; r++)
        for (int i = 0; i < n; i++)
            CHECK_EQ_INT(pos[r * n + i], json_integer_value(json_array_get(json_array_get(jpos, (size_t)r), (size_t)i)));
    CHECK_EQ_INT(dg_mrope_delta(next, n), json_integer_value(json_object_get(pr, "rope_delta")));

    /* continued: the first image and the text after it cached, the rest appended at
     * n_past + delta of the first part */
    int split = 0;
    for (int i = 1; i < n && !split; i++)   /* two tokens after the end of the first run */
        if (ids[i - 1] == p.image_token_id && ids[i] != p.image_token_id) split = i + 2;
    int32_t *a = malloc(sizeof(int32_t) * 3 * split), *b = malloc(sizeof(int32_t) * 3 * (n - split));
    int next_a, next_b;
    CHECK_EQ_INT(dg_mrope_index(ids, split, 0, &p, grids, 1, a, &next_a, err, sizeof err), 0);
    const int first = split + dg_mrope_delta(next_a, split);
    CHECK_EQ_INT(dg_mrope_index(ids + split, n - split, first, &p, grids + 1, n_img - 1, b, &next_b,
                                err, sizeof err), 0);
    for (int r = 0; r < 3; r++) {
        for (int i = 0; i < split; i++) CHECK_EQ_INT(a[r * split + i], pos[r * n + i]);
        for (int i = split; i < n; i++) CHECK_EQ_INT(b[r * (n - split) + i - split], pos[r * n + i]);
    }
    CHECK_EQ_INT(next_b, next);
    free(a); free(b); free(ids); free(pos); free(grids);
    json_decref(g);
}

TEST(mismatched_images_are_refused) {
    int32_t ids[8] = {1, IMG, IMG, IMG, 2, IMG, IMG, 3}, pos[24];
    const int32_t one[1][3] = {{1, 2, 6}}, two[2][3] = {{1, 2, 6}, {1, 2, 4}}, bad[2][3] = {{1, 2, 6}, {1, 3, 4}};
    int next;
    char err[160];
    CHECK_EQ_INT(dg_mrope_index(ids, 8, 0, &P, one, 1, pos, &next, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "only 1 images") != NULL);
    CHECK_EQ_INT(dg_mrope_index(ids, 8, 0, &P, two, 2, pos, &next, err, sizeof err), 0);
    CHECK_EQ_INT(next, 1 + 3 + 1 + 2 + 1);
    CHECK_EQ_INT(dg_mrope_index(ids, 8, 0, &P, bad, 2, pos, &next, err, sizeof err), DG_EINVAL);
    ids[6] = 7;   /* second run one token short */
    CHECK_EQ_INT(dg_mrope_index(ids, 8, 0, &P, two, 2, pos, &next, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "needs 2 tokens") != NULL);
    CHECK_EQ_INT(dg_mrope_index(ids, 4, 0, &P, two, 2, pos, &next, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "2 images given, 1 found") != NULL);
}

int main(void) { return test_main(); }
