/* Qwen2.5-VL preprocessing against the reference (tests/golden/image/manifest.txt, made by
 * tools/reference/make_image_goldens.py with Pillow 13 and transformers 5.24's
 * Qwen2VLImageProcessorPil): smart_resize vectors from the spec, Pillow bicubic resizes and
 * pixel_values compared bit for bit (digests) and value by value (stored .f32 files, tolerance
 * 1e-6 as asked; the expected difference is 0 because every step is exact). */
#include "common/harness.h"
#include "common/package.h"
#include "io/image.h"
#include "io/image_preprocess.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN "tests/golden/image"

static uint8_t *read_file(const char *name, size_t *len) { return test_read_file(GOLDEN, name, len); }

static dg_image *decode_golden(const char *name) {
    size_t len;
    uint8_t *data = read_file(name, &len);
    dg_image *img = NULL;
    char err[256];
    if (!data || dg_image_decode(data, len, name, NULL, &img, err, sizeof err) < 0)
        test_fail(__FILE__, __LINE__, "cannot decode %s: %s", name, data ? err : "missing file");
    free(data);
    return img;
}

static void hex(const dg_image_digest *d, char out[33]) {
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", d->bytes[i]);
}

TEST(smart_resize_spec_vectors) {
    static const struct { int h, w; long long max; int eh, ew; } v[] = {
        {561, 278, 12845056, 560, 280},   {70, 70, 12845056, 56, 56},  /* 2.5 rounds to 2 */
        {480, 640, 12845056, 476, 644},   {1080, 1920, 12845056, 1092, 1932},
        {1024, 1024, 12845056, 1036, 1036}, {4000, 3000, 12845056, 4004, 2996},
        {5000, 5000, 12845056, 3556, 3556}, {1024, 1024, 1003520, 980, 980},
        {10, 10, 12845056, 56, 56},       {3, 600, 12845056, 28, 812},
    };
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
        int32_t h = 0, w = 0;
        char err[128];
        CHECK_EQ_INT(dg_image_smart_resize(v[i].h, v[i].w, 28, 3136, v[i].max, &h, &w, err, sizeof err), 0);
        CHECK_EQ_INT(h, v[i].eh);
        CHECK_EQ_INT(w, v[i].ew);
    }
}

TEST(smart_resize_refuses_extreme_aspect) {
    int32_t h, w;
    char err[128] = "";
    CHECK_EQ_INT(dg_image_smart_resize(2, 401, 28, 3136, 12845056, &h, &w, err, sizeof err), DG_EIMAGE);
    CHECK(strstr(err, "aspect") != NULL);
    CHECK_EQ_INT(dg_image_smart_resize(2, 400, 28, 3136, 12845056, &h, &w, err, sizeof err), 0);
    CHECK_EQ_INT(dg_image_smart_resize(0, 400, 28, 3136, 12845056, &h, &w, err, sizeof err), DG_EINVAL);
}

TEST(grid_and_token_count) {
    dg_image_preprocess_config c;
    dg_image_preprocess_config_default(&c);
    int32_t g[3];
    char err[128];
    CHECK_EQ_INT(dg_image_grid(448, 448, &c, g, err, sizeof err), 0);
    CHECK_EQ_INT(g[0], 1);
    CHECK_EQ_INT(g[1], 32);
    CHECK_EQ_INT(g[2], 32);
    CHECK_EQ_INT(g[0] * g[1] * g[2] / 4, 256);           /* spec §5.5: 448x448 -> 256 tokens */
}

/* Pillow's resize, bit for bit, at three sizes per golden image (down, up, extreme). */
TEST(resize_matches_pillow) {
    size_t len;
    char *man = (char *)read_file("manifest.txt", &len);
    CHECK(man != NULL);
    if (!man)
        return;
    man = realloc(man, len + 1);
    man[len] = 0;
    int n = 0;
    for (char *line = strtok(man, "\n"); line; line = strtok(NULL, "\n")) {
        char name[128], want[33], got[33];
        int w, h;
        if (sscanf(line, "resize %127s %d %d %32s", name, &w, &h, want) != 4)
            continue;
        dg_image *img = decode_golden(name), *out = NULL;
        if (!img)
            continue;
        CHECK_EQ_INT(dg_image_resize(img, w, h, &out), 0);
        if (out) {
            dg_image_digest d;
            dg_image_hash(out, &d);
            hex(&d, got);
            if (strcmp(got, want) != 0)
                test_fail(__FILE__, __LINE__, "%s resized to %dx%d differs from Pillow", name, w, h);
        }
        dg_image_free(out);
        dg_image_free(img);
        n++;
    }
    CHECK(n >= 60);
    free(man);
}

/* pixel_values of the slow HF processor: grid exactly, every value within 1e-6 (stored
 * files) and the whole array bit for bit (digest), default settings included. */
TEST(pixel_values_match_reference) {
    size_t len;
    char *man = (char *)read_file("manifest.txt", &len);
    CHECK(man != NULL);
    if (!man)
        return;
    man = realloc(man, len + 1);
    man[len] = 0;
    int n = 0, n_default = 0;
    double max_diff = 0;
    for (char *line = strtok(man, "\n"); line; line = strtok(NULL, "\n")) {
        char name[128], want[33], got[33], bin[160];
        long long mn, mx;
        int gt, gh, gw;
        if (sscanf(line, "patches %127s %lld %lld %d %d %d %32s %159s", name, &mn, &mx, &gt, &gh,
                   &gw, want, bin) != 8)
            continue;
        dg_image *img = decode_golden(name);
        if (!img)
            continue;
        dg_image_preprocess_config c;
        dg_image_preprocess_config_default(&c);
        c.min_pixels = mn;
        c.max_pixels = mx;
        n_default += mx == 12845056;
        dg_image_patches *p = NULL;
        char err[256];
        int rc = dg_image_patches_new(img, &c, &p, err, sizeof err);
        CHECK_EQ_INT(rc, 0);
        if (rc == 0) {
            CHECK_EQ_INT(p->grid_t, gt);
            CHECK_EQ_INT(p->grid_h, gh);
            CHECK_EQ_INT(p->grid_w, gw);
            CHECK_EQ_INT(p->patch_dim, 1176);
            int32_t rows = p->grid_t * p->grid_h * p->grid_w;
            dg_image view = {.width = 1568, .height = rows, .rgb = (uint8_t *)p->pixel_values};
            dg_image_digest d;
            dg_image_hash(&view, &d);
            hex(&d, got);
            if (strcmp(got, want) != 0)
                test_fail(__FILE__, __LINE__, "%s (max_pixels %lld): pixel_values differ", name, mx);
            size_t blen;
            float *ref = strcmp(bin, "-") ? (float *)read_file(bin, &blen) : NULL;
            if (ref) {
                CHECK_EQ_INT(blen, (size_t)rows * 588 * sizeof(float));
                for (int32_t r = 0; r < rows && blen == (size_t)rows * 588 * sizeof(float); r++)
                    for (int ch = 0; ch < 3; ch++)
                        for (int t = 0; t < 2; t++)
                            for (int i = 0; i < 196; i++) {
                                double a = p->pixel_values[(size_t)r * 1176 + (ch * 2 + t) * 196 + i];
                                double b = ref[(size_t)r * 588 + ch * 196 + i];
                                if (fabs(a - b) > max_diff)
                                    max_diff = fabs(a - b);
                            }
                free(ref);
            }
        }
        dg_image_patches_free(p);
        dg_image_free(img);
        n++;
    }
    printf("  pixel_values: %d reference arrays (%d at default settings), max |diff| %.3g\n",
           n, n_default, max_diff);
    CHECK(n >= 12);
    CHECK(n_default >= 1);
    CHECK(max_diff <= 1e-6);
    free(man);
}

/* The layout of spec §4.1 written out directly: no resize happens for a 56x84 image. */
TEST(patch_order_matches_spec_formula) {
    dg_image *img;
    CHECK_EQ_INT(dg_image_new(84, 56, &img), 0);
    for (int y = 0; y < 56; y++)
        for (int x = 0; x < 84; x++)
            for (int c = 0; c < 3; c++)
                img->rgb[(y * 84 + x) * 3 + c] = (uint8_t)((y * 7 + x * 3 + c * 50) % 256);
    dg_image_preprocess_config cfg;
    dg_image_preprocess_config_default(&cfg);
    dg_image_patches *p;
    char err[128];
    CHECK_EQ_INT(dg_image_patches_new(img, &cfg, &p, err, sizeof err), 0);
    CHECK_EQ_INT(p->grid_h, 4);
    CHECK_EQ_INT(p->grid_w, 6);
    int gw = 6, bad = 0;
    for (int bh = 0; bh < 2; bh++)
        for (int bw = 0; bw < 3; bw++)
            for (int mh = 0; mh < 2; mh++)
                for (int mw = 0; mw < 2; mw++)
                    for (int c = 0; c < 3; c++)
                        for (int tt = 0; tt < 2; tt++)
                            for (int py = 0; py < 14; py++)
                                for (int px = 0; px < 14; px++) {
                                    int n = ((bh * (gw / 2) + bw) * 2 + mh) * 2 + mw;
                                    int k = ((c * 2 + tt) * 14 + py) * 14 + px;
                                    int y = (2 * bh + mh) * 14 + py, x = (2 * bw + mw) * 14 + px;
                                    float u = (float)((double)img->rgb[(y * 84 + x) * 3 + c] * (1.0 / 255));
                                    float want = (u - (float)cfg.image_mean[c]) / (float)cfg.image_std[c];
                                    bad += p->pixel_values[(size_t)n * 1176 + k] != want;
                                }
    CHECK_EQ_INT(bad, 0);
    dg_image_patches_free(p);
    dg_image_free(img);
}

TEST(resize_same_size_is_a_copy) {
    dg_image *img, *out = NULL;
    CHECK_EQ_INT(dg_image_new(5, 3, &img), 0);
    for (int i = 0; i < 45; i++)
        img->rgb[i] = (uint8_t)(i * 37);
    CHECK_EQ_INT(dg_image_resize(img, 5, 3, &out), 0);
    CHECK(out && memcmp(out->rgb, img->rgb, 45) == 0);
    CHECK_EQ_INT(dg_image_resize(img, 0, 3, &out), DG_EINVAL);
    dg_image_free(out);
    dg_image_free(img);
}

int main(void) { return test_main(); }
