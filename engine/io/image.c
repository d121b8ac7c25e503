/* image.c — PNG (libpng) and JPEG (TurboJPEG) decoding to 8-bit RGB the way the reference
 * Python pipeline sees an image (see image.h for the rules and their sources), PNG encoding
 * with text chunks, and the content hash (io/sha256.c). */
#include "io/image.h"
#include "io/sha256.h"

#include <limits.h>
#include <png.h>
#include <zlib.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <turbojpeg.h>
#include <jpeglib.h>
#include <jerror.h>

/* ---- errors ----------------------------------------------------------------------------- */

/* Writes "label: message" into err and returns code. */
static int image_fail(char *err, size_t errlen, int code, const char *label, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

static int image_fail(char *err, size_t errlen, int code, const char *label, const char *fmt, ...) {
    if (err && errlen > 0) {
        int n = snprintf(err, errlen, "%s: ", label ? label : "image");
        if (n >= 0 && (size_t)n < errlen) {
            va_list ap;
            va_start(ap, fmt);
            vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
            va_end(ap);
        }
    }
    return code;
}

/* ---- the image object ------------------------------------------------------------------- */

int dg_image_new(int32_t width, int32_t height, dg_image **out) {
    if (!out || width < 1 || height < 1 || width > 65535 || height > 65535)
        return DG_EINVAL;
    size_t bytes = (size_t)width * (size_t)height * 3;
    dg_image *img = calloc(1, sizeof *img + bytes);
    if (!img)
        return DG_ENOMEM;
    img->width = width;
    img->height = height;
    img->rgb = (uint8_t *)(img + 1);
    *out = img;
    return DG_OK;
}

void dg_image_free(dg_image *img) {
    free(img);
}

/* ---- pixel rules shared by the decoders ------------------------------------------------- */

/* Pillow's alpha_composite of (c, a) over opaque white, channel by channel: with the
 * destination opaque its coefficients reduce exactly to a*128 and (255-a)*128 (7 bits of
 * extra precision), then SHIFTFORDIV255 rounding. Checked against Pillow for all 65536
 * (c, a) pairs. a == 0 copies the destination (white). */
static inline uint8_t composite_white(unsigned c, unsigned a) {
    if (a == 0)
        return 255;
    unsigned t = c * a * 128 + 255 * (255 - a) * 128 + (0x80 << 7);
    return (uint8_t)((((t >> 8) + t) >> 8) >> 7);
}

/* Pillow's CMYK -> RGB on Adobe-inverted CMYK samples (JpegImagePlugin reads CMYK as
 * "CMYK;I"): c' = 255 - c, nk = 255 - k' = k, out = clip(nk - muldiv255(c', nk)). */
static inline uint8_t cmyk_channel(unsigned c, unsigned k) {
    unsigned t = (255 - c) * k + 128;
    unsigned m = ((t >> 8) + t) >> 8;
    return (uint8_t)(m > k ? 0 : k - m);
}

/* EXIF orientation 2..8 applied to an RGB buffer, as PIL.ImageOps.exif_transpose does
 * (2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
 * 8 rotate 90 counter-clockwise). Replaces *img; returns 0 or DG_ENOMEM. */
static int image_orient(dg_image **img, int orientation) {
    dg_image *src = *img, *dst = NULL;
    int32_t w = src->width, h = src->height;
    int swap = orientation >= 5;
    int rc = dg_image_new(swap ? h : w, swap ? w : h, &dst);
    if (rc < 0)
        return rc;
    int32_t ow = dst->width, oh = dst->height;
    for (int32_t y = 0; y < oh; y++) {
        for (int32_t x = 0; x < ow; x++) {
            int32_t sx, sy;
            switch (orientation) {
            case 2:  sx = w - 1 - x; sy = y;         break;
            case 3:  sx = w - 1 - x; sy = h - 1 - y; break;
            case 4:  sx = x;         sy = h - 1 - y; break;
            case 5:  sx = y;         sy = x;         break;
            case 6:  sx = y;         sy = h - 1 - x; break;
            case 7:  sx = w - 1 - y; sy = h - 1 - x; break;
            default: sx = w - 1 - y; sy = x;         break;   /* 8 */
            }
            memcpy(dst->rgb + ((size_t)y * ow + x) * 3, src->rgb + ((size_t)sy * w + sx) * 3, 3);
        }
    }
    dg_image_free(src);
    *img = dst;
    return DG_OK;
}

/* ---- EXIF / XMP orientation -------------------------------------------------------------- */

static unsigned rd16(const uint8_t *p, int big) {
    return big ? (unsigned)p[0] << 8 | p[1] : (unsigned)p[1] << 8 | p[0];
}

static uint32_t rd32(const uint8_t *p, int big) {
    return big ? (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]
               : (uint32_t)p[3] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[1] << 8 | p[0];
}

/* The Orientation tag (0x0112) of IFD0 of an EXIF blob (a TIFF file, after any "Exif\0\0"
 * prefixes, as PIL.Image.Exif.load strips them): its first value, of any numeric type,
 * when that is a whole number of 1..8; 0 when the tag is there but not such a number, or
 * the blob is unreadable (where Pillow would raise, the image is taken as it is); -1 when
 * IFD0 has no such tag, or its values lie past the blob (only then does Pillow read
 * XMP's). */
static int exif_orientation(const uint8_t *p, size_t n) {
    while (n >= 6 && memcmp(p, "Exif\0\0", 6) == 0) {
        p += 6;
        n -= 6;
    }
    if (n == 0)
        return -1;   /* nothing after the prefix: Pillow loads no tags */
    if (n < 8)
        return 0;
    int big;
    if (memcmp(p, "II*\0", 4) == 0)
        big = 0;
    else if (memcmp(p, "MM\0*", 4) == 0)
        big = 1;
    else
        return 0;
    uint32_t ifd = rd32(p + 4, big);
    if (ifd > n - 2)
        return 0;
    unsigned count = rd16(p + ifd, big);
    for (unsigned i = 0; i < count; i++) {
        size_t e = (size_t)ifd + 2 + (size_t)i * 12;
        if (e + 12 > n)
            return 0;
        if (rd16(p + e, big) != 0x0112)
            continue;
        /* Pillow reads every numeric type, and of a tag declared one value long takes the
         * first of several; exif_transpose looks the value up in a dict of 2..8, so 6.0
         * and 6/1 rotate as 6 does. Other types (BYTE, ASCII, UNDEFINED) do not rotate. */
        static const uint8_t size[13] = {0, 1, 1, 2, 4, 8, 1, 1, 2, 4, 8, 4, 8};
        unsigned type = rd16(p + e + 2, big);
        uint32_t cnt = rd32(p + e + 4, big);
        if (type > 12 || cnt == 0)
            return 0;
        size_t at = e + 8;
        if ((uint64_t)cnt * size[type] > 4) {   /* the values elsewhere: cut short, Pillow skips the tag */
            at = rd32(p + e + 8, big);
            if (at > n || (uint64_t)cnt * size[type] > n - at)
                return -1;
        }
        const uint8_t *v = p + at;
        double x;
        switch (type) {
        case 3: x = rd16(v, big); break;
        case 8: x = (int16_t)rd16(v, big); break;
        case 4: x = rd32(v, big); break;
        case 9: x = (int32_t)rd32(v, big); break;
        case 5:
        case 10: {
            uint32_t num = rd32(v, big), den = rd32(v + 4, big);
            if (!den) return 0;
            x = type == 5 ? (double)num / den : (double)(int32_t)num / (int32_t)den;
            break;
        }
        case 11: {
            uint32_t b = rd32(v, big);
            float f;
            memcpy(&f, &b, sizeof f);
            x = f;
            break;
        }
        case 12: {
            uint64_t b = big ? (uint64_t)rd32(v, 1) << 32 | rd32(v + 4, 1) : (uint64_t)rd32(v + 4, 0) << 32 | rd32(v, 0);
            memcpy(&x, &b, sizeof x);
            break;
        }
        default: return 0;
        }
        return x >= 1 && x <= 8 && x == (int)x ? (int)x : 0;
    }
    return -1;
}

/* Pillow's XMP fallback: the first match of the regex  tiff:Orientation(="|>)([0-9]) . */
static int xmp_orientation(const uint8_t *p, size_t n) {
    static const char key[] = "tiff:Orientation";
    size_t k = sizeof key - 1;
    for (size_t i = 0; i + k < n; i++) {
        if (memcmp(p + i, key, k) != 0)
            continue;
        size_t j = i + k;
        if (j + 2 < n && p[j] == '=' && p[j + 1] == '"' && p[j + 2] >= '0' && p[j + 2] <= '9')
            return p[j + 2] - '0';
        if (j + 1 < n && p[j] == '>' && p[j + 1] >= '0' && p[j + 1] <= '9')
            return p[j + 1] - '0';
    }
    return 0;
}

/* ImageMagick's "Raw profile type exif" text: "\nexif\n<len>\n<hex lines>"; Pillow decodes
 * the hex of everything after the third newline. Returns what exif_orientation does of it
 * (0 for hex that is not), or DG_ENOMEM. */
static int raw_profile_orientation(const char *text, size_t n) {
    size_t i = 0;
    for (int nl = 0; nl < 3 && i < n; i++)
        if (text[i] == '\n')
            nl++;
    uint8_t *bin = malloc(n / 2 + 1);
    if (!bin)
        return DG_ENOMEM;
    size_t m = 0;
    int hi = -1, bad = 0;
    for (; i < n && !bad; i++) {
        char c = text[i];
        int v;
        if (c >= '0' && c <= '9')
            v = c - '0';
        else if (c >= 'a' && c <= 'f')
            v = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v = c - 'A' + 10;
        else if (c == ' ' || c == '\n' || c == '\t' || c == '\r')
            continue;
        else {
            bad = 1;
            continue;
        }
        if (hi < 0)
            hi = v;
        else {
            bin[m++] = (uint8_t)(hi << 4 | v);
            hi = -1;
        }
    }
    int o = bad || hi >= 0 ? 0 : exif_orientation(bin, m);
    free(bin);
    return o;
}

/* ---- PNG decoding ------------------------------------------------------------------------ */

/* How libpng's samples (after png_set_packing: 8 or 16 bits) become RGB. */
struct png_format {
    int     color_type, bit_depth;
    int     has_key;                 /* a gray/RGB tRNS colour key */
    unsigned key[3];                 /* as Pillow compares it (see png_decode_rows) */
    int     has_alpha;               /* composite on white */
    uint8_t pal[256][4];             /* palette RGBA, alpha from tRNS, 255 past it; past
                                        PLTE black (image.h: Pillow's colour there) */
};

/* Everything the libpng callbacks and the cleanup touch lives here, not in locals of the
 * function that calls setjmp(), so that nothing is clobbered by the longjmp. */
struct png_job {
    const uint8_t   *data;
    size_t           len, pos;
    const dg_image_limits *limits;
    png_structp      png;
    png_infop        info;
    uint8_t         *raw;            /* owned: [height][rowbytes] as libpng delivers it */
    png_bytep       *rows;           /* owned: [height] into raw */
    dg_image        *img;            /* owned until handed out */
    struct png_format fmt;
    const uint8_t   *trns, *exif;    /* the last tRNS before the image data, the last eXIf:
                                        read from the bytes (png_scan), as Pillow reads them */
    uint32_t         n_trns, n_exif;
    int              pixels_done;    /* the image data is complete */
    int              oom;            /* an allocation of libpng's failed (png_mem_alloc) */
    int              code;           /* DG_E* for the failure, when one is set */
    char             msg[160];
};

/* libpng's allocations, zlib's included, go through these (png_create_*_struct_2), so that
 * a failed one is told from a bad file: libpng reports it as an error like any other, or
 * only warns and drops what it could not keep (an ancillary chunk: a text chunk holding the
 * orientation), so the caller fails with DG_ENOMEM whenever *oom is set, even after an
 * image came out. The pointer is the job's `oom`. */
static png_voidp png_mem_alloc(png_structp png, png_alloc_size_t n) {
    void *p = malloc(n);
    if (!p)
        *(int *)png_get_mem_ptr(png) = 1;
    return p;
}

static void png_mem_free(png_structp png, png_voidp p) {
    (void)png;
    free(p);
}

static void png_job_read(png_structp png, png_bytep out, size_t n) {
    struct png_job *j = png_get_io_ptr(png);
    if (n > j->len - j->pos)
        png_error(png, "truncated file");
    memcpy(out, j->data + j->pos, n);
    j->pos += n;
}

static void png_job_error(png_structp png, png_const_charp msg) {
    struct png_job *j = png_get_error_ptr(png);
    if (j->code == 0) {
        j->code = DG_EIMAGE;
        snprintf(j->msg, sizeof j->msg, "corrupt or truncated PNG (%s)", msg);
    }
    png_longjmp(png, 1);
}

static void png_job_warning(png_structp png, png_const_charp msg) {
    (void)png;
    (void)msg;
}

/* One row of libpng samples (w pixels) to RGB, composited on white when the image has
 * transparency (Pillow: an "A" band or a "transparency" entry in info). */
static void png_convert_row(const struct png_format *f, const uint8_t *in, uint8_t *out, int32_t w) {
    int b16 = f->bit_depth == 16;
    unsigned gray_scale = f->bit_depth == 1 ? 255 : f->bit_depth == 2 ? 85 : f->bit_depth == 4 ? 17 : 1;
    for (int32_t x = 0; x < w; x++, out += 3) {
        unsigned r, g, b, a = 255;
        switch (f->color_type) {
        case PNG_COLOR_TYPE_GRAY:
            if (b16) {
                /* Pillow "I;16" -> RGB clips; the colour key is compared on 16 bits */
                unsigned v = (unsigned)in[2 * x] << 8 | in[2 * x + 1];
                if (f->has_key && v == f->key[0])
                    a = 0;
                r = g = b = v > 255 ? 255 : v;
            } else {
                r = g = b = in[x] * gray_scale;
                if (f->has_key && r == f->key[0])
                    a = 0;
            }
            break;
        case PNG_COLOR_TYPE_GRAY_ALPHA:
            r = g = b = in[(2 * x) << b16];
            a = in[(2 * x + 1) << b16];
            break;
        case PNG_COLOR_TYPE_PALETTE:
            r = f->pal[in[x]][0];
            g = f->pal[in[x]][1];
            b = f->pal[in[x]][2];
            a = f->pal[in[x]][3];
            break;
        case PNG_COLOR_TYPE_RGB:
            r = in[(3 * x) << b16];
            g = in[(3 * x + 1) << b16];
            b = in[(3 * x + 2) << b16];
            if (f->has_key && r == f->key[0] && g == f->key[1] && b == f->key[2])
                a = 0;
            break;
        default: /* PNG_COLOR_TYPE_RGB_ALPHA */
            r = in[(4 * x) << b16];
            g = in[(4 * x + 1) << b16];
            b = in[(4 * x + 2) << b16];
            a = in[(4 * x + 3) << b16];
            break;
        }
        if (f->has_alpha) {
            out[0] = composite_white(r, a);
            out[1] = composite_white(g, a);
            out[2] = composite_white(b, a);
        } else {
            out[0] = (uint8_t)r;
            out[1] = (uint8_t)g;
            out[2] = (uint8_t)b;
        }
    }
}

/* The orientation Pillow would find in a PNG: the EXIF's (eXIf, else "Raw profile type
 * exif" text), else, when that has none, XMP in an "XML:com.adobe.xmp" text chunk (the last
 * chunk of a key wins, as in Pillow's info dict; getexif() reads XMP whenever the EXIF has
 * no Orientation tag, as the JPEG path below). DG_ENOMEM when the EXIF text could not be
 * decoded for want of memory (an image without its orientation would be another image). */
static int png_orientation(png_structp png, png_infop info, const uint8_t *exif, uint32_t n_exif) {
    int o = -1, has_exif = exif && n_exif > 0;
    if (has_exif)
        o = exif_orientation(exif, n_exif);
    png_textp text = NULL;
    int n_text = 0;
    png_get_text(png, info, &text, &n_text);
    const png_text *raw = NULL, *xmp = NULL;
    for (int i = 0; i < n_text; i++) {
        if (strcmp(text[i].key, "Raw profile type exif") == 0)
            raw = &text[i];
        else if (strcmp(text[i].key, "XML:com.adobe.xmp") == 0)
            xmp = &text[i];
    }
    if (raw && !has_exif) {
        size_t len = raw->compression > 0 ? raw->itxt_length : raw->text_length;
        o = raw_profile_orientation(raw->text, len);
        if (o == DG_ENOMEM)
            return o;
    }
    if (o < 0 && xmp) {
        size_t len = xmp->compression > 0 ? xmp->itxt_length : xmp->text_length;
        o = xmp_orientation((const uint8_t *)xmp->text, len);
    }
    return o < 0 ? 0 : o;
}

/* png_orientation() for png_decode(): the orientation, or -1 with j->code set. */
static int png_job_orientation(struct png_job *j) {
    int o = png_orientation(j->png, j->info, j->exif, j->n_exif);
    if (o == DG_ENOMEM) {
        j->code = DG_ENOMEM;
        snprintf(j->msg, sizeof j->msg, "out of memory reading its EXIF orientation");
        return -1;
    }
    return o;
}


/* What Pillow takes from the chunks itself, over the first n bytes (png_usable_length's):
 * a chunk before the first IDAT whose CRC is wrong refuses the file (Pillow: "broken PNG
 * file"; the image data's and later chunks' CRCs it does not check, nor does libpng here);
 * the last tRNS before the image data; the last eXIf anywhere (Pillow prefixes it with
 * "Exif\0\0", which exif_orientation strips with any others). libpng would drop a tRNS
 * longer than PLTE or before it, a key past the bit depth, and an eXIf that starts with
 * "Exif\0\0", all of which Pillow uses. Returns 0, or DG_EIMAGE with msg set. */
static int png_scan(struct png_job *j, size_t n) {
    const uint8_t *p = j->data;
    size_t pos = 8;
    int seen_idat = 0;
    while (pos + 12 <= n) {
        uint32_t len = rd32(p + pos, 1);
        const uint8_t *type = p + pos + 4, *body = p + pos + 8;
        if ((uint64_t)len + 12 > n - pos)
            break;
        seen_idat |= memcmp(type, "IDAT", 4) == 0;
        if (!seen_idat && crc32(0, type, 4 + len) != rd32(body + len, 1)) {
            snprintf(j->msg, sizeof j->msg, "corrupt PNG (the CRC of its %.4s chunk, before the image data, is wrong)",
                     (const char *)type);
            return DG_EIMAGE;
        }
        if (!seen_idat && !memcmp(type, "tRNS", 4))
            j->trns = body, j->n_trns = len;
        else if (!memcmp(type, "eXIf", 4))
            j->exif = body, j->n_exif = len;
        pos += 12 + (size_t)len;
    }
    return 0;
}

/* The tRNS chunk as Pillow's chunk_tRNS takes it: a palette's alpha per entry (255 past the
 * chunk, entries past PLTE unused), a gray key in its first 2 bytes, an RGB key in its
 * first 6; one too short for its key refuses the file (Pillow: "Truncated tRNS chunk"); on
 * an image with an alpha channel it is ignored. The key is compared with the pixel's 8-bit
 * value as Pillow compares it (the key's low byte; x255 for 1-bit gray; the raw key
 * against the scaled value for 2- and 4-bit gray, so keys 1..14 never match there), a
 * 16-bit gray pixel on 16 bits, a 16-bit RGB pixel's high byte with the key's low byte.
 * Returns 0, or DG_EIMAGE with msg set. */
static int png_transparency(struct png_job *j) {
    struct png_format *f = &j->fmt;
    const uint8_t *t = j->trns;
    if (!t || (f->color_type & PNG_COLOR_MASK_ALPHA))
        return 0;
    if (f->color_type == PNG_COLOR_TYPE_PALETTE) {
        f->has_alpha = 1;
        for (uint32_t i = 0; i < j->n_trns && i < 256; i++)
            f->pal[i][3] = t[i];
        return 0;
    }
    const uint32_t need = f->color_type == PNG_COLOR_TYPE_GRAY ? 2 : 6;
    if (j->n_trns < need) {
        snprintf(j->msg, sizeof j->msg, "corrupt PNG (a tRNS chunk of %u bytes, short of the %u of a colour key)",
                 (unsigned)j->n_trns, (unsigned)need);
        return DG_EIMAGE;
    }
    f->has_alpha = f->has_key = 1;
    for (uint32_t c = 0; c < need / 2; c++) {
        unsigned key = rd16(t + 2 * c, 1);
        if (f->color_type == PNG_COLOR_TYPE_GRAY && f->bit_depth == 16)
            f->key[c] = key;
        else
            f->key[c] = (f->color_type == PNG_COLOR_TYPE_GRAY && f->bit_depth == 1 ? key * 255u : key) & 0xff;
    }
    return 0;
}

static int png_skip_chunk(png_structp png, png_unknown_chunkp chunk) {
    (void)png;
    (void)chunk;
    return 1;   /* handled: nothing kept */
}

/* The libpng part of dg_image_decode(): on success j->img holds the image as stored (not
 * yet oriented) and the return is the orientation found (0: none); -1 with j->code set.
 * Locals are only declared after setjmp() and never read after a longjmp. */
static int png_decode(struct png_job *j) {
    if (setjmp(png_jmpbuf(j->png))) {
        if (!j->pixels_done)
            return -1;
        j->code = 0;                 /* an error after the pixels: see png_read_end below */
        return png_job_orientation(j);
    }
    png_set_read_fn(j->png, j, png_job_read);
    /* Ancillary chunks (text, ICC, eXIf) are buffered whole, decompressed ones too: cap
     * them, or a chunk header claiming 2 GB makes libpng allocate it before it finds the
     * file is short. */
    png_set_chunk_malloc_max(j->png, 8u << 20);
    /* tRNS and eXIf are read from the bytes (png_scan), as Pillow reads them: libpng hands
     * them, and any chunk it does not know (a critical one too: Pillow skips those), to
     * png_skip_chunk; CRCs are png_scan's to check, where Pillow checks them */
    static const png_byte own[] = "tRNS\0eXIf";
    png_set_keep_unknown_chunks(j->png, PNG_HANDLE_CHUNK_NEVER, own, 2);
    png_set_read_user_chunk_fn(j->png, NULL, png_skip_chunk);
    png_set_crc_action(j->png, PNG_CRC_QUIET_USE, PNG_CRC_QUIET_USE);
    png_read_info(j->png, j->info);

    png_uint_32 w, h;
    int bit_depth, color_type;
    png_get_IHDR(j->png, j->info, &w, &h, &bit_depth, &color_type, NULL, NULL, NULL);
    if ((uint64_t)w * h > (uint64_t)j->limits->max_pixels || w > 65535 || h > 65535) {
        j->code = DG_ELIMIT;
        snprintf(j->msg, sizeof j->msg, "%ux%u PNG is over the limit of %lld pixels",
                 (unsigned)w, (unsigned)h, (long long)j->limits->max_pixels);
        return -1;
    }

    struct png_format *f = &j->fmt;
    f->color_type = color_type;
    f->bit_depth = bit_depth;
    f->has_alpha = (color_type & PNG_COLOR_MASK_ALPHA) != 0;
    if (color_type == PNG_COLOR_TYPE_PALETTE) {
        png_colorp plte = NULL;
        int n_plte = 0;
        png_get_PLTE(j->png, j->info, &plte, &n_plte);
        for (int i = 0; i < 256; i++) {
            f->pal[i][0] = i < n_plte ? plte[i].red : 0;
            f->pal[i][1] = i < n_plte ? plte[i].green : 0;
            f->pal[i][2] = i < n_plte ? plte[i].blue : 0;
            f->pal[i][3] = 255;
        }
    }
    if ((j->code = png_transparency(j)) < 0)
        return -1;
    if (bit_depth < 8)
        png_set_packing(j->png);
    png_set_interlace_handling(j->png);
    png_read_update_info(j->png, j->info);

    size_t rowbytes = png_get_rowbytes(j->png, j->info);
    j->raw = malloc(rowbytes * h);
    j->rows = malloc(sizeof *j->rows * h);
    if (!j->raw || !j->rows || dg_image_new((int32_t)w, (int32_t)h, &j->img) < 0) {
        dg_image_free(j->img);
        j->img = NULL;
        j->code = DG_ENOMEM;
        snprintf(j->msg, sizeof j->msg, "out of memory for a %ux%u PNG", (unsigned)w, (unsigned)h);
        return -1;
    }
    for (png_uint_32 y = 0; y < h; y++)
        j->rows[y] = j->raw + rowbytes * y;
    png_read_image(j->png, j->rows);
    for (png_uint_32 y = 0; y < h; y++)
        png_convert_row(f, j->rows[y], j->img->rgb + (size_t)y * w * 3, (int32_t)w);
    /* The pixels are complete: like Pillow, a damaged or missing tail after the image
     * data (text, eXIf, IEND) is not an error; the longjmp above returns 0 then. */
    j->pixels_done = 1;
    png_read_end(j->png, j->info);
    return png_job_orientation(j);
}

/* Walks the chunk list before libpng sees it: libpng allocates a chunk's declared length
 * before it reads it, so a 2 GB length in a 200-byte file must not reach it. A chunk that
 * runs past the end of the data before or inside the image data makes the file truncated
 * (returns 0); one after the image data cuts the file there, since what follows the pixels
 * is optional (Pillow ignores a damaged tail too). Returns the length to hand libpng. */
static size_t png_usable_length(const uint8_t *p, size_t n) {
    size_t pos = 8;
    int seen_idat = 0;
    while (pos + 8 <= n) {
        uint32_t len = (uint32_t)p[pos] << 24 | (uint32_t)p[pos + 1] << 16 |
                       (uint32_t)p[pos + 2] << 8 | p[pos + 3];
        int idat = memcmp(p + pos + 4, "IDAT", 4) == 0;
        if (len > 0x7fffffffu || (uint64_t)len + 12 > n - pos)
            return seen_idat && !idat ? pos : 0;
        if (memcmp(p + pos + 4, "IEND", 4) == 0)
            return n;
        seen_idat |= idat;
        pos += 12 + (size_t)len;
    }
    return seen_idat && pos < n ? pos : n;
}

static int png_decode_bytes(const uint8_t *data, size_t len, const char *label,
                            const dg_image_limits *limits, dg_image **out, int *orientation,
                            char *err, size_t errlen) {
    size_t usable = png_usable_length(data, len);
    if (usable == 0)
        return image_fail(err, errlen, DG_EIMAGE, label,
                          "truncated PNG (a chunk runs past the end of the data)");
    struct png_job *j = calloc(1, sizeof *j);
    if (!j)
        return image_fail(err, errlen, DG_ENOMEM, label, "out of memory");
    j->data = data;
    j->len = usable;
    j->limits = limits;
    int rc;
    if (png_scan(j, usable) < 0) {
        rc = image_fail(err, errlen, DG_EIMAGE, label, "%s", j->msg);
        goto done;
    }
    j->png = png_create_read_struct_2(PNG_LIBPNG_VER_STRING, j, png_job_error, png_job_warning,
                                      &j->oom, png_mem_alloc, png_mem_free);
    j->info = j->png ? png_create_info_struct(j->png) : NULL;
    if (!j->info) {
        rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory");
        goto done;
    }
    int o = png_decode(j);
    if (j->oom) {   /* whatever libpng made of it: an error, or a chunk dropped */
        rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory in libpng");
        goto done;
    }
    if (o < 0) {
        rc = image_fail(err, errlen, j->code ? j->code : DG_EIMAGE, label, "%s",
                        j->code ? j->msg : "corrupt PNG");
        goto done;
    }
    *out = j->img;
    j->img = NULL;
    *orientation = o;
    rc = DG_OK;
done:
    png_destroy_read_struct(j->png ? &j->png : NULL, j->info ? &j->info : NULL, NULL);
    dg_image_free(j->img);
    free(j->rows);
    free(j->raw);
    free(j);
    return rc;
}

/* ---- JPEG decoding ----------------------------------------------------------------------- */

/* The next marker segment before the image data, walked by the segments' lengths from *at
 * (2: after SOI) as Pillow does (skipping stray non-0xFF bytes and markers without a
 * length): 1 with its marker and payload, 0 at the first SOS (*at its offset), -1 at EOI, a
 * cut or a bad length. */
static int jpeg_segment(const uint8_t *p, size_t n, size_t *at, unsigned *marker, const uint8_t **s, size_t *sl) {
    size_t i = *at;
    while (i + 1 < n) {
        if (p[i] != 0xFF) {
            i++;
            continue;
        }
        unsigned m = p[i + 1];
        if (m == 0xFF) {
            i++;
            continue;
        }
        if (m == 0xDA) {
            *at = i;
            return 0;
        }
        i += 2;
        if (m == 0xD8 || m == 0x01 || (m >= 0xD0 && m <= 0xD7))
            continue;
        if (m == 0xD9 || i + 2 > n)
            return -1;
        size_t seg = (size_t)p[i] << 8 | p[i + 1];
        if (seg < 2 || i + seg > n)
            return -1;
        *marker = m;
        *s = p + i + 2;
        *sl = seg - 2;
        *at = i + seg;
        return 1;
    }
    return -1;
}

/* The orientation Pillow's JpegImagePlugin would find: the Exif APP1 segments (the first
 * one, with the payload of later ones appended), else the last XMP APP1 segment, of the
 * segments up to the first SOS. DG_ENOMEM when the Exif segments could not be gathered. */
static int jpeg_orientation(const uint8_t *p, size_t n) {
    static const char xmp_id[] = "http://ns.adobe.com/xap/1.0/";   /* then a NUL */
    uint8_t *exif = NULL;
    size_t exif_len = 0;
    const uint8_t *xmp = NULL;
    size_t xmp_len = 0;
    size_t at = 2, sl;
    unsigned m;
    const uint8_t *s;
    while (jpeg_segment(p, n, &at, &m, &s, &sl) == 1) {
        if (m == 0xE1 && sl >= 6 && memcmp(s, "Exif\0\0", 6) == 0) {
            const uint8_t *add = exif ? s + 6 : s;
            size_t add_len = exif ? sl - 6 : sl;
            uint8_t *grown = realloc(exif, exif_len + add_len + 1);
            if (!grown) {
                free(exif);
                return DG_ENOMEM;
            }
            exif = grown;
            memcpy(exif + exif_len, add, add_len);
            exif_len += add_len;
        } else if (m == 0xE1 && sl >= sizeof xmp_id && memcmp(s, xmp_id, sizeof xmp_id) == 0) {
            xmp = s + sizeof xmp_id;
            xmp_len = sl - sizeof xmp_id;
        }
    }
    int o = exif ? exif_orientation(exif, exif_len) : -1;
    if (o < 0 && xmp)
        o = xmp_orientation(xmp, xmp_len);
    if (o < 0)
        o = 0;
    free(exif);
    return o;
}

/* Whether an EOI marker (FF D9) follows the main image's first SOS (FF DA): entropy-coded
 * data never holds FF D9 (an FF there is followed by 00 or a restart marker), so without one
 * the file was cut short. The SOS is found by walking the segments: a camera's Exif
 * thumbnail inside APP1 has an SOS and EOI of its own, which passed a cut file (Pillow
 * refuses it as truncated). */
static int jpeg_complete(const uint8_t *p, size_t n) {
    size_t at = 2, sl;
    unsigned m;
    const uint8_t *s;
    int r;
    while ((r = jpeg_segment(p, n, &at, &m, &s, &sl)) == 1) {}
    return r == 0 && memmem(p + at, n - at, "\xff\xd9", 2) != NULL;
}

/* libjpeg allocates on its own (its memory manager calls malloc), and TurboJPEG says why a
 * call failed only in words: libjpeg's JERR_OUT_OF_MEMORY ("Insufficient memory (case N)")
 * and TurboJPEG's own ("...: Memory allocation failure") are a failed allocation, DG_ENOMEM
 * (a passing failure of the job), not a bad file. */
static int tj_out_of_memory(tjhandle tj) {
    const char *m = tjGetErrorStr2(tj);
    return m && (strstr(m, "Insufficient memory") || strstr(m, "Memory allocation failure"));
}

/* ---- libjpeg, where TurboJPEG's header reading gives up ---------------------------------- */

/* TurboJPEG 2.1's header reading refuses what libjpeg itself reads, and Pillow with it:
 * component sampling factors it cannot name (Y 3x1, 4x2, 1x4, chroma finer than luma),
 * and a warning such as stray bytes before a marker. Such a file goes through libjpeg's own
 * API with TurboJPEG's settings (the accurate integer IDCT, fancy upsampling, at most 500
 * scans); where libjpeg fails too, the caller says TurboJPEG's reason. */
struct lj_job {
    struct jpeg_decompress_struct ci;
    struct jpeg_error_mgr         jerr;
    struct jpeg_progress_mgr      progress;
    jmp_buf                       jb;
    int                           oom, scans;
    int                           rc;      /* what libjpeg_decode returns */
    dg_image                     *img;     /* owned until handed out */
    uint8_t                      *cmyk;    /* owned */
};

static void lj_error_exit(j_common_ptr c) {
    struct lj_job *j = (struct lj_job *)c->client_data;
    j->oom = c->err->msg_code == JERR_OUT_OF_MEMORY;
    longjmp(j->jb, 1);
}

static void lj_emit(j_common_ptr c, int level) {
    if (level < 0) c->err->num_warnings++;   /* warnings are taken, as Pillow takes them; no output */
}

static void lj_progress(j_common_ptr c) {
    struct lj_job *j = (struct lj_job *)c->client_data;
    if (j->ci.is_decompressor && j->ci.input_scan_number > 500) {
        j->scans = 1;
        longjmp(j->jb, 1);
    }
}

/* 1 with the size read (w, h; *out the image when out is not NULL); 0 where libjpeg cannot
 * read it either; DG_ENOMEM, DG_ELIMIT (over limits, err set), DG_EIMAGE (cut short, or a
 * CPU bomb of scans: err set). Locals are only read before the setjmp returns twice. */
static int libjpeg_decode(const uint8_t *data, size_t len, const char *label, const dg_image_limits *limits,
                          int *w, int *h, dg_image **out, char *err, size_t errlen) {
    struct lj_job *j = calloc(1, sizeof *j);
    if (!j)
        return DG_ENOMEM;
    j->ci.err = jpeg_std_error(&j->jerr);
    j->jerr.error_exit = lj_error_exit;
    j->jerr.emit_message = lj_emit;
    j->progress.progress_monitor = lj_progress;
    if (setjmp(j->jb)) {
        if (j->oom)
            j->rc = DG_ENOMEM;
        else if (j->scans)
            j->rc = image_fail(err, errlen, DG_EIMAGE, label, "a progressive JPEG of more than 500 scans");
        goto done;
    }
    jpeg_create_decompress(&j->ci);
    j->ci.client_data = j;
    j->ci.progress = &j->progress;
    jpeg_mem_src(&j->ci, data, (unsigned long)len);
    jpeg_read_header(&j->ci, TRUE);
    *w = (int)j->ci.image_width;
    *h = (int)j->ci.image_height;
    if (*w < 1 || *h < 1)
        goto done;
    if (!out) {
        j->rc = 1;
        goto done;
    }
    if ((int64_t)*w * *h > limits->max_pixels || *w > 65535 || *h > 65535) {
        j->rc = image_fail(err, errlen, DG_ELIMIT, label, "%dx%d JPEG is over the limit of %lld pixels", *w, *h,
                        (long long)limits->max_pixels);
        goto done;
    }
    const int is_cmyk = j->ci.jpeg_color_space == JCS_CMYK || j->ci.jpeg_color_space == JCS_YCCK;
    j->ci.out_color_space = is_cmyk ? JCS_CMYK : JCS_RGB;
    j->ci.dct_method = JDCT_ISLOW;
    j->ci.do_fancy_upsampling = TRUE;
    if (dg_image_new(*w, *h, &j->img) < 0 || (is_cmyk && !(j->cmyk = malloc((size_t)*w * *h * 4)))) {
        j->rc = DG_ENOMEM;
        goto done;
    }
    jpeg_start_decompress(&j->ci);
    while (j->ci.output_scanline < j->ci.output_height) {
        const size_t y = j->ci.output_scanline;
        JSAMPROW row = is_cmyk ? j->cmyk + y * (size_t)*w * 4 : j->img->rgb + y * (size_t)*w * 3;
        jpeg_read_scanlines(&j->ci, &row, 1);
    }
    if (j->jerr.num_warnings && !jpeg_complete(data, len)) {   /* cut short: Pillow refuses it */
        j->rc = image_fail(err, errlen, DG_EIMAGE, label, "truncated JPEG (libjpeg: premature end of data)");
        goto done;
    }
    for (size_t i = 0, n = is_cmyk ? (size_t)*w * *h : 0; i < n; i++) {
        const uint8_t *c = j->cmyk + 4 * i;
        j->img->rgb[3 * i + 0] = cmyk_channel(c[0], c[3]);
        j->img->rgb[3 * i + 1] = cmyk_channel(c[1], c[3]);
        j->img->rgb[3 * i + 2] = cmyk_channel(c[2], c[3]);
    }
    *out = j->img;
    j->img = NULL;
    j->rc = 1;
done:
    jpeg_destroy_decompress(&j->ci);
    dg_image_free(j->img);
    free(j->cmyk);
    const int rc = j->rc;
    free(j);
    return rc;
}

static int jpeg_decode_bytes(const uint8_t *data, size_t len, const char *label,
                             const dg_image_limits *limits, dg_image **out, int *orientation,
                             char *err, size_t errlen) {
    dg_image *img = NULL;
    uint8_t *cmyk = NULL;
    int rc;
    tjhandle tj = tjInitDecompress();
    if (!tj)
        return image_fail(err, errlen, DG_ENOMEM, label, "out of memory");
    int w = 0, h = 0, subsamp, colorspace;
    if (len > ULONG_MAX ||
        tjDecompressHeader3(tj, data, (unsigned long)len, &w, &h, &subsamp, &colorspace) < 0 ||
        w < 1 || h < 1) {
        const int oom = len <= ULONG_MAX && tj_out_of_memory(tj);
        const char *why = tjGetErrorStr2(tj);
        if (!oom && len <= ULONG_MAX) {
            char lj_err[256] = "";
            int r = libjpeg_decode(data, len, label, limits, &w, &h, out, lj_err, sizeof lj_err);
            if (r == 1 && (*orientation = jpeg_orientation(data, len)) == DG_ENOMEM) {
                dg_image_free(*out);
                *out = NULL;
                r = DG_ENOMEM;
            }
            if (r == 1) {
                rc = DG_OK;
                goto done;
            }
            if (r == DG_ENOMEM) {
                rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory in libjpeg");
                goto done;
            }
            if (r < 0) {   /* read, and refused for what it is: that reason */
                snprintf(err, errlen, "%s", lj_err);
                rc = r;
                goto done;
            }
        }
        /* a kind TurboJPEG 2.1 does not read (image.h) is not a damaged file */
        const int kind = why && (strstr(why, "Unsupported JPEG process") || strstr(why, "subsampling type"));
        rc = image_fail(err, errlen, oom ? DG_ENOMEM : DG_EIMAGE, label, "%s (%s)",
                        oom ? "out of memory in libjpeg" : kind ? "a JPEG of a kind this decoder does not read "
                        "(lossless, or sampling factors libjpeg does not take)" : "corrupt JPEG header", why);
        goto done;
    }
    if ((int64_t)w * h > limits->max_pixels || w > 65535 || h > 65535) {
        rc = image_fail(err, errlen, DG_ELIMIT, label, "%dx%d JPEG is over the limit of %lld pixels",
                        w, h, (long long)limits->max_pixels);
        goto done;
    }
    if (dg_image_new(w, h, &img) < 0) {
        rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory for a %dx%d JPEG", w, h);
        goto done;
    }
    /* Pillow's libjpeg defaults: the accurate integer IDCT and fancy upsampling. Progressive
     * files with more than 500 scans are refused (a CPU bomb, not a photograph). */
    int is_cmyk = colorspace == TJCS_CMYK || colorspace == TJCS_YCCK;
    if (is_cmyk && !(cmyk = malloc((size_t)w * h * 4))) {
        rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory for a %dx%d JPEG", w, h);
        goto done;
    }
    int flags = TJFLAG_ACCURATEDCT | TJFLAG_LIMITSCANS;
    int r = is_cmyk ? tjDecompress2(tj, data, (unsigned long)len, cmyk, w, w * 4, h, TJPF_CMYK, flags)
                    : tjDecompress2(tj, data, (unsigned long)len, img->rgb, w, w * 3, h, TJPF_RGB, flags);
    if (r < 0 && (tjGetErrorCode(tj) != TJERR_WARNING || !jpeg_complete(data, len))) {
        /* A warning (corrupt entropy data, extraneous bytes) still leaves a whole image,
         * which Pillow takes too; but a file cut short is refused, as Pillow refuses it
         * ("image file is truncated"). */
        if (tj_out_of_memory(tj))
            rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory in libjpeg (%s)",
                            tjGetErrorStr2(tj));
        else
            rc = image_fail(err, errlen, DG_EIMAGE, label, "corrupt or truncated JPEG (%s)",
                            tjGetErrorStr2(tj));
        goto done;
    }
    if (is_cmyk) {
        for (size_t i = 0, n = (size_t)w * h; i < n; i++) {
            const uint8_t *c = cmyk + 4 * i;
            img->rgb[3 * i + 0] = cmyk_channel(c[0], c[3]);
            img->rgb[3 * i + 1] = cmyk_channel(c[1], c[3]);
            img->rgb[3 * i + 2] = cmyk_channel(c[2], c[3]);
        }
    }
    if ((*orientation = jpeg_orientation(data, len)) == DG_ENOMEM) {
        rc = image_fail(err, errlen, DG_ENOMEM, label, "out of memory reading its EXIF orientation");
        goto done;
    }
    *out = img;
    img = NULL;
    rc = DG_OK;
done:
    free(cmyk);
    dg_image_free(img);
    tjDestroy(tj);
    return rc;
}

/* ---- decoding entry ---------------------------------------------------------------------- */

int dg_image_decode(const uint8_t *data, size_t len, const char *label,
                    const dg_image_limits *limits, dg_image **out, char *err, size_t errlen) {
    if (!out || (!data && len > 0))
        return image_fail(err, errlen, DG_EINVAL, label, "no image or no output given");
    *out = NULL;
    dg_image_limits lim = limits ? *limits : (dg_image_limits){0};
    if (lim.max_bytes == 0)
        lim.max_bytes = DG_IMAGE_DEFAULT_MAX_BYTES;
    if (lim.max_pixels <= 0)
        lim.max_pixels = DG_IMAGE_DEFAULT_MAX_PIXELS;
    if (len > lim.max_bytes)
        return image_fail(err, errlen, DG_ELIMIT, label, "%zu bytes is over the limit of %zu",
                          len, lim.max_bytes);

    dg_image *img = NULL;
    int orientation = 0, rc;
    if (len >= 8 && memcmp(data, "\x89PNG\r\n\x1a\n", 8) == 0)
        rc = png_decode_bytes(data, len, label, &lim, &img, &orientation, err, errlen);
    else if (len >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF)
        rc = jpeg_decode_bytes(data, len, label, &lim, &img, &orientation, err, errlen);
    else if (len == 0)
        return image_fail(err, errlen, DG_EIMAGE, label, "empty image");
    else {
        char hex[3 * 4] = "";
        for (size_t i = 0; i < len && i < 3; i++)
            snprintf(hex + 3 * i, sizeof hex - 3 * i, " %02x", data[i]);
        return image_fail(err, errlen, DG_EIMAGE, label, "not a PNG or JPEG (first bytes%s)", hex);
    }
    if (rc < 0)
        return rc;
    if (orientation >= 2 && orientation <= 8 && (rc = image_orient(&img, orientation)) < 0) {
        dg_image_free(img);
        return image_fail(err, errlen, rc, label, "out of memory");
    }
    *out = img;
    return DG_OK;
}

int dg_image_peek_size(const uint8_t *data, size_t len, int32_t *width, int32_t *height) {
    uint32_t w = 0, h = 0;
    if (!data || !width || !height)
        return DG_EINVAL;
    if (len >= 24 && memcmp(data, "\x89PNG\r\n\x1a\n", 8) == 0) {
        if (rd32(data + 8, 1) != 13 || memcmp(data + 12, "IHDR", 4) != 0)
            return DG_EIMAGE;
        w = rd32(data + 16, 1);
        h = rd32(data + 20, 1);
    } else if (len >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) {
        tjhandle tj = tjInitDecompress();
        int tw = 0, th = 0, subsamp, colorspace;
        int rc = -1;
        if (tj && len <= ULONG_MAX)
            rc = tjDecompressHeader3(tj, data, (unsigned long)len, &tw, &th, &subsamp, &colorspace);
        if (tj)
            tjDestroy(tj);
        if ((rc < 0 || tw < 1 || th < 1) &&
            (len > ULONG_MAX || libjpeg_decode(data, len, NULL, NULL, &tw, &th, NULL, NULL, 0) != 1))
            return DG_EIMAGE;
        w = (uint32_t)tw;
        h = (uint32_t)th;
    }
    if (w < 1 || h < 1 || w > INT32_MAX || h > INT32_MAX)
        return DG_EIMAGE;
    *width = (int32_t)w;
    *height = (int32_t)h;
    return DG_OK;
}

/* ---- PNG encoding ------------------------------------------------------------------------ */

struct png_enc_job {
    const dg_image *img;
    png_structp     png;
    png_infop       info;
    png_text       *text;            /* owned array; the strings are borrowed */
    size_t          n_text;
    uint8_t        *buf;             /* owned: the file so far */
    size_t          len, cap;
    int             oom;             /* an allocation of libpng's failed (png_mem_alloc) */
    int             code;
};

static void png_enc_write(png_structp png, png_bytep data, size_t n) {
    struct png_enc_job *j = png_get_io_ptr(png);
    if (n > j->cap - j->len) {
        size_t cap = j->cap ? j->cap : 1 << 16;
        while (cap - j->len < n)
            cap *= 2;
        uint8_t *grown = realloc(j->buf, cap);
        if (!grown) {
            j->code = DG_ENOMEM;
            png_error(png, "out of memory");
        }
        j->buf = grown;
        j->cap = cap;
    }
    memcpy(j->buf + j->len, data, n);
    j->len += n;
}

static void png_enc_flush(png_structp png) {
    (void)png;
}

static void png_enc_error(png_structp png, png_const_charp msg) {
    struct png_enc_job *j = png_get_error_ptr(png);
    (void)msg;
    if (j->code == 0)
        j->code = DG_EINTERNAL;
    png_longjmp(png, 1);
}

/* The libpng part of dg_image_encode_png(); -1 with j->code set on failure. */
static int png_encode(struct png_enc_job *j) {
    if (setjmp(png_jmpbuf(j->png)))
        return -1;
    png_set_write_fn(j->png, j, png_enc_write, png_enc_flush);
    png_set_IHDR(j->png, j->info, (png_uint_32)j->img->width, (png_uint_32)j->img->height, 8,
                 PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
                 PNG_FILTER_TYPE_DEFAULT);
    if (j->n_text > 0)
        png_set_text(j->png, j->info, j->text, (int)j->n_text);
    png_write_info(j->png, j->info);
    for (int32_t y = 0; y < j->img->height; y++)
        png_write_row(j->png, j->img->rgb + (size_t)y * j->img->width * 3);
    png_write_end(j->png, j->info);
    return 0;
}

/* The PNG rule for a text keyword: 1..79 Latin-1 printable bytes, no leading, trailing or
 * consecutive spaces. */
static int png_key_valid(const char *key) {
    size_t n = key ? strlen(key) : 0;
    if (n < 1 || n > 79 || key[0] == ' ' || key[n - 1] == ' ')
        return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)key[i];
        if (!((c >= 32 && c <= 126) || c >= 161))
            return 0;
        if (c == ' ' && key[i + 1] == ' ')
            return 0;
    }
    return 1;
}

int dg_image_encode_png(const dg_image *img, const dg_kv *text, size_t n_text,
                        uint8_t **png, size_t *png_len, char *err, size_t errlen) {
    if (!img || !img->rgb || img->width < 1 || img->height < 1 || !png || !png_len ||
        (n_text > 0 && !text) || n_text > INT_MAX)
        return image_fail(err, errlen, DG_EINVAL, "png", "bad image or arguments");
    for (size_t i = 0; i < n_text; i++) {
        if (!png_key_valid(text[i].key))
            return image_fail(err, errlen, DG_EINVAL, "png", "text key \"%s\" is not a PNG keyword",
                              text[i].key ? text[i].key : "");
        if (!text[i].value)
            return image_fail(err, errlen, DG_EINVAL, "png", "text key \"%s\" has no value",
                              text[i].key);
    }
    int rc;
    struct png_enc_job *j = calloc(1, sizeof *j);
    if (!j)
        return image_fail(err, errlen, DG_ENOMEM, "png", "out of memory");
    j->img = img;
    j->n_text = n_text;
    if (n_text > 0 && !(j->text = calloc(n_text, sizeof *j->text))) {
        rc = image_fail(err, errlen, DG_ENOMEM, "png", "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_text; i++) {
        int ascii = 1;
        for (const char *c = text[i].value; *c; c++)
            if ((unsigned char)*c >= 0x80)
                ascii = 0;
        /* libpng copies the strings and does not write through these pointers */
        j->text[i].compression = ascii ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
        j->text[i].key = (png_charp)(uintptr_t)text[i].key;
        j->text[i].text = (png_charp)(uintptr_t)text[i].value;
        j->text[i].text_length = strlen(text[i].value);
    }
    j->png = png_create_write_struct_2(PNG_LIBPNG_VER_STRING, j, png_enc_error, png_job_warning,
                                       &j->oom, png_mem_alloc, png_mem_free);
    j->info = j->png ? png_create_info_struct(j->png) : NULL;
    if (!j->info) {
        rc = image_fail(err, errlen, DG_ENOMEM, "png", "out of memory");
        goto done;
    }
    const int enc = png_encode(j);
    if (j->oom) {   /* an error, or a text chunk dropped */
        rc = image_fail(err, errlen, DG_ENOMEM, "png", "out of memory in libpng");
        goto done;
    }
    if (enc < 0) {
        rc = image_fail(err, errlen, j->code, "png", "%s", j->code == DG_ENOMEM
                        ? "out of memory" : "libpng refused the image");
        goto done;
    }
    *png = j->buf;
    *png_len = j->len;
    j->buf = NULL;
    rc = DG_OK;
done:
    png_destroy_write_struct(j->png ? &j->png : NULL, j->info ? &j->info : NULL);
    free(j->buf);
    free(j->text);
    free(j);
    return rc;
}

/* ---- content hash ------------------------------------------------------------------------- */

void dg_image_hash(const dg_image *img, dg_image_digest *out) {
    dg_sha256 s;
    uint8_t head[8], full[DG_SHA256_BYTES];
    for (int i = 0; i < 4; i++) {
        head[i] = (uint8_t)((uint32_t)img->width >> (8 * i));
        head[4 + i] = (uint8_t)((uint32_t)img->height >> (8 * i));
    }
    dg_sha256_init(&s);
    dg_sha256_update(&s, head, sizeof head);
    dg_sha256_update(&s, img->rgb, (size_t)img->width * img->height * 3);
    dg_sha256_final(&s, full);
    memcpy(out->bytes, full, sizeof out->bytes);
}
