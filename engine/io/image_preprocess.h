/* image_preprocess.h — Qwen2.5-VL image preprocessing: a decoded RGB image to the vision
 * tower's pixel_values, equal to transformers' slow Pillow processor
 * (Qwen2VLImageProcessorPil, transformers 5.24 with Pillow 13; docs/specs/qwen2_5_vl.md §4.1, §5):
 *
 *   smart_resize -> Pillow BICUBIC resize (8-bit, two passes) -> (f32)(u8 * (1/255.0))
 *   -> (x - mean_f32) / std_f32 in float32 -> patches of 2x14x14 per channel, 2x2 merge
 *   groups in raster order, the still frame repeated for the temporal patch.
 *
 *     dg_image_preprocess_config cfg;
 *     dg_image_preprocess_config_default(&cfg);          // or values from preprocessor_config.json
 *     dg_image_patches *p;
 *     if (dg_image_patches_new(img, &cfg, &p, err, sizeof err) < 0) fail(...);
 *     // p->pixel_values: [p->grid_t * p->grid_h * p->grid_w, p->patch_dim] float32
 *     // tokens for the LLM: p->grid_t * p->grid_h * p->grid_w / (merge_size * merge_size)
 *     dg_image_patches_free(p);
 *
 * Nothing here keeps state between calls; thread-safe. */
#ifndef DG_IMAGE_PREPROCESS_H
#define DG_IMAGE_PREPROCESS_H

#include <stddef.h>
#include <stdint.h>

#include "io/image.h"

/* The fields of preprocessor_config.json that change the result. */
typedef struct {
    int64_t min_pixels;              /* "min_pixels" (size.shortest_edge) */
    int64_t max_pixels;              /* "max_pixels" (size.longest_edge) */
    int32_t patch_size;              /* 14 */
    int32_t temporal_patch_size;     /* 2 */
    int32_t merge_size;              /* 2 */
    double  rescale_factor;          /* 1/255 */
    double  image_mean[3];           /* used as float32, as numpy does */
    double  image_std[3];
} dg_image_preprocess_config;

/* Qwen2.5-VL-3B/7B-Instruct's preprocessor_config.json: min 3136, max 12845056 pixels,
 * patch 14, temporal 2, merge 2, 1/255, OPENAI_CLIP mean and std. (Not the class defaults:
 * those have max_pixels 1003520.) */
void dg_image_preprocess_config_default(dg_image_preprocess_config *c);

/* transformers' smart_resize: the size (multiples of factor, aspect ratio kept, pixels
 * within [min_pixels, max_pixels]) an image of height x width is resized to. Python
 * round() is half-to-even; as in transformers 5.24 a side under factor is not an error
 * (older versions refused < 28) and the shrink branch keeps each side >= factor. DG_EIMAGE when the aspect ratio is over 200 (the reference
 * raises), DG_EINVAL for sizes < 1 or a result of zero. */
int  dg_image_smart_resize(int32_t height, int32_t width, int32_t factor,
                           int64_t min_pixels, int64_t max_pixels,
                           int32_t *out_height, int32_t *out_width, char *err, size_t errlen);

/* The patch grid (t, h, w) an image of height x width gets: t = 1, h and w in patches
 * (each a multiple of merge_size). Same errors as dg_image_smart_resize(). */
int  dg_image_grid(int32_t height, int32_t width, const dg_image_preprocess_config *c,
                   int32_t grid[3], char *err, size_t errlen);

/* Pillow's Image.resize((width, height), BICUBIC) of an RGB image, bit for bit: separable
 * (horizontal pass into an 8-bit image of the rows needed, then vertical), the a = -0.5
 * cubic with its support widened by the scale when shrinking, coefficients normalised to
 * sum 1 and quantised to 22 fractional bits, each pass rounded and clamped to 8 bits.
 * A pass whose size does not change is skipped; the vertical pass goes first when the
 * height shrinks by more than twice as many pixels as the width (Pillow 13's order).
 * DG_EINVAL, DG_ENOMEM. */
int  dg_image_resize(const dg_image *in, int32_t width, int32_t height, dg_image **out);

typedef struct {
    int32_t grid_t, grid_h, grid_w;  /* image_grid_thw */
    int32_t patch_dim;               /* 3 * temporal_patch_size * patch_size^2 = 1176 */
    float  *pixel_values;            /* owned (same allocation): [grid_t*grid_h*grid_w, patch_dim];
                                        row ((bh*(gw/m) + bw)*m + mh)*m + mw,
                                        column ((c*T + t)*p + py)*p + px */
} dg_image_patches;

/* The whole preprocessing of one image. err names nothing (the caller knows the image);
 * DG_EIMAGE (aspect ratio), DG_EINVAL (bad config), DG_ENOMEM. */
int  dg_image_patches_new(const dg_image *img, const dg_image_preprocess_config *c,
                          dg_image_patches **out, char *err, size_t errlen);
void dg_image_patches_free(dg_image_patches *p);   /* accepts NULL */

#endif
