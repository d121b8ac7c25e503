/* bench_obs.c — what a benchmark's job told its sink (bench.h). */
#include <stdio.h>
#include <string.h>

#include "bench.h"

static void on_text(void *u, const char *d, size_t n) {
    bench_obs *o = u;
    if (o->len + n < sizeof o->text) {
        memcpy(o->text + o->len, d, n);
        o->len += n;
    }
}
static void on_image_started(void *u, int index, int w, int h, int steps) {
    (void)w; (void)h; (void)steps;
    if (index >= 1 && index <= BENCH_OBS_IMAGES) ((bench_obs *)u)->start_ms[index - 1] = bench_now_ms();
}
static void on_step(void *u, int index, int step, int steps) {
    (void)step; (void)steps;
    if (index >= 1 && index <= BENCH_OBS_IMAGES) ((bench_obs *)u)->last_step_ms[index - 1] = bench_now_ms();
}
static void on_image_done(void *u, int i, int w, int h, const uint8_t *png, size_t len) {
    (void)i; (void)w; (void)h; (void)png; (void)len;
    ((bench_obs *)u)->images++;
}
static void on_finished(void *u, dg_finish_reason r, const dg_usage *us, const dg_timings *t) {
    bench_obs *o = u;
    (void)r;
    o->done = 1;
    o->usage = *us;
    o->t = *t;
    o->done_ms = bench_now_ms();
}
static void on_failed(void *u, int code, const char *msg) {
    bench_obs *o = u;
    o->done = o->failed = 1;
    o->code = code;
    snprintf(o->message, sizeof o->message, "%s", msg);
}

dg_sink bench_obs_sink(bench_obs *o) {
    memset(o, 0, sizeof *o);
    return (dg_sink){o, on_text, on_image_started, on_step, on_image_done, on_finished, on_failed};
}
