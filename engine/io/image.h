/* image.h — decoded images: PNG/JPEG in, PNG out, and a content hash for the caches.
 *
 *     dg_image *img; char err[256];
 *     int rc = dg_image_decode(bytes, len, "image 2", &(dg_image_limits){0}, &img, err, sizeof err);
 *     if (rc < 0) fail_job(rc, err);          // "image 2: truncated PNG (...)", DG_EIMAGE / DG_ELIMIT
 *     dg_image_digest d; dg_image_hash(img, &d);
 *     ...
 *     dg_image_free(img);
 *
 * What the decoder returns is what the reference pipeline feeds the Qwen2.5-VL image
 * processor: PIL.Image.open(bytes) -> PIL.ImageOps.exif_transpose -> transformers'
 * convert_to_rgb (Pillow 13, transformers 5.24), as 8-bit RGB:
 *   - transparency (an alpha channel, a palette tRNS, a gray/RGB tRNS colour key) is
 *     composited on white with Pillow's alpha_composite integer rounding;
 *   - 16-bit PNG samples keep their high byte (Pillow's "RGB;16B" raw modes), except a
 *     16-bit grayscale image without alpha, which Pillow opens as "I;16" and converts to
 *     RGB by clipping the value to 255 (so 256..65535 become 255): kept here to match;
 *   - gray of 1, 2 or 4 bits is scaled to 0..255 (x255, x85, x17);
 *   - tRNS and eXIf are read as Pillow reads them, not as libpng would (which drops a tRNS
 *     longer than PLTE, before it, or with a key past the bit depth, and an eXIf that starts
 *     with "Exif\0\0"): a palette's alpha per entry, a key's low byte compared with the
 *     8-bit pixel, the last eXIf of the file; a tRNS too short for its key is refused;
 *   - CRCs are checked where Pillow checks them: a chunk before the image data with a wrong
 *     one refuses the file, the image data's and later chunks' are not looked at; an
 *     unknown critical chunk is skipped;
 *   - a palette index past the PLTE entries is black and opaque: the PNG spec makes it an
 *     error, but Pillow (as libpng and browsers) takes the file, and so the reference
 *     pipeline sees black there;
 *   - JPEG with libjpeg-turbo's accurate integer DCT and fancy upsampling (Pillow's
 *     defaults); CMYK/YCCK JPEG as Adobe-inverted CMYK converted the way Pillow does;
 *   - the EXIF orientation (JPEG APP1 Exif, PNG eXIf, PNG "Raw profile type exif" text,
 *     else an XMP tiff:Orientation) is applied, as transformers' load_image() does; stored
 *     as any numeric TIFF type (6, 6.0, 12/2 all rotate), the first of several values.
 *   - JPEG component sampling factors TurboJPEG 2.1 cannot name (Y 3x1, 4x2, 1x4, chroma
 *     finer than luma) and stray bytes before a header marker are read through libjpeg's
 *     own API, with the same settings.
 * Not matched: lossless JPEG (SOF3), which Pillow's newer bundled libjpeg-turbo decodes, is
 * refused (DG_EIMAGE) as a kind this decoder does not read.
 * Other ancillary data (gamma, ICC profiles) is ignored, as Pillow does.
 *
 * No function here logs or keeps state between calls; every one is safe to call from
 * several threads at once. */
#ifndef DG_IMAGE_H
#define DG_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "duogen.h"

/* An 8-bit RGB image. One allocation holds the struct and its pixels. */
typedef struct dg_image {
    int32_t  width, height;
    uint8_t *rgb;                    /* owned: [height][width][3], rows top to bottom */
} dg_image;

/* Limits checked before anything large is allocated; a zero field takes the default. */
typedef struct {
    size_t  max_bytes;               /* encoded size; default DG_IMAGE_DEFAULT_MAX_BYTES */
    int64_t max_pixels;              /* width * height; default DG_IMAGE_DEFAULT_MAX_PIXELS */
} dg_image_limits;

#define DG_IMAGE_DEFAULT_MAX_BYTES  ((size_t)64 << 20)
#define DG_IMAGE_DEFAULT_MAX_PIXELS ((int64_t)50000000)

/* A new image of width x height (both 1..65535), pixels zero. DG_EINVAL for a bad size,
 * DG_ENOMEM. */
int  dg_image_new(int32_t width, int32_t height, dg_image **out);
void dg_image_free(dg_image *img);   /* accepts NULL */

/* Decodes PNG or JPEG bytes (told apart by their signature) into *out.
 * label names the image in messages ("image 2"); NULL reads "image".
 * Returns 0, or DG_EIMAGE (not PNG/JPEG, corrupt, truncated), DG_ELIMIT (over a limit:
 * bytes, pixels), DG_ENOMEM, DG_EINVAL (NULL arguments); err then says which. */
int  dg_image_decode(const uint8_t *data, size_t len, const char *label,
                     const dg_image_limits *limits, dg_image **out, char *err, size_t errlen);

/* The stored size of PNG or JPEG bytes from their header alone (PNG IHDR, JPEG SOF), for a
 * caller that weighs a job's images before decoding any: 0 with *width and *height (before
 * an EXIF orientation, which may swap them), or DG_EIMAGE where the header does not tell
 * (not PNG/JPEG, cut short, a zero side), which dg_image_decode() then names. Checks no
 * limit and allocates nothing large. */
int  dg_image_peek_size(const uint8_t *data, size_t len, int32_t *width, int32_t *height);

/* Encodes img as an 8-bit RGB PNG, non-interlaced. Each text pair becomes a tEXt chunk
 * (an iTXt chunk when the value is not plain ASCII) in the order given; a key is 1..79
 * printable Latin-1 characters without leading, trailing or double spaces (PNG rule).
 * *png is malloc()ed and owned by the caller. DG_EINVAL (bad key, bad image), DG_ENOMEM. */
int  dg_image_encode_png(const dg_image *img, const dg_kv *text, size_t n_text,
                         uint8_t **png, size_t *png_len, char *err, size_t errlen);

/* Content hash for the vision and latent caches: the first 128 bits of
 * SHA-256(width as u32 LE || height as u32 LE || rgb), so the same picture gives the same
 * key whatever file it came in (PNG, JPEG, or generated). */
typedef struct {
    uint8_t bytes[16];
} dg_image_digest;

void dg_image_hash(const dg_image *img, dg_image_digest *out);

#endif
