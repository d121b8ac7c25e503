/* A deterministic test engine behind engine/duogen.h, for the daemon's integration tests.
 * It is linked only into build/tests/duogend-fake and never installed.
 *
 * Behaviour, steered by job metadata:
 *   text       "Echo: " and the words of the last user text, one word per step;
 *              max_new_tokens cuts it (finish "length"), FAKE_MAX_NEW_TOKENS when unset
 *              (the fake's package default: dg_sched_defaults)
 *   fake.report=1      the first word reports the submission and the parameters as the
 *                      worker passed them: "params{seq=N;temperature=0;top_p=-;...}", in
 *                      submission order N (1, 2, ... per worker process) and "-" for a
 *                      field whose set bit is clear
 *   fake.images=N      draws N images after the first word (at most max_images, when set):
 *                      image_started, one step event per denoising step, image_done with a
 *                      PNG of the requested size (64x64 and 4 steps unless set)
 *   fake.noise=1       the images are noise from the seed (about 3 bytes a pixel as PNG:
 *                      a large picture's PNG), not the gradient
 *   fake.step_ms=MS    sleeps MS per step (a long job)
 *   fake.end_with_image=1  the answer ends in the step that finishes its last image when
 *                      no words are left ("stop") or max_new_tokens are written ("length"),
 *                      as the real engine's can (it feeds the picture back and samples
 *                      the end in that step)
 *   fake.fail=crash    abort() at step fake.fail_step (default 1): the worker process dies
 *   fake.fail=error    the sequence fails with DG_EINVAL at step fake.fail_step
 *   fake.fail=retry    dg_sched_submit answers DG_EAGAIN (retryable)
 *   fake.fail=fatal    dg_sched_step returns DG_EDEVICE (the worker must exit 75)
 *   fake.fail=submit_fatal  dg_sched_submit returns DG_EDEVICE (the same, found at submit)
 * Images in the request must be PNG (decoded with libpng) or JPEG (signature checked).
 * DG_FAKE_LOAD_MS in the environment makes dg_model_open take that long, reporting
 * progress every 100 ms; DG_FAKE_WARMUP=fail makes dg_sched_warmup fail with DG_EDEVICE,
 * any other value a number of milliseconds it takes (it submits nothing: the submission
 * order fake.report shows starts at the first job). */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "duogen.h"

#define FAKE_MAX_NEW_TOKENS 4096

struct dg_model {
    char describe[256];
};

typedef struct {
    int       live;
    uint64_t  seq;
    dg_sink   sink;
    char    **words;   int n_words, next_word;
    int       max_tokens, tokens;
    int       images_wanted, images_done, image_step, in_image, noise;
    int       width, height, steps;
    int       step_ms;
    int       end_with_image;
    int       fail_mode, fail_step, steps_taken;
    int       cancelled;
    int64_t   deadline_ms;
    uint64_t  seed;
    int64_t   prompt_tokens;
    double    t0;
} fake_seq;

enum { FAIL_NONE, FAIL_CRASH, FAIL_ERROR, FAIL_FATAL };

struct dg_sched {
    fake_seq *seqs;
    int       cap;
    uint64_t  next_seq;
};

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static int64_t unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts)) {}
}

const char *dg_model_describe(const dg_model *m) { return m ? m->describe : "none"; }

/* The fake holds no KV: its scheduler's max_inflight 0 is a fixed number, not the memory's. */

int dg_model_open(const char *dir, const dg_model_opts *o, dg_model **out, char *err, size_t errlen) {
    struct stat st;
    *out = NULL;
    if (!dir || !dir[0] || stat(dir, &st) || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen, "model \"%s\": not a directory", dir ? dir : "");
        return DG_EMODEL;
    }
    const char *load = getenv("DG_FAKE_LOAD_MS");
    int load_ms = load ? atoi(load) : 0;
    for (int t = 0; t < load_ms; t += 100) {
        if (o && o->progress) o->progress(o->progress_user, "weights", (double)t / load_ms);
        sleep_ms(load_ms - t < 100 ? load_ms - t : 100);
    }
    dg_model *m = calloc(1, sizeof *m);
    if (!m) return DG_ENOMEM;
    snprintf(m->describe, sizeof m->describe, "fake test engine (%s)", dir);
    *out = m;
    return 0;
}

void dg_model_close(dg_model *m) { free(m); }

int dg_sched_new(dg_model *m, const dg_sched_opts *o, dg_sched **out, char *err, size_t errlen) {
    (void)m;
    dg_sched *s = calloc(1, sizeof *s);
    if (!s) return DG_ENOMEM;
    s->cap = o && o->max_inflight > 0 ? o->max_inflight : 1;
    s->seqs = calloc((size_t)s->cap, sizeof *s->seqs);
    if (!s->seqs) { free(s); return DG_ENOMEM; }
    *out = s;
    (void)err; (void)errlen;
    return 0;
}

static void seq_clear(fake_seq *q) {
    for (int i = 0; i < q->n_words; i++) free(q->words[i]);
    free(q->words);
    memset(q, 0, sizeof *q);
}

void dg_sched_free(dg_sched *s) {
    if (!s) return;
    for (int i = 0; i < s->cap; i++) seq_clear(&s->seqs[i]);
    free(s->seqs);
    free(s);
}

static const char *meta(const dg_request *r, const char *key) {
    for (size_t i = 0; i < r->n_metadata; i++)
        if (!strcmp(r->metadata[i].key, key)) return r->metadata[i].value;
    return NULL;
}

static int check_image(const uint8_t *p, size_t n, int index, char *err, size_t errlen) {
    static const uint8_t png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    if (n >= 8 && !memcmp(p, png_sig, 8)) {
        png_image img;
        memset(&img, 0, sizeof img);
        img.version = PNG_IMAGE_VERSION;
        if (!png_image_begin_read_from_memory(&img, p, n)) {
            snprintf(err, errlen, "image %d: corrupt PNG: %s", index, img.message);
            return DG_EIMAGE;
        }
        img.format = PNG_FORMAT_RGB;
        uint8_t *buf = malloc(PNG_IMAGE_SIZE(img));
        int ok = buf && png_image_finish_read(&img, NULL, buf, 0, NULL);
        if (!ok) snprintf(err, errlen, "image %d: corrupt PNG: %s", index, img.message);
        free(buf);
        png_image_free(&img);
        return ok ? 0 : DG_EIMAGE;
    }
    if (n >= 3 && p[0] == 0xFF && p[1] == 0xD8 && p[2] == 0xFF) return 0;
    snprintf(err, errlen, "image %d: not a PNG or JPEG (first bytes %02x %02x %02x %02x)", index,
             n > 0 ? p[0] : 0, n > 1 ? p[1] : 0, n > 2 ? p[2] : 0, n > 3 ? p[3] : 0);
    return DG_EIMAGE;
}

static void add_word(fake_seq *q, const char *w, size_t n) {
    q->words = realloc(q->words, (size_t)(q->n_words + 1) * sizeof *q->words);
    q->words[q->n_words++] = strndup(w, n);
}

/* "params{seq=N;max_new_tokens=-;temperature=0;...}": what fake.report=1 puts first. */
static void add_report(fake_seq *q, uint64_t seq, const dg_text_params *t, const dg_image_params *im) {
    char w[512], v[32];
    int n = snprintf(w, sizeof w, "params{seq=%llu", (unsigned long long)seq);
#define FIELD(bits, bit, name, fmt, val) do { \
        if ((bits) & (bit)) snprintf(v, sizeof v, fmt, val); else snprintf(v, sizeof v, "-"); \
        n += snprintf(w + n, sizeof w - (size_t)n, ";%s=%s", name, v); \
    } while (0)
    FIELD(t->set, DG_TEXT_MAX_NEW_TOKENS, "max_new_tokens", "%d", t->max_new_tokens);
    FIELD(t->set, DG_TEXT_TEMPERATURE, "temperature", "%g", t->temperature);
    FIELD(t->set, DG_TEXT_TOP_P, "top_p", "%g", t->top_p);
    FIELD(t->set, DG_TEXT_TOP_K, "top_k", "%d", t->top_k);
    FIELD(t->set, DG_TEXT_REPETITION_PENALTY, "repetition_penalty", "%g", t->repetition_penalty);
    FIELD(im->set, DG_IMAGE_WIDTH, "width", "%d", im->width);
    FIELD(im->set, DG_IMAGE_HEIGHT, "height", "%d", im->height);
    FIELD(im->set, DG_IMAGE_STEPS, "steps", "%d", im->steps);
    FIELD(im->set, DG_IMAGE_GUIDANCE_SCALE, "guidance_scale", "%g", im->guidance_scale);
    FIELD(im->set, DG_IMAGE_MAX_IMAGES, "max_images", "%d", im->max_images);
    FIELD(im->set, DG_IMAGE_SHIFT, "shift", "%g", im->shift);
    FIELD(im->set, DG_IMAGE_SCHEDULE, "schedule", "%s", im->schedule == DG_SCHEDULE_KARRAS ? "karras" : "shifted");
#undef FIELD
    snprintf(w + n, sizeof w - (size_t)n, "}");
    add_word(q, w, strlen(w));
}

int dg_sched_submit(dg_sched *s, const dg_request *r, const dg_sink *sink, uint64_t *seq,
                    char *err, size_t errlen) {
    fake_seq *q = NULL;
    for (int i = 0; i < s->cap && !q; i++) if (!s->seqs[i].live) q = &s->seqs[i];
    if (!q) {
        snprintf(err, errlen, "all %d slots busy", s->cap);
        return DG_EAGAIN;
    }
    const char *fail = meta(r, "fake.fail");
    if (fail && !strcmp(fail, "retry")) {
        snprintf(err, errlen, "fake engine: asked to fail this attempt as retryable");
        return DG_EAGAIN;
    }
    if (fail && !strcmp(fail, "submit_fatal")) {
        snprintf(err, errlen, "fake engine: device lost at submit (asked by the job)");
        return DG_EDEVICE;
    }
    const char *last_text = "";
    size_t last_len = 0;
    int images = 0;
    int64_t prompt = 0;
    for (size_t m = 0; m < r->n_messages; m++)
        for (size_t p = 0; p < r->messages[m].n_parts; p++) {
            const dg_part *part = &r->messages[m].parts[p];
            if (part->kind == DG_PART_IMAGE) {
                int rc = check_image(part->image, part->image_len, ++images, err, errlen);
                if (rc) return rc;
                prompt += 64;
            } else {
                prompt += (int64_t)(part->text_len + 3) / 4;
                if (r->messages[m].role == DG_ROLE_USER) {
                    last_text = part->text;
                    last_len = part->text_len;
                }
            }
        }
    memset(q, 0, sizeof *q);
    const char *v;
    q->seq = ++s->next_seq;
    if ((v = meta(r, "fake.report")) && !strcmp(v, "1")) add_report(q, q->seq, &r->text, &r->image);
    add_word(q, "Echo:", 5);
    for (size_t i = 0; i < last_len;) {
        while (i < last_len && last_text[i] == ' ') i++;
        size_t j = i;
        while (j < last_len && last_text[j] != ' ') j++;
        if (j > i) add_word(q, last_text + i, j - i);
        i = j;
    }
    q->live = 1;
    q->sink = *sink;
    const dg_image_params *im = &r->image;
    q->max_tokens = r->text.set & DG_TEXT_MAX_NEW_TOKENS ? r->text.max_new_tokens : FAKE_MAX_NEW_TOKENS;
    q->images_wanted = (v = meta(r, "fake.images")) ? atoi(v) : 0;
    if (im->set & DG_IMAGE_MAX_IMAGES && q->images_wanted > im->max_images) q->images_wanted = im->max_images;
    q->width = im->set & DG_IMAGE_WIDTH ? im->width : 64;
    q->height = im->set & DG_IMAGE_HEIGHT ? im->height : 64;
    q->steps = im->set & DG_IMAGE_STEPS ? im->steps : 4;
    q->step_ms = (v = meta(r, "fake.step_ms")) ? atoi(v) : 0;
    q->noise = (v = meta(r, "fake.noise")) && !strcmp(v, "1");
    q->end_with_image = (v = meta(r, "fake.end_with_image")) && !strcmp(v, "1");
    q->fail_mode = !fail ? FAIL_NONE : !strcmp(fail, "crash") ? FAIL_CRASH
                 : !strcmp(fail, "error") ? FAIL_ERROR : !strcmp(fail, "fatal") ? FAIL_FATAL : FAIL_NONE;
    q->fail_step = (v = meta(r, "fake.fail_step")) ? atoi(v) : 1;
    q->deadline_ms = r->deadline_unix_ms;
    q->seed = r->seed;
    q->prompt_tokens = prompt;
    q->t0 = now_ms();
    *seq = q->seq;
    return 0;
}

/* A w x h RGB gradient from the seed, or noise (xorshift64 from the seed), as PNG. */
static uint8_t *make_png(int w, int h, uint64_t seed, int index, int noise, size_t *len) {
    uint8_t *rgb = malloc((size_t)w * h * 3);
    if (!rgb) return NULL;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t *p = rgb + ((size_t)y * w + x) * 3;
            p[0] = (uint8_t)(x * 255 / (w > 1 ? w - 1 : 1));
            p[1] = (uint8_t)(y * 255 / (h > 1 ? h - 1 : 1));
            p[2] = (uint8_t)((seed * 37 + (uint64_t)index * 91) & 0xff);
        }
    for (uint64_t i = 0, x = seed * 2654435761u + (uint64_t)index + 1; noise && i < (uint64_t)w * h * 3; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        rgb[i] = (uint8_t)(x >> 32);
    }
    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    img.width = (png_uint_32)w;
    img.height = (png_uint_32)h;
    img.format = PNG_FORMAT_RGB;
    png_alloc_size_t size = 0;
    uint8_t *out = NULL;
    if (png_image_write_to_memory(&img, NULL, &size, 0, rgb, 0, NULL) && (out = malloc(size)) &&
        !png_image_write_to_memory(&img, out, &size, 0, rgb, 0, NULL)) {
        free(out);
        out = NULL;
    }
    free(rgb);
    *len = size;
    return out;
}

static void finish(fake_seq *q, dg_finish_reason reason) {
    dg_usage u = {.prompt_tokens = q->prompt_tokens, .generated_tokens = q->tokens, .images = q->images_done};
    dg_timings t = {.decode_ms = now_ms() - q->t0, .total_ms = now_ms() - q->t0};
    dg_sink sink = q->sink;
    seq_clear(q);
    sink.finished(sink.user, reason, &u, &t);
}

static int step_one(fake_seq *q, char *err, size_t errlen) {
    if (q->step_ms) sleep_ms(q->step_ms);
    q->steps_taken++;
    if (q->cancelled) { finish(q, DG_FINISH_CANCELLED); return 0; }
    if (q->deadline_ms && unix_ms() >= q->deadline_ms) { finish(q, DG_FINISH_DEADLINE); return 0; }
    if (q->fail_mode && q->steps_taken >= q->fail_step) {
        if (q->fail_mode == FAIL_CRASH) abort();   /* a test engine may: it plays a crashing kernel */
        if (q->fail_mode == FAIL_FATAL) {
            snprintf(err, errlen, "fake engine: device lost (asked by the job)");
            return DG_EDEVICE;
        }
        dg_sink sink = q->sink;
        seq_clear(q);
        sink.failed(sink.user, DG_EINVAL, "fake engine: failing as the job asked");
        return 0;
    }
    if (q->in_image) {
        q->image_step++;
        q->sink.step(q->sink.user, q->images_done + 1, q->image_step, q->steps);
        if (q->image_step == q->steps) {
            size_t len = 0;
            uint8_t *png = make_png(q->width, q->height, q->seed, q->images_done + 1, q->noise, &len);
            if (!png) {
                snprintf(err, errlen, "fake engine: PNG encoding failed");
                return DG_ENOMEM;
            }
            q->images_done++;
            q->in_image = 0;
            q->sink.image_done(q->sink.user, q->images_done, q->width, q->height, png, len);
            free(png);
            if (q->end_with_image && q->images_done == q->images_wanted) {
                if (q->next_word >= q->n_words) finish(q, DG_FINISH_STOP);
                else if (q->max_tokens && q->tokens >= q->max_tokens) finish(q, DG_FINISH_LENGTH);
            }
        }
        return 0;
    }
    if (q->next_word >= q->n_words) { finish(q, DG_FINISH_STOP); return 0; }
    if (q->max_tokens && q->tokens >= q->max_tokens) { finish(q, DG_FINISH_LENGTH); return 0; }
    const char *word = q->words[q->next_word];
    const size_t n = strlen(word) + (q->next_word ? 1 : 0);
    char *delta = malloc(n + 1);   /* a word of any length: one delta */
    if (!delta) abort();
    snprintf(delta, n + 1, "%s%s", q->next_word ? " " : "", word);
    q->next_word++;
    q->tokens++;
    q->sink.text(q->sink.user, delta, n);
    free(delta);
    if (q->images_done < q->images_wanted) {
        q->in_image = 1;
        q->image_step = 0;
        q->sink.image_started(q->sink.user, q->images_done + 1, q->width, q->height, q->steps);
    }
    return 0;
}

int dg_sched_step(dg_sched *s, char *err, size_t errlen) {
    for (int i = 0; i < s->cap; i++) {
        if (!s->seqs[i].live) continue;
        int rc = step_one(&s->seqs[i], err, errlen);
        if (rc) return rc;
    }
    return 0;
}

int dg_sched_warmup(dg_sched *s, dg_usage *usage, char *err, size_t errlen) {
    const char *w = getenv("DG_FAKE_WARMUP");
    if (dg_sched_active(s)) {
        snprintf(err, errlen, "warm-up: needs an idle scheduler (%d active)", dg_sched_active(s));
        return DG_EINVAL;
    }
    if (w && !strcmp(w, "fail")) {
        snprintf(err, errlen, "warm-up: the fake device failed");
        return DG_EDEVICE;
    }
    if (w) sleep_ms(atoi(w));
    if (usage) *usage = (dg_usage){.prompt_tokens = 1, .generated_tokens = 1};
    return 0;
}

int dg_sched_cancel(dg_sched *s, uint64_t seq) {
    for (int i = 0; i < s->cap; i++)
        if (s->seqs[i].live && s->seqs[i].seq == seq) {
            s->seqs[i].cancelled = 1;
            return 0;
        }
    return DG_EINVAL;
}

int dg_sched_max_inflight(const dg_sched *s) { return s->cap; }
size_t dg_sched_sized_from(const dg_sched *s) { (void)s; return 0; }   /* no device to read */
int dg_sched_kv_holds(const dg_sched *s) { return 2 * s->cap; }   /* no KV: never short of it */

/* The fake's package defaults: max_new_tokens FAKE_MAX_NEW_TOKENS, and what a real
 * package's duogen.json says for the rest. */
void dg_sched_defaults(const dg_sched *s, dg_text_params *text, dg_image_params *image) {
    (void)s;
    if (text) *text = (dg_text_params){.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE | DG_TEXT_TOP_P |
                                              DG_TEXT_TOP_K | DG_TEXT_REPETITION_PENALTY,
                                       .max_new_tokens = FAKE_MAX_NEW_TOKENS, .temperature = 0.0f,
                                       .top_p = 1.0f, .top_k = 0, .repetition_penalty = 1.0f};
    if (image) *image = (dg_image_params){.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_MAX_IMAGES,
                                          .width = 64, .height = 64, .steps = 4, .max_images = DG_MAX_IMAGES};
}

int dg_sched_active(const dg_sched *s) {
    int n = 0;
    for (int i = 0; i < s->cap; i++) n += s->seqs[i].live;
    return n;
}

void dg_sched_cache_stats(const dg_sched *s, dg_cache_stats *out) {
    (void)s;
    memset(out, 0, sizeof *out);
}

/* The fake has no logit screen. */
void dg_sched_screen_stats(const dg_sched *s, int64_t *screened, int64_t *unscreened) {
    (void)s;
    *screened = *unscreened = 0;
}

/* The fake decodes no drafts. */
void dg_sched_draft_stats(const dg_sched *s, int64_t *drafted, int64_t *kept) {
    (void)s;
    *drafted = *kept = 0;
}
