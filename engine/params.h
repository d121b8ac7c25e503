/* params.h — a request's parameters against the package's defaults (engine/duogen.h
 * "Parameters carry presence"): every field whose `set` bit is on is checked against its
 * range and used, every other one comes from the defaults (duogen.json "defaults", read by
 * model.c). Pure functions: no model, no allocation.
 *
 *     dg_text_params tp;  dg_image_params ip;
 *     if (dg_params_resolve_text(&r->text, &m->text_defaults, &tp, err, sizeof err) < 0 ||
 *         dg_params_resolve_image(&r->image, &m->image_defaults, &ip, err, sizeof err) < 0)
 *         return DG_EINVAL;                       // err names the field
 *
 * The results hold a value in every field (`set` is all bits); their lists (stop,
 * logit_bias) are the request's, borrowed. Width, height and steps are checked against the
 * drawing networks by dg_painter_check(), not here. */
#ifndef DG_PARAMS_H
#define DG_PARAMS_H

#include <stddef.h>

#include "duogen.h"

#define DG_TEXT_ALL  (DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE | DG_TEXT_TOP_P | DG_TEXT_TOP_K | \
                      DG_TEXT_REPETITION_PENALTY)
#define DG_IMAGE_ALL (DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS | DG_IMAGE_GUIDANCE_SCALE | \
                      DG_IMAGE_MAX_IMAGES | DG_IMAGE_SHIFT | DG_IMAGE_SCHEDULE)

/* *out = the defaults overlaid with what the request sets. DG_EINVAL for a set value out of
 * range: max_new_tokens < 1, temperature < 0, top_p outside (0, 1], top_k < 0,
 * repetition_penalty <= 0 (or any of them not finite). */
int dg_params_resolve_text(const dg_text_params *req, const dg_text_params *defaults, dg_text_params *out,
                           char *err, size_t errlen);

/* *out = the defaults overlaid with what the request sets; a shift set without a schedule
 * selects DG_SCHEDULE_SHIFTED. DG_EINVAL for guidance_scale < 0, max_images < 0, an unknown
 * schedule, a shift <= 0, a shift set with DG_SCHEDULE_KARRAS, or DG_SCHEDULE_SHIFTED whose
 * shift (the request's or the default) is not > 0. */
int dg_params_resolve_image(const dg_image_params *req, const dg_image_params *defaults, dg_image_params *out,
                            char *err, size_t errlen);

#endif
