/* libFuzzer target for the image decoders: any bytes must give an image or a DG_E* error
 * with a message, never a crash, a leak or undefined behaviour. A decoded image also goes
 * through the hash, the Qwen2.5-VL preprocessing (small limits, so the resampler runs at
 * odd scales) and the PNG encoder. Whatever decodes has the size its header gave
 * dg_image_peek_size, or that size's sides swapped (an EXIF rotation). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io/image.h"
#include "io/image_preprocess.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    dg_image *img = NULL;
    char err[256];
    dg_image_limits lim = {.max_bytes = 1 << 20, .max_pixels = 1 << 20};
    int rc = dg_image_decode(data, size, "fuzz", &lim, &img, err, sizeof err);
    if (rc < 0) {
        if (img || strncmp(err, "fuzz: ", 6) != 0)
            abort();
        return 0;
    }
    int32_t pw = 0, ph = 0;
    if (dg_image_peek_size(data, size, &pw, &ph) < 0 ||
        !((img->width == pw && img->height == ph) || (img->width == ph && img->height == pw)))
        abort();
    dg_image_digest d;
    dg_image_hash(img, &d);
    dg_image_preprocess_config cfg;
    dg_image_preprocess_config_default(&cfg);
    cfg.max_pixels = 28 * 28 * 16;
    dg_image_patches *p = NULL;
    if (dg_image_patches_new(img, &cfg, &p, err, sizeof err) == 0)
        dg_image_patches_free(p);
    uint8_t *png = NULL;
    size_t png_len = 0;
    const dg_kv text[] = {{"duogen:job", "fuzz"}};
    if (dg_image_encode_png(img, text, 1, &png, &png_len, err, sizeof err) == 0)
        free(png);
    dg_image_free(img);
    return 0;
}
