/* image_preprocess.c — smart_resize, Pillow's bicubic resampling, rescale/normalize and
 * patch ordering of the Qwen2.5-VL image processor (see image_preprocess.h). The float
 * expressions keep the reference's operation order on purpose: the results are compared
 * bit for bit (tests/test_image_preprocess.c). */
#include "io/image_preprocess.h"

#include <fenv.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* No fused multiply-add: the reference rounds every product. Clang contracts by default
 * on an FMA target; GCC does not under -std=c11 (and does not know this pragma). */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

static int prep_fail(char *err, size_t errlen, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int prep_fail(char *err, size_t errlen, int code, const char *fmt, ...) {
    if (err && errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return code;
}

void dg_image_preprocess_config_default(dg_image_preprocess_config *c) {
    *c = (dg_image_preprocess_config){
        .min_pixels = 3136,
        .max_pixels = 12845056,
        .patch_size = 14,
        .temporal_patch_size = 2,
        .merge_size = 2,
        .rescale_factor = 1.0 / 255.0,
        .image_mean = {0.48145466, 0.4578275, 0.40821073},
        .image_std = {0.26862954, 0.26130258, 0.27577711},
    };
}

/* ---- smart_resize ------------------------------------------------------------------------ */

/* Python round() on a double: half to even (nearbyint under the default rounding mode). */
static double py_round(double x) {
    int mode = fegetround();
    fesetround(FE_TONEAREST);
    double r = nearbyint(x);
    fesetround(mode);
    return r;
}

int dg_image_smart_resize(int32_t height, int32_t width, int32_t factor,
                          int64_t min_pixels, int64_t max_pixels,
                          int32_t *out_height, int32_t *out_width, char *err, size_t errlen) {
    if (height < 1 || width < 1 || factor < 1 || min_pixels < 0 || max_pixels < 1)
        return prep_fail(err, errlen, DG_EINVAL, "smart_resize: bad size %dx%d or factor %d",
                         width, height, factor);
    double hi = height > width ? height : width, lo = height > width ? width : height;
    if (hi / lo > 200)
        return prep_fail(err, errlen, DG_EIMAGE,
                         "aspect ratio of %dx%d is over 200 (the Qwen2.5-VL processor refuses it)",
                         width, height);
    double h = height, w = width, f = factor;
    int64_t h_bar = (int64_t)py_round(h / f) * factor;
    int64_t w_bar = (int64_t)py_round(w / f) * factor;
    double area = (double)((int64_t)height * width);
    if (h_bar * w_bar > max_pixels) {
        double beta = sqrt(area / (double)max_pixels);
        h_bar = (int64_t)floor(h / beta / f) * factor;
        w_bar = (int64_t)floor(w / beta / f) * factor;
        if (h_bar < factor)
            h_bar = factor;
        if (w_bar < factor)
            w_bar = factor;
    } else if (h_bar * w_bar < min_pixels) {
        double beta = sqrt((double)min_pixels / area);
        h_bar = (int64_t)ceil(h * beta / f) * factor;
        w_bar = (int64_t)ceil(w * beta / f) * factor;
    }
    if (h_bar < 1 || w_bar < 1 || h_bar > 65535 || w_bar > 65535)
        return prep_fail(err, errlen, DG_EINVAL, "smart_resize: %dx%d gives %lldx%lld",
                         width, height, (long long)w_bar, (long long)h_bar);
    *out_height = (int32_t)h_bar;
    *out_width = (int32_t)w_bar;
    return DG_OK;
}

static int config_check(const dg_image_preprocess_config *c, char *err, size_t errlen) {
    if (!c || c->patch_size < 1 || c->merge_size < 1 || c->temporal_patch_size < 1 ||
        c->patch_size > 1024 || c->merge_size > 64 || c->temporal_patch_size > 64)
        return prep_fail(err, errlen, DG_EINVAL, "bad image preprocessing config");
    for (int i = 0; i < 3; i++)
        if (!(c->image_std[i] != 0))
            return prep_fail(err, errlen, DG_EINVAL, "image_std[%d] is zero", i);
    return DG_OK;
}

int dg_image_grid(int32_t height, int32_t width, const dg_image_preprocess_config *c,
                  int32_t grid[3], char *err, size_t errlen) {
    int rc = config_check(c, err, errlen);
    if (rc < 0)
        return rc;
    int32_t h, w;
    rc = dg_image_smart_resize(height, width, c->patch_size * c->merge_size, c->min_pixels,
                               c->max_pixels, &h, &w, err, errlen);
    if (rc < 0)
        return rc;
    grid[0] = 1;
    grid[1] = h / c->patch_size;
    grid[2] = w / c->patch_size;
    return DG_OK;
}

/* ---- Pillow's bicubic resampling --------------------------------------------------------- */

#define RESAMPLE_BITS 22             /* Pillow's PRECISION_BITS: 32 - 8 - 2 */

/* Pillow's bicubic_filter, a = -0.5 (same expression, so the same doubles). */
static double bicubic(double x) {
    const double a = -0.5;
    if (x < 0.0)
        x = -x;
    if (x < 1.0)
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0)
        return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

/* The taps of one axis: output o reads inputs [first[o], first[o] + count[o]) with
 * weights k[o * ksize + i] (fixed point, RESAMPLE_BITS fractional bits). */
struct taps {
    int      ksize;
    int     *first, *count;          /* owned: [out_size] each */
    int32_t *k;                      /* owned: [out_size, ksize] */
};

/* Frees and empties t: taps_compute's failure path frees what it got, and the caller's
 * cleanup frees the same taps again. */
static void taps_free(struct taps *t) {
    free(t->first);
    free(t->count);
    free(t->k);
    *t = (struct taps){0};
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc for in_size -> out_size over the
 * whole axis. Returns 0 or DG_ENOMEM. */
static int taps_compute(int in_size, int out_size, struct taps *t) {
    double scale = (double)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    double *w = malloc(sizeof *w * (size_t)ksize);
    *t = (struct taps){.ksize = ksize};
    t->first = malloc(sizeof *t->first * (size_t)out_size);
    t->count = malloc(sizeof *t->count * (size_t)out_size);
    t->k = calloc((size_t)out_size * ksize, sizeof *t->k);
    if (!w || !t->first || !t->count || !t->k) {
        free(w);
        taps_free(t);
        return DG_ENOMEM;
    }
    for (int o = 0; o < out_size; o++) {
        double center = (o + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0)
            xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size)
            xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            w[x] = bicubic((x + xmin - center + 0.5) * ss);
            ww += w[x];
        }
        for (int x = 0; x < xmax; x++) {
            if (ww != 0.0)
                w[x] /= ww;
            double q = w[x] * (1 << RESAMPLE_BITS);
            t->k[(size_t)o * ksize + x] = (int32_t)(w[x] < 0 ? -0.5 + q : 0.5 + q);
        }
        t->first[o] = xmin;
        t->count[o] = xmax;
    }
    free(w);
    return DG_OK;
}

/* Pillow's clip8: the accumulator (with its 1 << 21 rounding bias) to 0..255. */
static inline uint8_t clip8(int32_t acc) {
    if (acc < 0)
        return 0;
    int32_t v = acc >> RESAMPLE_BITS;
    return (uint8_t)(v > 255 ? 255 : v);
}

/* One horizontal pass: rows of src ([rows][sw][3]) to rows of dst ([rows][dw][3]). */
static void pass_horizontal(const uint8_t *src, int sw, uint8_t *dst, int dw, int rows,
                            const struct taps *t) {
    for (int y = 0; y < rows; y++) {
        const uint8_t *srow = src + (size_t)y * sw * 3;
        uint8_t *drow = dst + (size_t)y * dw * 3;
        for (int x = 0; x < dw; x++) {
            const int32_t *k = t->k + (size_t)x * t->ksize;
            const uint8_t *s = srow + (size_t)t->first[x] * 3;
            int32_t a0 = 1 << (RESAMPLE_BITS - 1), a1 = a0, a2 = a0;
            for (int i = 0; i < t->count[x]; i++) {
                a0 += s[3 * i + 0] * k[i];
                a1 += s[3 * i + 1] * k[i];
                a2 += s[3 * i + 2] * k[i];
            }
            drow[3 * x + 0] = clip8(a0);
            drow[3 * x + 1] = clip8(a1);
            drow[3 * x + 2] = clip8(a2);
        }
    }
}

/* One vertical pass: src holds input rows row0.. ([..][w][3]); dst is [dh][w][3]. */
static void pass_vertical(const uint8_t *src, int w, int row0, uint8_t *dst, int dh,
                          const struct taps *t) {
    for (int y = 0; y < dh; y++) {
        const int32_t *k = t->k + (size_t)y * t->ksize;
        const uint8_t *s0 = src + (size_t)(t->first[y] - row0) * w * 3;
        uint8_t *drow = dst + (size_t)y * w * 3;
        for (int x = 0; x < w; x++) {
            int32_t a0 = 1 << (RESAMPLE_BITS - 1), a1 = a0, a2 = a0;
            for (int i = 0; i < t->count[y]; i++) {
                const uint8_t *s = s0 + ((size_t)i * w + x) * 3;
                a0 += s[0] * k[i];
                a1 += s[1] * k[i];
                a2 += s[2] * k[i];
            }
            drow[3 * x + 0] = clip8(a0);
            drow[3 * x + 1] = clip8(a1);
            drow[3 * x + 2] = clip8(a2);
        }
    }
}

int dg_image_resize(const dg_image *in, int32_t width, int32_t height, dg_image **out) {
    if (!in || !out || width < 1 || height < 1)
        return DG_EINVAL;
    dg_image *tmp = NULL, *dst = NULL;
    struct taps th = {0}, tv = {0};
    int rc;
    int in_w = in->width, in_h = in->height;
    int need_h = width != in_w, need_v = height != in_h;
    if ((rc = dg_image_new(width, height, &dst)) < 0)
        goto done;
    if ((need_h && (rc = taps_compute(in_w, width, &th)) < 0) ||
        (need_v && (rc = taps_compute(in_h, height, &tv)) < 0))
        goto done;

    if (!need_h && !need_v) {
        memcpy(dst->rgb, in->rgb, (size_t)width * height * 3);
    } else if (!need_v) {
        pass_horizontal(in->rgb, in_w, dst->rgb, width, in_h, &th);
    } else if (!need_h) {
        pass_vertical(in->rgb, in_w, 0, dst->rgb, height, &tv);
    } else if (in_h - height > 0 && in_h - height > 2 * (in_w - width)) {
        /* Pillow 13 runs the vertical pass first (over every column) when the height
         * shrinks by more than twice as many pixels as the width; older Pillow always
         * went horizontal first. The order changes the 8-bit rounding in between, so it
         * is matched exactly (checked on 248 random size pairs and the goldens). */
        if ((rc = dg_image_new(in_w, height, &tmp)) < 0)
            goto done;
        pass_vertical(in->rgb, in_w, 0, tmp->rgb, height, &tv);
        pass_horizontal(tmp->rgb, in_w, dst->rgb, width, height, &th);
    } else {
        /* horizontal first, over only the input rows the vertical pass reads */
        int row0 = tv.first[0], row_end = tv.first[height - 1] + tv.count[height - 1];
        if ((rc = dg_image_new(width, row_end - row0, &tmp)) < 0)
            goto done;
        pass_horizontal(in->rgb + (size_t)row0 * in_w * 3, in_w, tmp->rgb, width, row_end - row0, &th);
        pass_vertical(tmp->rgb, width, row0, dst->rgb, height, &tv);
    }
    *out = dst;
    dst = NULL;
    rc = DG_OK;
done:
    dg_image_free(tmp);
    dg_image_free(dst);
    taps_free(&th);
    taps_free(&tv);
    return rc;
}

/* ---- rescale, normalize, patchify -------------------------------------------------------- */

int dg_image_patches_new(const dg_image *img, const dg_image_preprocess_config *c,
                         dg_image_patches **out, char *err, size_t errlen) {
    if (!img || !out)
        return prep_fail(err, errlen, DG_EINVAL, "no image");
    int rc = config_check(c, err, errlen);
    if (rc < 0)
        return rc;
    int32_t p = c->patch_size, m = c->merge_size, tp = c->temporal_patch_size;
    int32_t rh, rw;
    rc = dg_image_smart_resize(img->height, img->width, p * m, c->min_pixels, c->max_pixels,
                               &rh, &rw, err, errlen);
    if (rc < 0)
        return rc;
    dg_image *resized = NULL;
    if ((rc = dg_image_resize(img, rw, rh, &resized)) < 0)
        return prep_fail(err, errlen, rc, "out of memory resizing %dx%d to %dx%d",
                         img->width, img->height, rw, rh);

    /* HF rescale: float64 u8 * rescale_factor, cast to float32; normalize in float32 */
    float lut[3][256];
    for (int ch = 0; ch < 3; ch++) {
        float mean = (float)c->image_mean[ch], std = (float)c->image_std[ch];
        for (int v = 0; v < 256; v++) {
            float x = (float)((double)v * c->rescale_factor);
            lut[ch][v] = (x - mean) / std;
        }
    }

    int32_t gh = rh / p, gw = rw / p;
    int32_t dim = 3 * tp * p * p;
    size_t rows = (size_t)gh * gw;
    dg_image_patches *pt = malloc(sizeof *pt + rows * dim * sizeof(float));
    if (!pt) {
        dg_image_free(resized);
        return prep_fail(err, errlen, DG_ENOMEM, "out of memory for %zu patches", rows);
    }
    *pt = (dg_image_patches){.grid_t = 1, .grid_h = gh, .grid_w = gw, .patch_dim = dim,
                             .pixel_values = (float *)(pt + 1)};
    float *row = pt->pixel_values;
    for (int32_t bh = 0; bh < gh / m; bh++)
        for (int32_t bw = 0; bw < gw / m; bw++)
            for (int32_t mh = 0; mh < m; mh++)
                for (int32_t mw = 0; mw < m; mw++, row += dim) {
                    int32_t y0 = (bh * m + mh) * p, x0 = (bw * m + mw) * p;
                    float *col = row;
                    for (int ch = 0; ch < 3; ch++)
                        for (int32_t t = 0; t < tp; t++)   /* the still frame, repeated */
                            for (int32_t py = 0; py < p; py++) {
                                const uint8_t *s = resized->rgb + ((size_t)(y0 + py) * rw + x0) * 3 + ch;
                                for (int32_t px = 0; px < p; px++)
                                    *col++ = lut[ch][s[3 * px]];
                            }
                }
    dg_image_free(resized);
    *out = pt;
    return DG_OK;
}

void dg_image_patches_free(dg_image_patches *p) {
    free(p);
}
