#include "jobs.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/image.h"

static void event(test_job *c, char e) {
    if (c->n_events < TEST_JOB_MAX_EVENTS - 1) c->events[c->n_events++] = e;
    c->events[c->n_events] = 0;
}

static void on_text(void *u, const char *d, size_t n) {
    test_job *c = u;
    event(c, 't');
    if (c->len + n < sizeof c->text) {
        memcpy(c->text + c->len, d, n);
        c->len += n;
        c->text[c->len] = 0;
    }
}

static void on_started(void *u, int index, int w, int h, int steps) {
    (void)index; (void)w; (void)h; (void)steps;
    event(u, 's');
}

static void on_step(void *u, int index, int step, int steps) {
    (void)index; (void)step; (void)steps;
    event(u, 'p');
}

static void on_done(void *u, int index, int w, int h, const uint8_t *png, size_t len) {
    test_job *c = u;
    (void)index;
    event(c, 'i');
    if (c->n_png < TEST_JOB_MAX_PNGS && (c->png[c->n_png] = malloc(len))) {
        memcpy(c->png[c->n_png], png, len);
        c->png_len[c->n_png] = len;
        c->png_w[c->n_png] = w;
        c->png_h[c->n_png++] = h;
    }
}

static void on_finished(void *u, dg_finish_reason r, const dg_usage *us, const dg_timings *t) {
    test_job *c = u;
    (void)t;
    event(c, 'f');
    c->finished = 1;
    c->reason = r;
    c->usage = *us;
}

static void on_failed(void *u, int code, const char *msg) {
    test_job *c = u;
    event(c, 'x');
    c->finished = 1;
    snprintf(c->error, sizeof c->error, "%s (%s)", msg, dg_error_name(code));
}

dg_sink test_job_sink(test_job *c) {
    return (dg_sink){.user = c, .text = on_text, .image_started = on_started, .step = on_step,
                     .image_done = on_done, .finished = on_finished, .failed = on_failed};
}

int test_job_run(dg_sched *s, const dg_request *r, test_job *c) {
    dg_sink sink = test_job_sink(c);
    return test_job_run_sink(s, r, c, &sink);
}

int test_job_run_sink(dg_sched *s, const dg_request *r, test_job *c, const dg_sink *sink) {
    char err[512];
    uint64_t seq;
    int rc = dg_sched_submit(s, r, sink, &seq, err, sizeof err);
    if (rc) {
        snprintf(c->error, sizeof c->error, "%s", err);
        return rc;
    }
    while (dg_sched_active(s) > 0)
        if (dg_sched_step(s, err, sizeof err) < 0) {
            snprintf(c->error, sizeof c->error, "%s", err);
            return -100;
        }
    return 0;
}

int test_job_same(const test_job *a, const test_job *b) {
    if (a->len != b->len || memcmp(a->text, b->text, a->len) || a->n_png != b->n_png) return 0;
    for (int i = 0; i < a->n_png; i++)
        if (a->png_len[i] != b->png_len[i] || memcmp(a->png[i], b->png[i], a->png_len[i])) return 0;
    return 1;
}

void test_job_free(test_job *c) {
    for (int i = 0; i < c->n_png; i++) free(c->png[i]);
    c->n_png = 0;
}

uint8_t *test_png(int w, int h, int k, size_t *len) {
    dg_image *img;
    uint8_t *png = NULL;
    char err[128];
    *len = 0;
    if (dg_image_new(w, h, &img)) return NULL;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            uint8_t *p = img->rgb + ((size_t)y * w + x) * 3;
            p[0] = (uint8_t)(x * 255 / w);
            p[1] = (uint8_t)(y * 255 / h);
            p[2] = (uint8_t)(k * 80);
        }
    if (dg_image_encode_png(img, NULL, 0, &png, len, err, sizeof err) < 0) png = NULL;
    dg_image_free(img);
    return png;
}
