/* sched_warmup.c — one small job through every part of the model before a scheduler serves
 * (dg_sched_warmup, duogen.h): the worker says READY only after it, so a device or package
 * that cannot run a job is found at start, and the first job does not pay for kernels
 * loading and workspaces growing. It is an ordinary request through dg_sched_submit and
 * dg_sched_step: nothing in the scheduler knows it apart. */
#include <stdio.h>
#include <string.h>

#include "scheduler.h"

typedef struct {
    int      done, code;
    char     message[256];
    dg_usage usage;
} warm;

static void warm_text(void *user, const char *delta, size_t len) {}
static void warm_started(void *user, int index, int width, int height, int steps) {}
static void warm_step(void *user, int index, int step, int steps) {}
static void warm_image(void *user, int index, int width, int height, const uint8_t *png, size_t len) {}

static void warm_finished(void *user, dg_finish_reason reason, const dg_usage *usage, const dg_timings *timings) {
    warm *w = user;
    w->done = 1;
    w->usage = *usage;
}

static void warm_failed(void *user, int code, const char *message) {
    warm *w = user;
    w->done = 1;
    w->code = code;
    snprintf(w->message, sizeof w->message, "%s", message);
}

int dg_sched_warmup(dg_sched *s, dg_usage *usage, char *err, size_t errlen) {
    const dg_model *m = s->m;
    if (dg_sched_active(s)) {
        snprintf(err, errlen, "warm-up: needs an idle scheduler (%d active)", dg_sched_active(s));
        return DG_EINVAL;
    }
    /* <BOV> at once where the model draws with it: a picture of the smallest size the DiT
     * takes (the VAE's factor times the patch), one step, the package's guidance */
    const int draws = m->has_draw && m->bov_id >= 0;
    const int side = draws ? dg_vae_spatial_factor(&m->vae) * (m->dit.cfg.patch_h > m->dit.cfg.patch_w
                                                                   ? m->dit.cfg.patch_h : m->dit.cfg.patch_w) : 0;
    dg_part part = {.kind = DG_PART_TEXT, .text = "Hello.", .text_len = 6};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bov = {m->bov_id, 100.0f};
    dg_request r = {.id = "warm-up", .messages = &msg, .n_messages = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 2,
                             .temperature = 0.0f, .logit_bias = draws ? &bov : NULL, .n_logit_bias = (size_t)draws},
                    .image = {.set = DG_IMAGE_MAX_IMAGES | (draws ? DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS : 0),
                              .width = side, .height = side, .steps = 1, .max_images = draws}};
    warm w = {0};
    dg_sched_counts before;   /* the jobs' counts so far: the warm-up's are taken out of them */
    dg_sched_counts_now(s, &before);
    dg_sink sink = {&w, warm_text, warm_started, warm_step, warm_image, warm_finished, warm_failed};
    uint64_t seq;
    char why[256];
    int rc = dg_sched_submit(s, &r, &sink, &seq, why, sizeof why);
    while (rc == 0 && !w.done) rc = dg_sched_step(s, why, sizeof why);
    if (rc == 0 && w.code) rc = w.code, snprintf(why, sizeof why, "%s", w.message);
    /* a package whose weights hold NaN (or whose configs make them: a rope_scale of 0 did)
     * draws black pictures, each job "done": refused here, not served */
    if (rc == 0 && w.usage.nonfinite_images)
        rc = DG_EMODEL, snprintf(why, sizeof why, "its picture came out NaN or infinite (black): the package's DiT, "
                                                  "VAE or connector weights, or their configs");
    dg_sched_counts_skip(s, &before);   /* a worker's figures are its jobs' */
    if (rc < 0) {
        snprintf(err, errlen, "warm-up: %s", why);
        return rc;
    }
    if (usage) *usage = w.usage;
    return 0;
}
