/* Allocation failures. Each operation below is run again and again with its n-th allocation
 * failing, for every n up to the number of allocations a run without failures makes (or a
 * spread of them where it makes thousands): it must return its error (never crash, abort or
 * free twice), free what it allocated, and the same call afterwards must give what a run
 * without failures gives. The operations: image decoding (PNG, JPEG), resizing (each pass
 * order), the vision preprocessing, PNG encoding, opening a tokenizer and the shipped shapes
 * package, making a scheduler, and whole jobs on it, one and two at once: a failure there
 * must fail the job (or refuse it at its submit), never the scheduler or the other job.
 *
 * The binary is linked with -Wl,--wrap for the allocation functions (Makefile), so the calls
 * counted and failed are the engine's own and the tests' (but the test sink's copies of the
 * PNGs, exempt), and libpng's and its zlib's, which the engine hands its own allocator
 * (png_create_*_struct_2); another library's internal allocations (libjpeg, jansson,
 * OpenBLAS, libgomp) are not (libjpeg's failing is tests/test_image.c's
 * decode_jpeg_out_of_memory_in_libjpeg_is_enomem).
 * A double free aborts in glibc's checks; a leak is an allocation made during the failed
 * call that is still live after it. */
#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "duogen.h"
#include "io/image.h"
#include "io/image_preprocess.h"
#include "text/tokenizer.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define PKG "tools/train/shapes"
#define IMAGES "tests/golden/image"

/* ---- the wrapped allocator --------------------------------------------------------------- */

void *__real_malloc(size_t n);
void *__real_calloc(size_t k, size_t n);
void *__real_realloc(void *p, size_t n);
void  __real_free(void *p);
int   __real_posix_memalign(void **p, size_t align, size_t n);
char *__real_strdup(const char *s);
char *__real_strndup(const char *s, size_t n);

static atomic_long calls;        /* allocations since arm() */
static atomic_long fail_at;      /* the call that fails (1-based); 0: none */
static atomic_int failed;        /* the armed failure happened */
static _Thread_local int exempt; /* the test's own allocations (its sink's copies): neither counted nor failed */

/* The live allocations made since arm(): an open-addressed set of pointers (tombstones
 * where freed), under a mutex (engine threads allocate too). Half of it may be live: the
 * Qwen2 vocab.json parsed by jansson holds about 460,000 blocks at once. */
#define LIVE_BITS  21
#define LIVE_SLOTS (1 << LIVE_BITS)
#define TOMB ((void *)1)
static void **live;
static long n_live;
static int recording;
static pthread_mutex_t live_mu = PTHREAD_MUTEX_INITIALIZER;

static size_t slot_of(const void *p) { return (size_t)(((uintptr_t)p >> 4) * 0x9E3779B97F4A7C15ull >> (64 - LIVE_BITS)); }

static long n_tomb;

/* Puts the live pointers back without tombstones (they only lengthen the probes). */
static void live_rehash(void) {
    void **keep = __real_malloc((size_t)n_live * sizeof *keep + 1);
    if (!keep) abort();
    long n = 0;
    for (size_t i = 0; i < LIVE_SLOTS; i++)
        if (live[i] && live[i] != TOMB) keep[n++] = live[i];
    memset(live, 0, LIVE_SLOTS * sizeof *live);
    for (long j = 0; j < n; j++) {
        size_t i = slot_of(keep[j]);
        while (live[i]) i = (i + 1) & (LIVE_SLOTS - 1);
        live[i] = keep[j];
    }
    n_tomb = 0;
    __real_free(keep);
}

static void live_add(void *p) {
    if (!p) return;
    pthread_mutex_lock(&live_mu);
    if (recording) {
        if (n_live + n_tomb > LIVE_SLOTS / 2) live_rehash();
        if (n_live >= LIVE_SLOTS / 2) abort();   /* more live blocks than this test expects */
        for (size_t i = slot_of(p), tries = 0; tries < LIVE_SLOTS; i = (i + 1) & (LIVE_SLOTS - 1), tries++)
            if (!live[i] || live[i] == TOMB) {
                n_tomb -= live[i] == TOMB;
                live[i] = p;
                n_live++;
                break;
            }
    }
    pthread_mutex_unlock(&live_mu);
}

/* Whether p was recorded (and is not any more). */
static int live_remove(void *p) {
    if (!p) return 0;
    int had = 0;
    pthread_mutex_lock(&live_mu);
    if (recording) {
        for (size_t i = slot_of(p), tries = 0; live[i] && tries < LIVE_SLOTS; i = (i + 1) & (LIVE_SLOTS - 1), tries++)
            if (live[i] == p) {
                live[i] = TOMB;
                n_tomb++;
                n_live--;
                had = 1;
                break;
            }
    }
    pthread_mutex_unlock(&live_mu);
    return had;
}

/* Whether this allocation is the one to fail. */
static int fails(void) {
    if (exempt) return 0;
    long c = atomic_fetch_add(&calls, 1) + 1;
    if (c == atomic_load(&fail_at)) {
        atomic_store(&failed, 1);
        return 1;
    }
    return 0;
}

void *__wrap_malloc(size_t n) {
    if (fails()) return NULL;
    void *p = __real_malloc(n);
    live_add(p);
    return p;
}

void *__wrap_calloc(size_t k, size_t n) {
    if (fails()) return NULL;
    void *p = __real_calloc(k, n);
    live_add(p);
    return p;
}

/* A block that was live before arm() and grows stays out of the set (it is not the call's). */
void *__wrap_realloc(void *p, size_t n) {
    if (fails()) return NULL;
    const int had = live_remove(p);
    void *q = __real_realloc(p, n);
    if (!q && had) live_add(p);
    else if (q && (had || !p)) live_add(q);
    return q;
}

void __wrap_free(void *p) {
    live_remove(p);
    __real_free(p);
}

int __wrap_posix_memalign(void **p, size_t align, size_t n) {
    if (fails()) return ENOMEM;
    int rc = __real_posix_memalign(p, align, n);
    if (!rc) live_add(*p);
    return rc;
}

char *__wrap_strdup(const char *s) {
    if (fails()) return NULL;
    char *p = __real_strdup(s);
    live_add(p);
    return p;
}

char *__wrap_strndup(const char *s, size_t n) {
    if (fails()) return NULL;
    char *p = __real_strndup(s, n);
    live_add(p);
    return p;
}

/* Counts from here, failing call n (0: none), recording what is allocated. */
static void arm(long n) {
    pthread_mutex_lock(&live_mu);
    if (!live) live = __real_calloc(LIVE_SLOTS, sizeof *live);
    memset(live, 0, LIVE_SLOTS * sizeof *live);
    n_live = n_tomb = 0;
    recording = 1;
    pthread_mutex_unlock(&live_mu);
    atomic_store(&failed, 0);
    atomic_store(&calls, 0);
    fail_at = n;
}

/* Stops; the allocations counted, and through *leaked those still live. */
static long disarm(long *leaked) {
    fail_at = 0;
    pthread_mutex_lock(&live_mu);
    recording = 0;
    *leaked = n_live;
    pthread_mutex_unlock(&live_mu);
    return atomic_load(&calls);
}

/* ---- the sweep ------------------------------------------------------------------------------ */

/* One operation: run() does it (0 or its error), keep() hands what it made to the case
 * (compared with the first run's), drop() frees it. */
typedef struct {
    const char *name;
    int  says;                  /* its API has an error message (else only the code is checked) */
    int  (*run)(void *ctx, char *err, size_t errlen);
    void (*drop)(void *ctx);
    int  (*same)(void *ctx);    /* 1 when the result equals the reference (a run without failures) */
    void *ctx;
} op;

/* Every n from 1 to the count of a clean run when it is at most `all`, else 1..all and
 * then `spread` more spaced evenly. */
static void sweep(const op *o, long all, long spread) {
    char err[512];
    long leaked;
    arm(0);
    int rc = o->run(o->ctx, err, sizeof err);
    long total = disarm(&leaked);
    if (rc) {
        test_fail(__FILE__, __LINE__, "%s: fails without a failed allocation: %d %s", o->name, rc, err);
        return;
    }
    CHECK(o->same(o->ctx));
    o->drop(o->ctx);
    CHECK(total > 0);
    int bad = 0;
    long tried = 0;
    for (long k = 1; k <= total && bad < 3; k = k < all ? k + 1 : k + (total - all) / spread + 1) {
        tried++;
        err[0] = 0;
        arm(k);
        rc = o->run(o->ctx, err, sizeof err);
        disarm(&leaked);
        if (rc == 0) {
            /* a failure the operation absorbed (an optional cache), or none (a run that
             * allocated less): its result must be right */
            if (!o->same(o->ctx)) {
                test_fail(__FILE__, __LINE__, "%s: allocation %ld of %ld failed: wrong result", o->name, k, total);
                bad++;
            }
            o->drop(o->ctx);
            continue;
        }
        if (!atomic_load(&failed)) {
            test_fail(__FILE__, __LINE__, "%s: failed (%d \"%s\") with no allocation failed", o->name, rc, err);
            bad++;
        } else if (rc != DG_ENOMEM || (o->says && !err[0])) {
            test_fail(__FILE__, __LINE__, "%s: allocation %ld of %ld failed: %d \"%s\" (want DG_ENOMEM and a message)",
                      o->name, k, total, rc, err);
            bad++;
        }
        /* a failed operation left nothing */
        if (leaked) {
            test_fail(__FILE__, __LINE__, "%s: allocation %ld of %ld failed: %ld allocations leaked", o->name, k, total,
                      leaked);
            bad++;
        }
    }
    arm(0);
    rc = o->run(o->ctx, err, sizeof err);
    disarm(&leaked);
    CHECK_EQ_INT(rc, 0);
    if (!rc) {
        CHECK(o->same(o->ctx));
        o->drop(o->ctx);
    }
    printf("  %s: %ld allocations, %ld of them failed in turn\n", o->name, total, tried);
}

/* ---- images --------------------------------------------------------------------------------- */

typedef struct {
    uint8_t        *bytes;
    size_t          len;
    dg_image       *in, *img;       /* the input of resize and patches; the result */
    int32_t         w, h;           /* resize's size */
    dg_image_patches *patches;
    uint8_t        *png;
    size_t          png_len;
    void           *want;           /* the reference's bytes (an image's digest, patches, a PNG) */
    size_t          want_len;
} image_ctx;

/* Whether got[0..len) is the reference; the first call's bytes become it (sweep()'s first
 * run has no failure). */
static int same_bytes(image_ctx *c, const void *got, size_t len) {
    if (!c->want) {
        if (!(c->want = malloc(len))) return 0;
        memcpy(c->want, got, len);
        c->want_len = len;
    }
    return len == c->want_len && !memcmp(got, c->want, len);
}

/* Frees whichever result the operation made (an image, patches or a PNG). */
static void image_drop(void *v) {
    image_ctx *c = v;
    dg_image_free(c->img);
    dg_image_patches_free(c->patches);
    free(c->png);
    c->img = NULL;
    c->patches = NULL;
    c->png = NULL;
}

static int image_same(void *v) {
    image_ctx *c = v;
    dg_image_digest d;
    dg_image_hash(c->img, &d);
    return same_bytes(c, &d, sizeof d);
}

static int run_decode(void *v, char *err, size_t errlen) {
    image_ctx *c = v;
    return dg_image_decode(c->bytes, c->len, "the input", NULL, &c->img, err, errlen);
}

static int run_resize(void *v, char *err, size_t errlen) {
    image_ctx *c = v;
    snprintf(err, errlen, "(dg_image_resize has no message)");
    return dg_image_resize(c->in, c->w, c->h, &c->img);
}

static void decode_case(const char *file) {
    image_ctx c = {0};
    c.bytes = test_read_file(IMAGES, file, &c.len);
    CHECK(c.bytes != NULL);
    if (!c.bytes) return;
    char name[128];
    snprintf(name, sizeof name, "decode %s", file);
    sweep(&(op){name, 1, run_decode, image_drop, image_same, &c}, 1000, 100);
    free(c.bytes);
    free(c.want);
}

TEST(decode_png) { decode_case("rgb_200x150.png"); }
TEST(decode_png_palette) { decode_case("pal_64x48_trns.png"); }
TEST(decode_jpeg_exif) { decode_case("exif6_77x41.jpg"); }
TEST(decode_png_exif) { decode_case("exif8_60x35.png"); }

/* A PNG whose orientation (6: rotate 90 clockwise) is in ImageMagick's "Raw profile type
 * exif" text, the hex of a little-endian TIFF whose IFD0 holds the tag: the decoding turns
 * it (40x30 -> 30x40), and without the memory to read the hex it fails, never returning the
 * image unturned. */
TEST(decode_png_raw_profile) {
    static const char raw[] = "\nexif\n      26\n49492a0008000000010012010300010000000600000000000000\n";
    const dg_kv text[1] = {{"Raw profile type exif", raw}};
    image_ctx c = {0};
    dg_image *img = NULL;
    char err[256];
    CHECK(dg_image_new(40, 30, &img) == 0);
    if (!img) return;
    for (size_t i = 0; i < (size_t)40 * 30 * 3; i++) img->rgb[i] = (uint8_t)(i * 13);
    CHECK(dg_image_encode_png(img, text, 1, &c.bytes, &c.len, err, sizeof err) == 0);
    dg_image_free(img);
    if (!c.bytes) return;
    CHECK(dg_image_decode(c.bytes, c.len, NULL, NULL, &c.img, err, sizeof err) == 0);
    CHECK(c.img && c.img->width == 30 && c.img->height == 40);
    image_drop(&c);
    sweep(&(op){"decode a PNG with a raw EXIF profile", 1, run_decode, image_drop, image_same, &c}, 1000, 100);
    free(c.bytes);
    free(c.want);
}
TEST(decode_jpeg_cmyk) { decode_case("cmyk_64x40.jpg"); }

/* test_png's w x h gradient k, decoded (made before a sweep, so not swept), or NULL. */
static dg_image *gradient(int w, int h, int k) {
    size_t len;
    uint8_t *png = test_png(w, h, k, &len);
    dg_image *img = NULL;
    char err[256];
    CHECK(png && dg_image_decode(png, len, NULL, NULL, &img, err, sizeof err) == 0);
    free(png);
    return img;
}

/* Both axes horizontal first, both vertical first (the height shrinks by more than twice
 * the width's pixels: Pillow's order), one axis each way. */
TEST(resize) {
    image_ctx c = {.in = gradient(90, 70, 3)};
    if (!c.in) return;
    const int32_t sizes[][2] = {{140, 50}, {80, 20}, {45, 70}, {90, 131}};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        char name[64];
        snprintf(name, sizeof name, "resize 90x70 to %dx%d", sizes[i][0], sizes[i][1]);
        c.w = sizes[i][0];
        c.h = sizes[i][1];
        free(c.want);
        c.want = NULL;
        sweep(&(op){name, 0, run_resize, image_drop, image_same, &c}, 1000, 100);
    }
    free(c.want);
    dg_image_free(c.in);
}

static int run_patches(void *v, char *err, size_t errlen) {
    image_ctx *c = v;
    dg_image_preprocess_config cfg;
    dg_image_preprocess_config_default(&cfg);
    return dg_image_patches_new(c->in, &cfg, &c->patches, err, errlen);
}

static int patches_same(void *v) {
    image_ctx *c = v;
    const dg_image_patches *p = c->patches;
    return same_bytes(c, p->pixel_values, (size_t)p->grid_t * p->grid_h * p->grid_w * p->patch_dim * sizeof(float));
}

/* The vision preprocessing of an image that it resizes (100x80 -> 112x84). */
TEST(vision_patches) {
    image_ctx c = {.in = gradient(100, 80, 5)};
    if (!c.in) return;
    sweep(&(op){"vision patches 100x80", 1, run_patches, image_drop, patches_same, &c}, 1000, 100);
    dg_image_free(c.in);
    free(c.want);
}

static int run_encode(void *v, char *err, size_t errlen) {
    image_ctx *c = v;
    const dg_kv text[2] = {{"job", "alloc-fail"}, {"Description", "a circle \xc3\xa0 gauche"}};   /* tEXt, iTXt */
    return dg_image_encode_png(c->in, text, 2, &c->png, &c->png_len, err, errlen);
}

static int encode_same(void *v) {
    image_ctx *c = v;
    return same_bytes(c, c->png, c->png_len);
}

TEST(encode_png) {
    image_ctx c = {0};
    CHECK(dg_image_new(64, 48, &c.in) == 0);
    if (!c.in) return;
    for (size_t i = 0; i < (size_t)64 * 48 * 3; i++) c.in->rgb[i] = (uint8_t)(i * 7);
    sweep(&(op){"encode png with text", 1, run_encode, image_drop, encode_same, &c}, 1000, 100);
    dg_image_free(c.in);
    free(c.want);
}

/* ---- a tokenizer, the shapes package -------------------------------------------------------- */

/* Why the package cases cannot run (the shapes package is committed; a checkout without it
 * would be a broken one), or NULL. */
static const char *no_package(void) {
    struct stat st;
    return stat(PKG "/duogen.json", &st) ? "no shapes package at " PKG : NULL;
}

typedef struct {
    const char *dir;
    dg_tok     *tok;
    dg_tok_ids  want;
} tok_ctx;

static int run_tok(void *v, char *err, size_t errlen) {
    tok_ctx *c = v;
    return dg_tok_open(c->dir, &c->tok, err, errlen);
}

static void tok_drop(void *v) {
    tok_ctx *c = v;
    dg_tok_close(c->tok);
    c->tok = NULL;
}

static int tok_same(void *v) {
    tok_ctx *c = v;
    static const char text[] = "<|im_start|>user\nDraw a small red circle at the top left.<|im_end|>\n";
    dg_tok_ids ids = {0};
    char err[256];
    if (dg_tok_encode(c->tok, text, sizeof text - 1, &ids, err, sizeof err)) return 0;
    int same;
    if (!c->want.ids) {
        c->want = ids;
        return ids.n > 0;
    }
    same = ids.n == c->want.n && !memcmp(ids.ids, c->want.ids, ids.n * sizeof *ids.ids);
    dg_tok_ids_free(&ids);
    return same;
}

TEST(tokenizer_open) {
    if (no_package()) SKIP("%s", no_package());
    tok_ctx c = {.dir = PKG "/mllm"};
    sweep(&(op){"tokenizer of " PKG, 1, run_tok, tok_drop, tok_same, &c}, 400, 200);
    dg_tok_ids_free(&c.want);
}

/* The published Qwen2 vocabulary (vocab.json, merges.txt, tokenizer_config.json: 151,643
 * tokens and 151,387 merges), as a package of published weights has it. */
TEST(tokenizer_open_qwen2) {
    tok_ctx c = {.dir = "tools/mkmodel/vocab/qwen2"};
    sweep(&(op){"tokenizer of the Qwen2 vocabulary", 1, run_tok, tok_drop, tok_same, &c}, 60, 20);   /* 0.2 s an opening */
    dg_tok_ids_free(&c.want);
}

typedef struct {
    dg_model *m;
} model_ctx;

static int run_model(void *v, char *err, size_t errlen) {
    return dg_model_open(PKG, &(dg_model_opts){.device = "cpu", .threads = 1}, &((model_ctx *)v)->m, err, errlen);
}

static void model_drop(void *v) {
    model_ctx *c = v;
    dg_model_close(c->m);
    c->m = NULL;
}

/* Opened is all this case asks (what it computes is the other tests'; the job case below
 * runs jobs on a model opened here) */
static int model_same(void *v) { return ((model_ctx *)v)->m != NULL; }

TEST(model_open) {
    if (no_package()) SKIP("%s", no_package());
    model_ctx c = {0};
    sweep(&(op){"dg_model_open " PKG, 1, run_model, model_drop, model_same, &c}, 300, 200);
}

/* ---- whole jobs ----------------------------------------------------------------------------- */

/* test_job_sink's callbacks, its PNG copies exempt */
static dg_sink job_inner;

static void done_exempt(void *u, int index, int w, int h, const uint8_t *png, size_t len) {
    exempt++;
    job_inner.image_done(u, index, w, h, png, len);
    exempt--;
}

static int job_run(dg_sched *s, const dg_request *r, test_job *c) {
    job_inner = test_job_sink(c);
    dg_sink sink = job_inner;
    sink.image_done = done_exempt;
    return test_job_run_sink(s, r, c, &sink);
}

/* The edit job both job cases run: the golden edit's given picture and an edit of it. */
typedef struct {
    uint8_t   *png;             /* owned */
    dg_part    parts[2];
    dg_message msg;
    dg_request r;
} edit_job;

static int edit_job_make(edit_job *e) {
    static const char text[] = "Make the green triangle blue.";
    size_t len;
    *e = (edit_job){.png = test_read_file("tests/golden/shapes", "edit_in.png", &len)};
    CHECK(e->png != NULL);
    if (!e->png) return -1;
    e->parts[0] = (dg_part){.kind = DG_PART_IMAGE, .image = e->png, .image_len = len};
    e->parts[1] = (dg_part){.kind = DG_PART_TEXT, .text = text, .text_len = sizeof text - 1};
    e->msg = (dg_message){DG_ROLE_USER, e->parts, 2};
    e->r = (dg_request){.id = "edit", .messages = &e->msg, .n_messages = 1, .seed = 7,
                        .image = {.set = DG_IMAGE_STEPS, .steps = 4}};
    return 0;
}

/* How a job came out of a run with a failed allocation: 1 when it failed as it should (refused
 * at its submit, submit_rc, or failed with ENOMEM, which the daemon retries, and a message),
 * 0 when it finished with the reference's answer, -1 (a test failure) otherwise. */
static int outcome(long k, int submit_rc, const test_job *got, const test_job *want) {
    if (submit_rc || got->error[0]) {
        if ((submit_rc && submit_rc != DG_ENOMEM) || !got->error[0] ||
            (!submit_rc && (!strchr(got->events, 'x') || !strstr(got->error, "(ENOMEM)")))) {
            test_fail(__FILE__, __LINE__, "allocation %ld failed: %d \"%s\", events %s (want ENOMEM and a message)", k,
                      submit_rc, got->error, got->events);
            return -1;
        }
        return 1;
    }
    if (!got->finished || !test_job_same(got, want)) {
        test_fail(__FILE__, __LINE__, "allocation %ld failed: the job %s", k,
                  got->finished ? "finished with another answer" : "never ended");
        return -1;
    }
    return 0;
}

/* An edit job (an input image, text, a drawn picture) with the n-th allocation failing, for
 * every n: of a fresh scheduler's making and its first job (warm 0), or of the job on a
 * scheduler that ran it once already (warm 1: the image's vision rows, its latent and the
 * prompt's KV blocks come from the caches). dg_sched_new fails with its message, or the job
 * is refused at its submit or fails with ENOMEM and a message, or it finishes with the
 * reference's answer (a failure a cache absorbs); the scheduler goes on (the job again,
 * without failures, gives the reference's answer). Everything allocated from the model's
 * opening to its closing is freed. */
static void jobs_sweep(int warm) {
    if (no_package()) SKIP("%s", no_package());
    char err[512];
    edit_job e;
    if (edit_job_make(&e)) return;
    const dg_request r = e.r;
    const dg_sched_opts so = {.max_inflight = 2};

    long leaked;
    arm(0);   /* recording from here to the model's closing */
    dg_model *m = NULL;
    int rc = dg_model_open(PKG, &(dg_model_opts){.device = "cpu", .threads = 1}, &m, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    test_job want = {0};
    long total = 0;
    if (!rc) {
        /* the reference, and how many allocations the swept part makes */
        dg_sched *s = NULL;
        long first = atomic_load(&calls);
        rc = dg_sched_new(m, &so, &s, err, sizeof err);
        CHECK_EQ_INT(rc, 0);
        if (!rc) rc = job_run(s, &r, &want);
        if (!rc && warm) {
            test_job again = {0};
            first = atomic_load(&calls);
            rc = job_run(s, &r, &again);
            CHECK(test_job_same(&again, &want));
            test_job_free(&again);
        }
        total = atomic_load(&calls) - first;
        CHECK_EQ_INT(rc, 0);
        CHECK(want.finished && !want.error[0] && want.n_png == 1);
        dg_sched_free(s);
    }
    int refused = 0, failed_jobs = 0, absorbed = 0, bad = 0;
    long k = 1;
    for (; !rc && k <= total && bad < 3; k++) {
        dg_sched *s = NULL;
        test_job got = {0};
        err[0] = 0;
        int r1 = warm ? dg_sched_new(m, &so, &s, err, sizeof err) : 0;
        if (!r1 && warm) {
            r1 = job_run(s, &r, &got);   /* the caches filled */
            test_job_free(&got);
            memset(&got, 0, sizeof got);
            CHECK_EQ_INT(r1, 0);
        }
        atomic_store(&failed, 0);
        atomic_store(&calls, 0);
        fail_at = k;
        if (!warm) r1 = dg_sched_new(m, &so, &s, err, sizeof err);
        int r2 = r1 ? 0 : job_run(s, &r, &got);
        fail_at = 0;
        if (r1) {
            refused++;
            if (warm || r1 != DG_ENOMEM || !err[0]) {
                test_fail(__FILE__, __LINE__, "allocation %ld failed: dg_sched_new said %d \"%s\"", k, r1, err);
                bad++;
            }
            dg_sched_free(s);
            continue;
        }
        if (r2 == -100) {
            test_fail(__FILE__, __LINE__, "allocation %ld of %ld failed: the scheduler failed (%s)", k, total, got.error);
            bad++;
        } else {
            const int o = outcome(k, r2, &got, &want);
            bad += o < 0;
            failed_jobs += o > 0;
            absorbed += !o && atomic_load(&failed);
            test_job after = {0};
            if (job_run(s, &r, &after) || !test_job_same(&after, &want)) {
                test_fail(__FILE__, __LINE__, "after allocation %ld failed, the next job: %s", k,
                          after.error[0] ? after.error : "another answer");
                bad++;
            }
            test_job_free(&after);
        }
        test_job_free(&got);
        dg_sched_free(s);
    }
    printf("  %s: %ld allocations, %ld of them failed in turn: dg_sched_new failed %d times, the job %d, "
           "absorbed %d\n", warm ? "the job from the caches" : "a scheduler and its first job", total, k - 1, refused,
           failed_jobs, absorbed);
    CHECK(failed_jobs > 0);
    CHECK(warm || refused > 0);
    test_job_free(&want);
    dg_model_close(m);
    disarm(&leaked);
    CHECK_EQ_INT(leaked, 0);
    free(e.png);
}

TEST(jobs) { jobs_sweep(0); }
TEST(jobs_from_the_caches) { jobs_sweep(1); }

/* Two jobs at once on one scheduler (an edit and a two-step drawing, in the same forwards), the
 * n-th allocation of a fresh scheduler's first pair failing: each job is refused at its
 * submit or fails with a message, or finishes with its reference answer; the other job is
 * not taken down with it, and the pair again gives the reference answers. */
static int pair_run(dg_sched *s, const dg_request *r[2], test_job got[2], int submit_rc[2]) {
    char err[512];
    dg_sink sink[2];
    for (int j = 0; j < 2; j++) {
        job_inner = test_job_sink(&got[j]);
        sink[j] = job_inner;
        sink[j].image_done = done_exempt;
        uint64_t seq;
        if ((submit_rc[j] = dg_sched_submit(s, r[j], &sink[j], &seq, err, sizeof err)))
            snprintf(got[j].error, sizeof got[j].error, "%s", err);
    }
    while (dg_sched_active(s) > 0)
        if (dg_sched_step(s, err, sizeof err) < 0) {
            snprintf(got[0].error, sizeof got[0].error, "%s", err);
            return -100;
        }
    return 0;
}

TEST(two_jobs_at_once) {
    if (no_package()) SKIP("%s", no_package());
    char err[512];
    edit_job e;
    if (edit_job_make(&e)) return;
    /* the second asks for two steps: its second picture is conditioned on its first */
    static const char draw[] = "Show me step by step how to draw a small red circle at the top left and a blue "
                               "square in the center.";
    dg_part pb[1] = {{.kind = DG_PART_TEXT, .text = draw, .text_len = sizeof draw - 1}};
    dg_message mb = {DG_ROLE_USER, pb, 1};
    const dg_request rb = {.id = "draw", .messages = &mb, .n_messages = 1, .seed = 8,
                           .image = {.set = DG_IMAGE_STEPS, .steps = 4}};
    const dg_request *r[2] = {&e.r, &rb};
    const dg_sched_opts so = {.max_inflight = 2, .draft_tokens = 2};   /* drafts on: their paths too */
    dg_model *m = NULL;
    dg_sched *s = NULL;
    int rc = dg_model_open(PKG, &(dg_model_opts){.device = "cpu", .threads = 1}, &m, err, sizeof err);
    CHECK_EQ_INT(rc, 0);
    test_job want[2] = {{0}};
    int src[2];
    long total = 0, leaked;
    if (!rc) rc = dg_sched_new(m, &so, &s, err, sizeof err);
    if (!rc) {
        arm(0);
        rc = pair_run(s, r, want, src);
        total = disarm(&leaked);
        CHECK(!rc && !src[0] && !src[1]);
        CHECK(want[0].finished && !want[0].error[0] && want[0].n_png == 1);
        CHECK(want[1].finished && !want[1].error[0] && want[1].n_png == 2);
        dg_sched_free(s);
        s = NULL;
    }
    int failed_jobs = 0, both = 0, bad = 0, tried = 0;
    /* every allocation of the first 60 (the submits, the first forwards), then every fifth
     * (the later ones repeat per step; the single-job case above fails each) */
    for (long k = 1; !rc && k <= total && bad < 3; k += k < 60 ? 1 : 5) {
        tried++;
        if ((rc = dg_sched_new(m, &so, &s, err, sizeof err))) break;
        test_job got[2] = {{0}};
        arm(k);
        int r2 = pair_run(s, r, got, src);
        disarm(&leaked);
        if (r2) {
            test_fail(__FILE__, __LINE__, "allocation %ld of %ld failed: the scheduler failed (%s)", k, total, got[0].error);
            bad++;
        }
        int o[2] = {0, 0};
        for (int j = 0; j < 2; j++) {
            if (!r2) o[j] = outcome(k, src[j], &got[j], &want[j]);
            bad += o[j] < 0;
            failed_jobs += o[j] > 0;
            test_job_free(&got[j]);
        }
        both += o[0] > 0 && o[1] > 0;
        if (!r2) {
            test_job again[2] = {{0}};
            if (pair_run(s, r, again, src) || src[0] || src[1] || !test_job_same(&again[0], &want[0]) ||
                !test_job_same(&again[1], &want[1])) {
                test_fail(__FILE__, __LINE__, "after allocation %ld failed, the next pair: %s %s", k, again[0].error,
                          again[1].error);
                bad++;
            }
            test_job_free(&again[0]);
            test_job_free(&again[1]);
        }
        dg_sched_free(s);
        s = NULL;
    }
    printf("  two jobs at once: %ld allocations, %d of them failed in turn: %d jobs failed, both at once %d times\n",
           total, tried, failed_jobs, both);
    CHECK(failed_jobs > 0);
    /* a failed allocation fails one job at most: its neighbour in the batch finishes */
    CHECK_EQ_INT(both, 0);
    test_job_free(&want[0]);
    test_job_free(&want[1]);
    dg_sched_free(s);
    dg_model_close(m);
    free(e.png);
}

int main(void) { return test_main(); }
