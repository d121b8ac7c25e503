/* Image decoding (against Pillow + transformers' convert_to_rgb, tests/golden/image), the
 * limits and error messages for bad input, PNG encoding with text chunks, and the hash. */
#include "common/harness.h"
#include "common/package.h"
#include "io/image.h"

#include <png.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <turbojpeg.h>
#include <jpeglib.h>
#include <unistd.h>

#define GOLDEN "tests/golden/image"

static uint8_t *read_file(const char *name, size_t *len) { return test_read_file(GOLDEN, name, len); }

static void hex(const dg_image_digest *d, char out[33]) {
    for (int i = 0; i < 16; i++)
        snprintf(out + 2 * i, 3, "%02x", d->bytes[i]);
}

/* The golden manifest (test_read_file ends it with a NUL), to walk with strtok; NULL (a
 * failed check) when it is missing. The caller frees it. */
static char *manifest(void) {
    size_t len;
    char *man = (char *)read_file("manifest.txt", &len);
    CHECK(man != NULL);
    return man;
}

/* Every golden input decodes to exactly the RGB the reference pipeline sees: 8/16-bit,
 * palette (with tRNS), 1-bit gray, gray+alpha, RGBA, RGB colour key, CMYK and gray JPEG,
 * progressive and 4:2:0/4:2:2/4:4:4 JPEG, EXIF (JPEG, PNG eXIf) and XMP orientation. */
TEST(decode_matches_reference) {
    char *man = manifest();
    if (!man)
        return;
    int n = 0;
    for (char *line = strtok(man, "\n"); line; line = strtok(NULL, "\n")) {
        char name[128], want[33], got[33];
        int w, h;
        if (sscanf(line, "decode %127s %d %d %32s", name, &w, &h, want) != 4)
            continue;
        size_t dlen;
        uint8_t *data = read_file(name, &dlen);
        dg_image *img = NULL;
        char err[256];
        int rc = data ? dg_image_decode(data, dlen, name, NULL, &img, err, sizeof err) : -99;
        if (rc != 0) {
            test_fail(__FILE__, __LINE__, "%s: rc %d: %s", name, rc, rc == -99 ? "missing" : err);
        } else {
            CHECK_EQ_INT(img->width, w);
            CHECK_EQ_INT(img->height, h);
            dg_image_digest d;
            dg_image_hash(img, &d);
            hex(&d, got);
            if (strcmp(got, want) != 0)
                test_fail(__FILE__, __LINE__, "%s decodes to other pixels than Pillow", name);
        }
        dg_image_free(img);
        free(data);
        n++;
    }
    CHECK(n >= 20);
    free(man);
}

TEST(hash_is_sha256_of_size_and_pixels) {
    dg_image *img;
    CHECK_EQ_INT(dg_image_new(2, 1, &img), 0);
    for (int i = 0; i < 6; i++)
        img->rgb[i] = (uint8_t)(i + 1);
    dg_image_digest d;
    char got[33];
    dg_image_hash(img, &d);
    hex(&d, got);
    /* python: sha256(struct.pack("<II", 2, 1) + bytes([1,2,3,4,5,6])).hexdigest()[:32] */
    CHECK_EQ_STR(got, "f25af82c68d29a6c012779bae23ccc6e");
    img->rgb[5] ^= 1;
    dg_image_digest d2;
    dg_image_hash(img, &d2);
    CHECK(memcmp(d.bytes, d2.bytes, 16) != 0);
    dg_image_free(img);
}

TEST(hash_long_input_crosses_blocks) {
    /* 64x1: 8 + 192 bytes, several SHA-256 blocks and a two-block padding tail */
    dg_image *img;
    CHECK_EQ_INT(dg_image_new(64, 1, &img), 0);
    for (int i = 0; i < 192; i++)
        img->rgb[i] = (uint8_t)(i * 7);
    dg_image_digest d;
    char got[33];
    dg_image_hash(img, &d);
    hex(&d, got);
    /* python: sha256(pack("<II",64,1) + bytes((i*7)%256 for i in range(192))).hexdigest()[:32] */
    CHECK_EQ_STR(got, "3a7e16935515aed446643f7b1b88e74f");
    dg_image_free(img);
}

static int decode(const uint8_t *data, size_t len, const dg_image_limits *lim, char *err, size_t errlen) {
    dg_image *img = NULL;
    int rc = dg_image_decode(data, len, "image 2", lim, &img, err, errlen);
    CHECK(rc == 0 ? img != NULL : img == NULL);
    dg_image_free(img);
    return rc;
}

/* What Pillow refuses to open (a chunk before the image data with a wrong CRC, a tRNS too
 * short for its colour key) is refused, as a bad image, naming why. */
TEST(decode_refuses_what_the_reference_refuses) {
    char *man = manifest();
    if (!man)
        return;
    int n = 0;
    for (char *line = strtok(man, "\n"); line; line = strtok(NULL, "\n")) {
        char name[128], err[256];
        if (sscanf(line, "refuse %127s", name) != 1)
            continue;
        size_t dlen;
        uint8_t *data = read_file(name, &dlen);
        CHECK(data != NULL);
        int rc = data ? decode(data, dlen, NULL, err, sizeof err) : -99;
        if (rc != DG_EIMAGE || !strstr(err, "corrupt PNG ("))
            test_fail(__FILE__, __LINE__, "%s: rc %d (%s), not refused as corrupt", name, rc, rc ? err : "decoded");
        free(data);
        n++;
    }
    CHECK(n >= 2);
    free(man);
}

TEST(decode_rejects_other_formats_with_a_named_message) {
    char err[256];
    CHECK_EQ_INT(decode((const uint8_t *)"GIF89a....", 10, NULL, err, sizeof err), DG_EIMAGE);
    CHECK_EQ_STR(err, "image 2: not a PNG or JPEG (first bytes 47 49 46)");
    CHECK_EQ_INT(decode((const uint8_t *)"", 0, NULL, err, sizeof err), DG_EIMAGE);
    CHECK_EQ_STR(err, "image 2: empty image");
    CHECK_EQ_INT(decode((const uint8_t *)"\x89P", 2, NULL, err, sizeof err), DG_EIMAGE);
    CHECK_EQ_STR(err, "image 2: not a PNG or JPEG (first bytes 89 50)");
    dg_image *img = NULL;
    CHECK_EQ_INT(dg_image_decode(NULL, 5, NULL, NULL, &img, err, sizeof err), DG_EINVAL);
}

TEST(decode_truncated_and_corrupt_files_fail_cleanly) {
    const char *files[] = {"rgb_57x91.png", "rgb_640x427.jpg", "rgb_97x97_444p.jpg", "pal_64x48_trns.png"};
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        size_t len;
        uint8_t *data = read_file(files[f], &len);
        CHECK(data != NULL);
        if (!data)
            continue;
        char err[256];
        /* cut inside the image data */
        for (size_t cut = 9; cut < len - 20; cut += len / 7) {
            int rc = decode(data, cut, NULL, err, sizeof err);
            CHECK_EQ_INT(rc, DG_EIMAGE);
            CHECK(strncmp(err, "image 2: ", 9) == 0);
        }
        /* flipped bytes anywhere: any outcome but a crash (and the sanitizers are happy) */
        for (size_t i = 0; i < len; i += 1 + len / 64) {
            uint8_t keep = data[i];
            data[i] ^= 0x5a;
            decode(data, len, NULL, err, sizeof err);
            data[i] = keep;
        }
        free(data);
    }
}

/* A camera's JPEG carries a thumbnail in its Exif APP1 segment, with an SOS and an EOI of
 * its own: a file cut inside the main image still had both, and was decoded with the rest of
 * the picture grey (Pillow refuses it as truncated). Here a JPEG is put in an APP1 of
 * another, which is then cut. */
TEST(decode_a_cut_jpeg_with_a_thumbnail_fails) {
    size_t main_len, thumb_len;
    uint8_t *main_jpg = read_file("rgb_640x427.jpg", &main_len), *thumb = read_file("rgb_97x97_444p.jpg", &thumb_len);
    CHECK(main_jpg && thumb && thumb_len < 65000);
    if (!main_jpg || !thumb || thumb_len >= 65000) {
        free(main_jpg);
        free(thumb);
        return;
    }
    /* SOI, APP1 "Exif\0\0" + the thumbnail, then the main file after its SOI */
    size_t seg = 2 + 6 + thumb_len, len = 2 + 2 + seg + (main_len - 2);
    uint8_t *file = malloc(len), *w = file;
    *w++ = 0xFF, *w++ = 0xD8, *w++ = 0xFF, *w++ = 0xE1, *w++ = (uint8_t)(seg >> 8), *w++ = (uint8_t)seg;
    memcpy(w, "Exif\0\0", 6), w += 6;
    memcpy(w, thumb, thumb_len), w += thumb_len;
    memcpy(w, main_jpg + 2, main_len - 2);
    char err[256];
    CHECK_EQ_INT(decode(file, len, NULL, err, sizeof err), 0);   /* whole: decoded */
    int rc = decode(file, len - (main_len * 2) / 3, NULL, err, sizeof err);   /* cut in the main image's data */
    CHECK_EQ_INT(rc, DG_EIMAGE);
    free(file);
    free(main_jpg);
    free(thumb);
}

TEST(decode_png_without_iend_is_accepted_like_pillow) {
    size_t len;
    uint8_t *data = read_file("rgb_57x91.png", &len);
    CHECK(data != NULL);
    if (!data)
        return;
    char err[256];
    CHECK_EQ_INT(decode(data, len - 12, NULL, err, sizeof err), 0);   /* IEND is 12 bytes */
    free(data);
}

TEST(decode_limits_bytes_and_pixels) {
    size_t len;
    uint8_t *data = read_file("rgb_640x427.jpg", &len);
    CHECK(data != NULL);
    if (!data)
        return;
    char err[256];
    CHECK_EQ_INT(decode(data, len, &(dg_image_limits){.max_bytes = len - 1}, err, sizeof err), DG_ELIMIT);
    CHECK(strstr(err, "image 2: ") == err && strstr(err, "bytes") != NULL);
    CHECK_EQ_INT(decode(data, len, &(dg_image_limits){.max_pixels = 640 * 427 - 1}, err, sizeof err), DG_ELIMIT);
    CHECK(strstr(err, "640x427") != NULL);
    CHECK_EQ_INT(decode(data, len, &(dg_image_limits){.max_pixels = 640 * 427}, err, sizeof err), 0);
    free(data);
    data = read_file("rgb_57x91.png", &len);
    CHECK(data != NULL);
    if (!data)
        return;
    CHECK_EQ_INT(decode(data, len, &(dg_image_limits){.max_pixels = 57 * 91 - 1}, err, sizeof err), DG_ELIMIT);
    free(data);
}

/* libjpeg allocates on its own, out of reach of tests/test_alloc_fail.c: a progressive
 * 4:4:4 JPEG keeps every coefficient of the image (6 bytes a pixel), twice the RGB the
 * decoder allocates for it. A child whose address space leaves room for that RGB and not for
 * libjpeg's arrays must fail with DG_ENOMEM (a passing failure of its job) and say so; it
 * was DG_EIMAGE, "corrupt or truncated JPEG (Insufficient memory (case 4))": a bad file,
 * failed for good. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
TEST(decode_jpeg_out_of_memory_in_libjpeg_is_enomem) {
    SKIP("an address-space limit leaves no room for the sanitizer's shadow memory");
}
#else
/* The process's address space in use, from /proc/self/status (VmSize); 0 if unread. */
static size_t vm_size(void) {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    size_t kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmSize: %zu kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb * 1024;
}

TEST(decode_jpeg_out_of_memory_in_libjpeg_is_enomem) {
    enum { W = 4096, H = 4096 };
    uint8_t *rgb = malloc((size_t)W * H * 3);
    CHECK(rgb != NULL);
    if (!rgb)
        return;
    for (size_t i = 0; i < (size_t)W * H * 3; i++)
        rgb[i] = (uint8_t)(i / 3 % W + i / 3 / W + i % 3 * 40);
    tjhandle tj = tjInitCompress();
    unsigned char *jpg = NULL;
    unsigned long jlen = 0;
    CHECK(tj && tjCompress2(tj, rgb, W, 0, H, TJPF_RGB, &jpg, &jlen, TJSAMP_444, 90, TJFLAG_PROGRESSIVE) == 0);
    free(rgb);
    if (tj)
        tjDestroy(tj);
    const dg_image_limits lim = {.max_bytes = 1 << 30, .max_pixels = (int64_t)W * H};
    char err[256];
    CHECK_EQ_INT(decode(jpg, jlen, &lim, err, sizeof err), 0);   /* it decodes, given room */

    struct { int rc; char err[256]; } got = {-1, ""};
    int fd[2];
    CHECK(pipe(fd) == 0);
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        close(fd[0]);
        /* room for the decoder's RGB and 16 MiB more; libjpeg's arrays need 96 MiB */
        const rlim_t cap = vm_size() + (size_t)W * H * 3 + (16u << 20);
        setrlimit(RLIMIT_AS, &(struct rlimit){cap, cap});
        dg_image *img = NULL;
        got.rc = dg_image_decode(jpg, jlen, "big", &lim, &img, got.err, sizeof got.err);
        dg_image_free(img);
        if (write(fd[1], &got, sizeof got) != (ssize_t)sizeof got)
            _exit(1);
        _exit(0);
    }
    close(fd[1]);
    CHECK(pid > 0 && read(fd[0], &got, sizeof got) == (ssize_t)sizeof got);
    close(fd[0]);
    int status = 0;
    if (pid > 0)
        waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    printf("  a %dx%d progressive JPEG in a small address space: %d \"%s\"\n", W, H, got.rc, got.err);
    CHECK_EQ_INT(got.rc, DG_ENOMEM);
    CHECK(strstr(got.err, "big: out of memory in libjpeg (") == got.err);
    tjFree(jpg);
}
#endif

/* A decompression bomb: a tiny file that claims a huge image is refused from its header,
 * before anything of that size is allocated. */
TEST(decode_refuses_bombs_from_the_header) {
    dg_image *img;
    CHECK_EQ_INT(dg_image_new(8, 8, &img), 0);
    uint8_t *png = NULL;
    size_t png_len = 0;
    char err[256];
    CHECK_EQ_INT(dg_image_encode_png(img, NULL, 0, &png, &png_len, err, sizeof err), 0);
    /* IHDR width/height at bytes 16..23; the CRC is now wrong, but the size check comes
     * first and libpng checks the IHDR CRC... so rewrite the CRC too */
    uint8_t *bomb = malloc(png_len);
    memcpy(bomb, png, png_len);
    bomb[16] = 0; bomb[17] = 0; bomb[18] = 0xC3; bomb[19] = 0x50;   /* 50000 */
    bomb[20] = 0; bomb[21] = 0; bomb[22] = 0xC3; bomb[23] = 0x50;
    uint32_t crc = 0xffffffffu;
    for (int i = 12; i < 29; i++) {
        crc ^= bomb[i];
        for (int b = 0; b < 8; b++)
            crc = crc & 1 ? (crc >> 1) ^ 0xedb88320u : crc >> 1;
    }
    crc ^= 0xffffffffu;
    bomb[29] = (uint8_t)(crc >> 24); bomb[30] = (uint8_t)(crc >> 16);
    bomb[31] = (uint8_t)(crc >> 8);  bomb[32] = (uint8_t)crc;
    CHECK_EQ_INT(decode(bomb, png_len, NULL, err, sizeof err), DG_ELIMIT);
    CHECK(strstr(err, "50000x50000") != NULL);
    free(bomb);
    free(png);
    dg_image_free(img);

    /* JPEG SOF0 claiming 65000x65000 */
    size_t len;
    uint8_t *jpg = read_file("rgb_640x427.jpg", &len);
    CHECK(jpg != NULL);
    if (!jpg)
        return;
    for (size_t i = 2; i + 9 < len; i++)
        if (jpg[i] == 0xFF && jpg[i + 1] == 0xC0) {
            jpg[i + 5] = 0xFD; jpg[i + 6] = 0xE8;   /* height 65000 */
            jpg[i + 7] = 0xFD; jpg[i + 8] = 0xE8;   /* width 65000 */
            break;
        }
    CHECK_EQ_INT(decode(jpg, len, NULL, err, sizeof err), DG_ELIMIT);
    free(jpg);
}

/* A JPEG of a process TurboJPEG 2.1 does not read (SOF3, lossless; here a baseline file's
 * SOF0 marker renamed) is refused as a kind not read, not as a corrupt file. */
TEST(decode_names_a_jpeg_kind_it_does_not_read) {
    size_t len;
    uint8_t *jpg = read_file("rgb_640x427.jpg", &len);
    CHECK(jpg != NULL);
    if (!jpg)
        return;
    for (size_t i = 2; i + 1 < len; i++)
        if (jpg[i] == 0xFF && jpg[i + 1] == 0xC0) {
            jpg[i + 1] = 0xC3;
            break;
        }
    char err[256];
    CHECK_EQ_INT(decode(jpg, len, NULL, err, sizeof err), DG_EIMAGE);
    CHECK(strstr(err, "image 2: a JPEG of a kind this decoder does not read (lossless") == err);
    free(jpg);
}

/* Stray bytes before a header marker: libjpeg warns and reads on, as Pillow does; TurboJPEG
 * 2.1's header reading gave up ("corrupt JPEG header"). Three bytes before the DQT of a
 * golden file decode to exactly the golden's pixels. */
TEST(decode_a_jpeg_with_stray_bytes_before_a_marker) {
    size_t len;
    uint8_t *jpg = read_file("rgb_640x427.jpg", &len);
    CHECK(jpg != NULL);
    if (!jpg)
        return;
    dg_image *want = NULL, *got = NULL;
    char err[256];
    CHECK_EQ_INT(dg_image_decode(jpg, len, "image", NULL, &want, err, sizeof err), 0);
    uint8_t *bad = malloc(len + 3);
    size_t at = 2;
    while (at + 1 < len && !(jpg[at] == 0xFF && jpg[at + 1] == 0xDB)) at++;
    memcpy(bad, jpg, at);
    memcpy(bad + at, "\x01\x02\x03", 3);
    memcpy(bad + at + 3, jpg + at, len - at);
    int rc = dg_image_decode(bad, len + 3, "image", NULL, &got, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", err);
    int32_t w = 0, h = 0;
    CHECK_EQ_INT(dg_image_peek_size(bad, len + 3, &w, &h), 0);
    CHECK(w == 640 && h == 427);
    CHECK(want && got && got->width == want->width && got->height == want->height &&
          !memcmp(got->rgb, want->rgb, (size_t)want->width * want->height * 3));
    dg_image_free(want);
    dg_image_free(got);
    free(bad);
    free(jpg);
}

/* Sampling factors TurboJPEG 2.1 cannot name (luma 3x1, chroma 1x1: Pillow reads it) were
 * refused as "could not determine subsampling type": such a file, written here with libjpeg
 * from a golden picture, decodes (bit for bit as Pillow 13 decodes it, checked when this was
 * written). Tolerance: the golden pictures carry noise of sigma 6 levels, which JPEG at
 * quality 95 with chroma at a third of the width does not keep: the mean absolute error
 * against the source is about 7 levels; under 12 passes (a wrong colour conversion or a
 * garbled MCU order is off by tens). */
TEST(decode_a_jpeg_of_sampling_factors_turbojpeg_cannot_name) {
    size_t len;
    uint8_t *png = read_file("rgb_57x91.png", &len);
    dg_image *src = NULL, *got = NULL;
    char err[256];
    CHECK(png && dg_image_decode(png, len, "image", NULL, &src, err, sizeof err) == 0);
    if (!src) {
        free(png);
        return;
    }
    struct jpeg_compress_struct c;
    struct jpeg_error_mgr jerr;
    unsigned char *jpg = NULL;
    unsigned long jlen = 0;
    c.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&c);
    jpeg_mem_dest(&c, &jpg, &jlen);
    c.image_width = (JDIMENSION)src->width;
    c.image_height = (JDIMENSION)src->height;
    c.input_components = 3;
    c.in_color_space = JCS_RGB;
    jpeg_set_defaults(&c);
    jpeg_set_quality(&c, 95, TRUE);
    c.comp_info[0].h_samp_factor = 3, c.comp_info[0].v_samp_factor = 1;
    for (int i = 1; i < 3; i++) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
    jpeg_start_compress(&c, TRUE);
    while (c.next_scanline < c.image_height) {
        JSAMPROW row = src->rgb + (size_t)c.next_scanline * src->width * 3;
        jpeg_write_scanlines(&c, &row, 1);
    }
    jpeg_finish_compress(&c);
    jpeg_destroy_compress(&c);
    tjhandle tj = tjInitDecompress();
    int tw, th, ss, cs;
    CHECK(tjDecompressHeader3(tj, jpg, jlen, &tw, &th, &ss, &cs) < 0);   /* the case this test is about */
    tjDestroy(tj);
    int rc = dg_image_decode(jpg, jlen, "image", NULL, &got, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    if (rc) printf("  %s\n", err);
    if (got) {
        CHECK(got->width == src->width && got->height == src->height);
        double sum = 0;
        const size_t n = (size_t)src->width * src->height * 3;
        for (size_t i = 0; i < n; i++) sum += abs((int)got->rgb[i] - (int)src->rgb[i]);
        printf("  mean absolute error %.2f\n", sum / n);
        CHECK(sum / n < 12.0);
    }
    dg_image_free(got);
    dg_image_free(src);
    free(jpg);
    free(png);
}

/* A chunk header claiming 1.8 GB in a 100-byte file (found by the fuzzer: libpng would
 * allocate the claimed size first) is refused at once as truncated. */
TEST(decode_png_chunk_longer_than_the_file) {
    size_t len;
    uint8_t *data = read_file("rgb_13x17.png", &len);
    CHECK(data != NULL);
    if (!data)
        return;
    uint8_t *bad = malloc(len + 12);
    memcpy(bad, data, 33);                                   /* signature + IHDR */
    memcpy(bad + 33, "\x6d\x00\x00\x68iTXtXML:com.adobe.xmp", 25);
    char err[256];
    CHECK_EQ_INT(decode(bad, 58, NULL, err, sizeof err), DG_EIMAGE);
    CHECK(strstr(err, "truncated PNG") != NULL);
    free(bad);
    free(data);
}

static void put32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24), p[1] = (uint8_t)(v >> 16), p[2] = (uint8_t)(v >> 8), p[3] = (uint8_t)v;
}

/* Appends a chunk at out + *len: length, type, data, and the CRC-32 of type and data. */
static void put_chunk(uint8_t *out, size_t *len, const char *type, const uint8_t *data, uint32_t n) {
    uint8_t *c = out + *len;
    put32(c, n);
    memcpy(c + 4, type, 4);
    if (n > 0)
        memcpy(c + 8, data, n);
    uint32_t crc = 0xffffffffu;
    for (uint32_t i = 0; i < 4 + n; i++) {
        crc ^= c[4 + i];
        for (int b = 0; b < 8; b++)
            crc = crc & 1 ? (crc >> 1) ^ 0xedb88320u : crc >> 1;
    }
    put32(c + 8 + n, crc ^ 0xffffffffu);
    *len += 12 + n;
}

/* A 4x2 palette PNG (colour type 3, 8-bit indices) with four PLTE entries, red, green, blue
 * and white, whose last pixel has index `last`: written by hand, the image data as one
 * stored deflate block, so that nothing but the decoder looks at the indices. out holds
 * at least 128 bytes; returns the length. */
static size_t palette_png(uint8_t *out, uint8_t last) {
    static const uint8_t ihdr[13] = {0, 0, 0, 4, 0, 0, 0, 2, 8, 3, 0, 0, 0};
    static const uint8_t plte[12] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255};
    const uint8_t raw[10] = {0, 0, 1, 2, 3, 0, 3, 2, 1, last};   /* each row: filter 0, indices */
    uint8_t z[2 + 5 + sizeof raw + 4] = {0x78, 0x01, 0x01, sizeof raw, 0, (uint8_t)~sizeof raw, 0xff};
    memcpy(z + 7, raw, sizeof raw);
    uint32_t a = 1, b = 0;   /* zlib's Adler-32 of raw */
    for (size_t i = 0; i < sizeof raw; i++) {
        a = (a + raw[i]) % 65521;
        b = (b + a) % 65521;
    }
    put32(z + 7 + sizeof raw, b << 16 | a);
    size_t len = 8;
    memcpy(out, "\x89PNG\r\n\x1a\n", 8);
    put_chunk(out, &len, "IHDR", ihdr, sizeof ihdr);
    put_chunk(out, &len, "PLTE", plte, sizeof plte);
    put_chunk(out, &len, "IDAT", z, sizeof z);
    put_chunk(out, &len, "IEND", NULL, 0);
    return len;
}

/* A palette index past the PLTE entries is an error in the PNG spec (11.2.3), but Pillow
 * takes the file and makes such a pixel black and opaque (the golden pal_pastplte_20x20.png
 * shows it against Pillow; here by hand, the last pixel's index 7 past the four entries):
 * refusing it refused images the reference pipeline reads. */
TEST(decode_png_palette_index_past_plte_is_black_as_pillow) {
    static const uint8_t want[2 * 4 * 3] = {255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255,
                                            255, 255, 255, 0, 0, 255, 0, 255, 0, 255, 255, 255};
    static const uint8_t last[] = {3, 4, 7, 255};   /* inside, just past, past, the largest */
    for (size_t i = 0; i < sizeof last; i++) {
        uint8_t png[128];
        size_t len = palette_png(png, last[i]);
        dg_image *img = NULL;
        char err[256];
        CHECK_EQ_INT(dg_image_decode(png, len, "image 2", NULL, &img, err, sizeof err), 0);
        CHECK(img && img->width == 4 && img->height == 2);
        if (!img)
            continue;
        CHECK(memcmp(img->rgb, want, sizeof want - 3) == 0);
        const uint8_t *px = img->rgb + sizeof want - 3;   /* the last pixel: white, else black */
        uint8_t v = last[i] == 3 ? 255 : 0;
        CHECK(px[0] == v && px[1] == v && px[2] == v);
        dg_image_free(img);
    }
}

/* A PNG in memory, w x h RGB, with an eXIf chunk (the TIFF blob exif[0..n_exif) when
 * n_exif > 0) and an XMP text chunk (when xmp is not NULL). */
struct membuf { uint8_t *p; size_t n, cap; };
static void mem_write(png_structp png, png_bytep data, png_size_t len) {
    struct membuf *b = png_get_io_ptr(png);
    if (b->n + len > b->cap) {
        b->cap = (b->n + len) * 2;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, data, len);
    b->n += len;
}
static void mem_flush(png_structp png) { (void)png; }
static uint8_t *png_with_exif_xmp(int w, int h, const uint8_t *exif, int n_exif, const char *xmp, size_t *len) {
    struct membuf b = {0};
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    uint8_t *row = malloc((size_t)w * 3);
    if (setjmp(png_jmpbuf(png))) {
        png_destroy_write_struct(&png, &info);
        free(row);
        free(b.p);
        return NULL;
    }
    png_set_write_fn(png, &b, mem_write, mem_flush);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (n_exif > 0) png_set_eXIf_1(png, info, (png_uint_32)n_exif, (png_bytep)exif);
    png_text t = {.compression = PNG_TEXT_COMPRESSION_NONE, .key = "XML:com.adobe.xmp", .text = (char *)xmp,
                  .text_length = xmp ? strlen(xmp) : 0};
    if (xmp) png_set_text(png, info, &t, 1);
    png_write_info(png, info);
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++) {
            row[3 * x] = (uint8_t)(x * 4);
            row[3 * x + 1] = (uint8_t)(y * 8);
            row[3 * x + 2] = (uint8_t)(x ^ y);
        }
        png_write_row(png, row);
    }
    png_write_end(png, info);
    png_destroy_write_struct(&png, &info);
    free(row);
    *len = b.n;
    return b.p;
}

/* Pillow's getexif() reads XMP's tiff:Orientation whenever the EXIF has no Orientation tag
 * (PIL.Image.Image.getexif), an EXIF without one included: a PNG whose eXIf holds only a
 * Make tag and whose XMP says 6 is turned as the XMP alone turns it (52x29 -> 29x52). An
 * EXIF Orientation of 1, or of 0 (no turn), is a tag: the XMP is not read then. */
TEST(decode_png_exif_without_orientation_falls_back_to_xmp) {
    static const uint8_t make_only[26] = {'I', 'I', '*', 0, 8, 0, 0, 0, 1, 0,           /* one IFD0 entry: */
                                          0x0F, 0x01, 2, 0, 4, 0, 0, 0, 'C', 'a', 'm', 0, /* Make "Cam" */
                                          0, 0, 0, 0};
    static const uint8_t upright[26] = {'I', 'I', '*', 0, 8, 0, 0, 0, 1, 0,
                                        0x12, 0x01, 3, 0, 1, 0, 0, 0, 1, 0, 0, 0,        /* Orientation 1 */
                                        0, 0, 0, 0};
    static const uint8_t zero[26] = {'I', 'I', '*', 0, 8, 0, 0, 0, 1, 0,
                                     0x12, 0x01, 3, 0, 1, 0, 0, 0, 0, 0, 0, 0,           /* Orientation 0 */
                                     0, 0, 0, 0};
    const char *xmp = "<x:xmpmeta><rdf:Description tiff:Orientation=\"6\"/></x:xmpmeta>";
    size_t l0, l1, l2, l3, l4;
    uint8_t *plain = png_with_exif_xmp(52, 29, NULL, 0, NULL, &l0), *only_xmp = png_with_exif_xmp(52, 29, NULL, 0, xmp, &l1),
            *both = png_with_exif_xmp(52, 29, make_only, 26, xmp, &l2),
            *tagged = png_with_exif_xmp(52, 29, upright, 26, xmp, &l3), *zeroed = png_with_exif_xmp(52, 29, zero, 26, xmp, &l4);
    CHECK(plain && only_xmp && both && tagged && zeroed);
    dg_image *a = NULL, *b = NULL, *c = NULL, *d = NULL, *e = NULL;
    char err[256];
    if (plain) CHECK_EQ_INT(dg_image_decode(plain, l0, "plain", NULL, &a, err, sizeof err), 0);
    if (only_xmp) CHECK_EQ_INT(dg_image_decode(only_xmp, l1, "xmp", NULL, &b, err, sizeof err), 0);
    if (both) CHECK_EQ_INT(dg_image_decode(both, l2, "exif+xmp", NULL, &c, err, sizeof err), 0);
    if (tagged) CHECK_EQ_INT(dg_image_decode(tagged, l3, "tagged", NULL, &d, err, sizeof err), 0);
    if (zeroed) CHECK_EQ_INT(dg_image_decode(zeroed, l4, "zeroed", NULL, &e, err, sizeof err), 0);
    CHECK(b && b->width == 29 && b->height == 52);
    CHECK(c && c->width == 29 && c->height == 52);
    CHECK(b && c && memcmp(b->rgb, c->rgb, (size_t)29 * 52 * 3) == 0);
    CHECK(a && d && d->width == 52 && d->height == 29 && memcmp(a->rgb, d->rgb, (size_t)52 * 29 * 3) == 0);
    CHECK(a && e && e->width == 52 && e->height == 29 && memcmp(a->rgb, e->rgb, (size_t)52 * 29 * 3) == 0);
    dg_image_free(e);
    free(zeroed);
    dg_image_free(a);
    dg_image_free(b);
    dg_image_free(c);
    dg_image_free(d);
    free(plain);
    free(only_xmp);
    free(both);
    free(tagged);
}

TEST(encode_png_roundtrip_with_text_chunks) {
    dg_image *img, *back = NULL;
    CHECK_EQ_INT(dg_image_new(37, 23, &img), 0);
    for (int i = 0; i < 37 * 23 * 3; i++)
        img->rgb[i] = (uint8_t)(i * 131 + (i >> 5));
    const dg_kv text[] = {
        {"duogen:job", "job-42"}, {"duogen:seed", "1234567890123"},
        {"duogen:model", "qwen2.5-vl-7b + cosmos-predict2.5"}, {"Comment", "caf\xc3\xa9"},
    };
    uint8_t *png = NULL;
    size_t len = 0;
    char err[256];
    CHECK_EQ_INT(dg_image_encode_png(img, text, 4, &png, &len, err, sizeof err), 0);
    CHECK(png != NULL && len > 8 && memcmp(png, "\x89PNG\r\n\x1a\n", 8) == 0);
    CHECK(memmem(png, len, "tEXtduogen:job\0job-42", 21) != NULL);
    CHECK(memmem(png, len, "tEXtduogen:seed\0" "1234567890123", 29) != NULL);
    CHECK(memmem(png, len, "tEXtduogen:model\0", 17) != NULL);
    CHECK(memmem(png, len, "iTXtComment\0", 12) != NULL);               /* UTF-8 value */
    CHECK_EQ_INT(dg_image_decode(png, len, "roundtrip", NULL, &back, err, sizeof err), 0);
    if (back) {
        CHECK_EQ_INT(back->width, 37);
        CHECK_EQ_INT(back->height, 23);
        CHECK(memcmp(back->rgb, img->rgb, 37 * 23 * 3) == 0);
    }
    free(png);
    dg_image_free(back);
    dg_image_free(img);
}

TEST(encode_png_rejects_bad_keys) {
    dg_image *img;
    CHECK_EQ_INT(dg_image_new(1, 1, &img), 0);
    uint8_t *png = NULL;
    size_t len;
    char err[256];
    const char *bad[] = {"", " lead", "trail ", "two  spaces", "tab\there",
                         "0123456789012345678901234567890123456789012345678901234567890123456789012345678901"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        dg_kv kv = {bad[i], "v"};
        CHECK_EQ_INT(dg_image_encode_png(img, &kv, 1, &png, &len, err, sizeof err), DG_EINVAL);
    }
    CHECK(png == NULL);
    dg_image_free(img);
}

TEST(new_checks_its_size) {
    dg_image *img = NULL;
    CHECK_EQ_INT(dg_image_new(0, 5, &img), DG_EINVAL);
    CHECK_EQ_INT(dg_image_new(5, 65536, &img), DG_EINVAL);
    CHECK(img == NULL);
    dg_image_free(NULL);
}

/* dg_image_peek_size reads the stored size from the header of every golden input (named
 * NAME_WxH[_more].ext by tools/reference/make_image_goldens.py): the decoded size is that, or its
 * sides swapped by an EXIF orientation 5..8. What the header does not tell is DG_EIMAGE. */
TEST(peek_size_reads_the_header_of_every_golden_input) {
    char *man = manifest();
    if (!man)
        return;
    int n = 0, swapped = 0;
    for (char *line = strtok(man, "\n"); line; line = strtok(NULL, "\n")) {
        char name[128];
        int w, h, sw, sh;
        if (sscanf(line, "decode %127s %d %d", name, &w, &h) != 3)
            continue;
        int got = 0;   /* the first "_WxH" of the name (pal_64x48_trns.png, rgb_123x57_422.jpg) */
        for (const char *us = strchr(name, '_'); us && got != 2; us = strchr(us + 1, '_'))
            got = sscanf(us, "_%dx%d", &sw, &sh);
        CHECK_EQ_INT(got, 2);
        size_t dlen;
        uint8_t *data = read_file(name, &dlen);
        int32_t pw = 0, ph = 0;
        CHECK(data != NULL);
        CHECK_EQ_INT(data ? dg_image_peek_size(data, dlen, &pw, &ph) : -99, 0);
        CHECK(pw == sw && ph == sh);
        CHECK((w == pw && h == ph) || (w == ph && h == pw));
        swapped += w != pw;
        free(data);
        n++;
    }
    CHECK(n >= 20);
    CHECK(swapped >= 3);   /* exif5, exif6, exif7, exif8: the stored size, not the shown one */
    free(man);

    int32_t w = -1, h = -1;
    CHECK_EQ_INT(dg_image_peek_size((const uint8_t *)"GIF89a", 6, &w, &h), DG_EIMAGE);
    CHECK_EQ_INT(dg_image_peek_size((const uint8_t *)"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR", 16, &w, &h), DG_EIMAGE);
    CHECK_EQ_INT(dg_image_peek_size((const uint8_t *)"\xff\xd8\xff\xe0", 4, &w, &h), DG_EIMAGE);
    static const uint8_t zero_width[24] = "\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\0\0\0\0\0\x05";
    CHECK_EQ_INT(dg_image_peek_size(zero_width, sizeof zero_width, &w, &h), DG_EIMAGE);
    CHECK(w == -1 && h == -1);
    static const uint8_t big[24] = "\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR\0\0\x1b\x58\0\0\x1b\x58";   /* 7000x7000, no more */
    CHECK_EQ_INT(dg_image_peek_size(big, sizeof big, &w, &h), 0);
    CHECK(w == 7000 && h == 7000);
}

int main(void) { return test_main(); }
