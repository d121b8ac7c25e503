/* params.c — presence and defaults of a request's parameters (params.h). */
#include "params.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define BAD(...) do { snprintf(err, errlen, __VA_ARGS__); return DG_EINVAL; } while (0)

int dg_params_resolve_text(const dg_text_params *req, const dg_text_params *defaults, dg_text_params *out,
                           char *err, size_t errlen) {
    uint32_t set = req->set;
    *out = *defaults;
    out->set = DG_TEXT_ALL;
    out->stop = req->stop;
    out->n_stop = req->n_stop;
    for (size_t i = 0; i < req->n_stop; i++) {   /* a match would cut a character: broken text */
        const size_t n = req->stop[i] ? strlen(req->stop[i]) : 0;
        const size_t valid = dg_utf8_valid_prefix(req->stop[i], n);
        if (valid != n) BAD("text.stop[%zu]: invalid UTF-8 at byte %zu", i, valid);
    }
    out->logit_bias = req->logit_bias;
    out->n_logit_bias = req->n_logit_bias;
    if (set & DG_TEXT_MAX_NEW_TOKENS) {
        if (req->max_new_tokens < 1) BAD("text.max_new_tokens: %d is not at least 1", req->max_new_tokens);
        out->max_new_tokens = req->max_new_tokens;
    }
    if (set & DG_TEXT_TEMPERATURE) {
        if (!isfinite(req->temperature) || req->temperature < 0)
            BAD("text.temperature: %g is not a number >= 0 (0: greedy)", req->temperature);
        out->temperature = req->temperature;
    }
    if (set & DG_TEXT_TOP_P) {
        if (!isfinite(req->top_p) || req->top_p <= 0 || req->top_p > 1)
            BAD("text.top_p: %g is not in (0, 1] (1: off)", req->top_p);
        out->top_p = req->top_p;
    }
    if (set & DG_TEXT_TOP_K) {
        if (req->top_k < 0) BAD("text.top_k: %d is not >= 0 (0: off)", req->top_k);
        out->top_k = req->top_k;
    }
    if (set & DG_TEXT_REPETITION_PENALTY) {
        if (!isfinite(req->repetition_penalty) || req->repetition_penalty <= 0)
            BAD("text.repetition_penalty: %g is not a number > 0 (1: off)", req->repetition_penalty);
        out->repetition_penalty = req->repetition_penalty;
    }
    return 0;
}

int dg_params_resolve_image(const dg_image_params *req, const dg_image_params *defaults, dg_image_params *out,
                            char *err, size_t errlen) {
    uint32_t set = req->set;
    *out = *defaults;
    out->set = DG_IMAGE_ALL;
    if (set & DG_IMAGE_WIDTH) out->width = req->width;
    if (set & DG_IMAGE_HEIGHT) out->height = req->height;
    if (set & DG_IMAGE_STEPS) out->steps = req->steps;
    if (set & DG_IMAGE_GUIDANCE_SCALE) {
        /* past 100 the velocity's scale overflows the DiT's norms (1e30 gave a flat
         * picture, not an error); the daemon's range */
        if (!isfinite(req->guidance_scale) || req->guidance_scale < 0 || req->guidance_scale > 100)
            BAD("image.guidance_scale: %g is not in 0..100 (0: no guidance)", req->guidance_scale);
        out->guidance_scale = req->guidance_scale;
    }
    if (set & DG_IMAGE_MAX_IMAGES) {
        if (req->max_images < 0) BAD("image.max_images: %d is not >= 0", req->max_images);
        out->max_images = req->max_images;
    }
    if (set & DG_IMAGE_SCHEDULE) {
        if (req->schedule != DG_SCHEDULE_KARRAS && req->schedule != DG_SCHEDULE_SHIFTED)
            BAD("image.schedule: %d is not a schedule (karras %d, shifted %d)", (int)req->schedule,
                DG_SCHEDULE_KARRAS, DG_SCHEDULE_SHIFTED);
        out->schedule = req->schedule;
    } else if (set & DG_IMAGE_SHIFT) {
        out->schedule = DG_SCHEDULE_SHIFTED;   /* what a shift meant before the schedule was a field */
    }
    if (set & DG_IMAGE_SHIFT) {
        /* past 100 the shifted sigmas stop decreasing at many steps (1e5: at every count),
         * and below about 1e-40 they round to 0 (1e-45: at 998 of the 1000 counts): the
         * drawing failed when it began, after the answer's text; the daemon's range */
        if (!isfinite(req->shift) || req->shift < 0.001f || req->shift > 100)
            BAD("image.shift: %g is not a number in [0.001, 100]", req->shift);
        if (out->schedule == DG_SCHEDULE_KARRAS) BAD("image.shift: the karras schedule has no shift");
        out->shift = req->shift;
    }
    if (out->schedule == DG_SCHEDULE_SHIFTED && !(out->shift > 0))
        BAD("image.schedule: shifted needs a shift > 0, and the package's default shift is %g", out->shift);
    return 0;
}
