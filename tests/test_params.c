/* A request's parameters against the package's defaults (engine/params.h): a field whose set
 * bit is clear takes the default whatever it holds, a set one is used as it is, 0 included;
 * a set value out of range fails with the field's name. Exact comparisons throughout: the
 * values are copied, never computed. */
#include <math.h>
#include <string.h>

#include "common/harness.h"
#include "params.h"

static char err[256];

/* Defaults where no value is 0, so that a 0 in a result can only come from the request. */
static const dg_text_params text_defaults = {.set = DG_TEXT_ALL, .max_new_tokens = 48, .temperature = 0.8f,
                                             .top_p = 0.9f, .top_k = 40, .repetition_penalty = 1.1f};
static const dg_image_params image_defaults = {.set = DG_IMAGE_ALL, .width = 64, .height = 48, .steps = 6,
                                               .guidance_scale = 4.0f, .max_images = 2, .shift = 5.0f,
                                               .schedule = DG_SCHEDULE_SHIFTED};

TEST(params_clear_bits_take_the_defaults_whatever_the_fields_hold) {
    const char *stop[1] = {"END"};
    dg_text_params req = {.max_new_tokens = 3, .temperature = 2.0f, .top_k = 7, .stop = stop, .n_stop = 1};
    dg_text_params t;
    CHECK_EQ_INT(dg_params_resolve_text(&req, &text_defaults, &t, err, sizeof err), 0);
    CHECK_EQ_INT(t.max_new_tokens, 48);
    CHECK(t.temperature == 0.8f && t.top_p == 0.9f && t.top_k == 40 && t.repetition_penalty == 1.1f);
    CHECK(t.stop == stop && t.n_stop == 1);   /* the lists are the request's */
    CHECK_EQ_INT(t.set, DG_TEXT_ALL);
    dg_image_params im, ireq = {.width = 16, .guidance_scale = 1.0f, .max_images = 9, .shift = 2.0f};
    CHECK_EQ_INT(dg_params_resolve_image(&ireq, &image_defaults, &im, err, sizeof err), 0);
    CHECK(im.width == 64 && im.height == 48 && im.steps == 6 && im.guidance_scale == 4.0f);
    CHECK(im.max_images == 2 && im.shift == 5.0f && im.schedule == DG_SCHEDULE_SHIFTED);
    CHECK_EQ_INT(im.set, DG_IMAGE_ALL);
}

TEST(params_set_zeros_are_used) {
    dg_text_params req = {.set = DG_TEXT_TEMPERATURE | DG_TEXT_TOP_K}, t;   /* greedy, no top-k */
    CHECK_EQ_INT(dg_params_resolve_text(&req, &text_defaults, &t, err, sizeof err), 0);
    CHECK(t.temperature == 0.0f && t.top_k == 0);
    CHECK(t.top_p == 0.9f && t.max_new_tokens == 48);
    req = (dg_text_params){.set = DG_TEXT_ALL, .max_new_tokens = 5, .temperature = 0.5f, .top_p = 1.0f,
                           .top_k = 3, .repetition_penalty = 1.0f};
    CHECK_EQ_INT(dg_params_resolve_text(&req, &text_defaults, &t, err, sizeof err), 0);
    CHECK(t.max_new_tokens == 5 && t.temperature == 0.5f && t.top_p == 1.0f && t.top_k == 3 &&
          t.repetition_penalty == 1.0f);
    dg_image_params ireq = {.set = DG_IMAGE_GUIDANCE_SCALE | DG_IMAGE_MAX_IMAGES}, im;   /* no CFG, no images */
    CHECK_EQ_INT(dg_params_resolve_image(&ireq, &image_defaults, &im, err, sizeof err), 0);
    CHECK(im.guidance_scale == 0.0f && im.max_images == 0 && im.width == 64);
    ireq = (dg_image_params){.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS, .width = 32, .height = 16,
                             .steps = 2};
    CHECK_EQ_INT(dg_params_resolve_image(&ireq, &image_defaults, &im, err, sizeof err), 0);
    CHECK(im.width == 32 && im.height == 16 && im.steps == 2 && im.guidance_scale == 4.0f);
}

/* The schedule: its own bit, or a shift alone asking for the shifted one. */
TEST(params_schedule_and_shift) {
    dg_image_params im, req = {.set = DG_IMAGE_SCHEDULE, .schedule = DG_SCHEDULE_KARRAS};
    CHECK_EQ_INT(dg_params_resolve_image(&req, &image_defaults, &im, err, sizeof err), 0);
    CHECK_EQ_INT(im.schedule, DG_SCHEDULE_KARRAS);
    dg_image_params karras_pkg = image_defaults;
    karras_pkg.schedule = DG_SCHEDULE_KARRAS;
    req = (dg_image_params){.set = DG_IMAGE_SHIFT, .shift = 3.0f};
    CHECK_EQ_INT(dg_params_resolve_image(&req, &karras_pkg, &im, err, sizeof err), 0);
    CHECK(im.schedule == DG_SCHEDULE_SHIFTED && im.shift == 3.0f);
    req = (dg_image_params){.set = DG_IMAGE_SCHEDULE, .schedule = DG_SCHEDULE_SHIFTED};
    CHECK_EQ_INT(dg_params_resolve_image(&req, &karras_pkg, &im, err, sizeof err), 0);
    CHECK(im.schedule == DG_SCHEDULE_SHIFTED && im.shift == 5.0f);   /* the package's shift */
    /* a package whose default shift is 0 cannot lend one */
    karras_pkg.shift = 0.0f;
    CHECK_EQ_INT(dg_params_resolve_image(&req, &karras_pkg, &im, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "image.schedule: shifted needs a shift > 0"));
    req = (dg_image_params){.set = DG_IMAGE_SCHEDULE | DG_IMAGE_SHIFT, .schedule = DG_SCHEDULE_KARRAS, .shift = 3.0f};
    CHECK_EQ_INT(dg_params_resolve_image(&req, &image_defaults, &im, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "image.shift: the karras schedule has no shift"));
    req = (dg_image_params){.set = DG_IMAGE_SCHEDULE, .schedule = (dg_schedule)5};
    CHECK_EQ_INT(dg_params_resolve_image(&req, &image_defaults, &im, err, sizeof err), DG_EINVAL);
    CHECK(strstr(err, "image.schedule: 5"));
}

TEST(params_out_of_range_names_the_field) {
    struct { dg_text_params req; const char *msg; } text[] = {
        {{.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 0}, "text.max_new_tokens: 0"},
        {{.set = DG_TEXT_TEMPERATURE, .temperature = -0.5f}, "text.temperature: -0.5"},
        {{.set = DG_TEXT_TEMPERATURE, .temperature = NAN}, "text.temperature: nan"},
        {{.set = DG_TEXT_TOP_P, .top_p = 0.0f}, "text.top_p: 0 is not in (0, 1]"},
        {{.set = DG_TEXT_TOP_P, .top_p = 1.5f}, "text.top_p: 1.5"},
        {{.set = DG_TEXT_TOP_K, .top_k = -1}, "text.top_k: -1"},
        {{.set = DG_TEXT_REPETITION_PENALTY, .repetition_penalty = 0.0f}, "text.repetition_penalty: 0"},
        /* the second byte of "é" alone: a match cut the character ("caf\xc3" went out) */
        {{.stop = (const char *const[]){"ok", "\xa9"}, .n_stop = 2}, "text.stop[1]: invalid UTF-8 at byte 0"},
    };
    dg_text_params t;
    for (size_t i = 0; i < sizeof text / sizeof text[0]; i++) {
        err[0] = 0;
        CHECK_EQ_INT(dg_params_resolve_text(&text[i].req, &text_defaults, &t, err, sizeof err), DG_EINVAL);
        CHECK(strstr(err, text[i].msg) != NULL);
    }
    struct { dg_image_params req; const char *msg; } image[] = {
        {{.set = DG_IMAGE_GUIDANCE_SCALE, .guidance_scale = -1.0f}, "image.guidance_scale: -1"},
        {{.set = DG_IMAGE_GUIDANCE_SCALE, .guidance_scale = INFINITY}, "image.guidance_scale: inf"},
        {{.set = DG_IMAGE_MAX_IMAGES, .max_images = -2}, "image.max_images: -2"},
        {{.set = DG_IMAGE_SHIFT, .shift = 0.0f}, "image.shift: 0 is not a number in [0.001, 100]"},
        {{.set = DG_IMAGE_SHIFT, .shift = 1e5f}, "image.shift: 100000 is not a number in [0.001, 100]"},
        /* its sigmas round to 0: the drawing failed when it began, after the answer's text */
        {{.set = DG_IMAGE_SHIFT, .shift = 1e-45f}, "image.shift: 1.4013e-45 is not a number in [0.001, 100]"},
        {{.set = DG_IMAGE_GUIDANCE_SCALE, .guidance_scale = 1e30f}, "image.guidance_scale: 1e+30 is not in 0..100"},
    };
    dg_image_params im;
    for (size_t i = 0; i < sizeof image / sizeof image[0]; i++) {
        err[0] = 0;
        CHECK_EQ_INT(dg_params_resolve_image(&image[i].req, &image_defaults, &im, err, sizeof err), DG_EINVAL);
        CHECK(strstr(err, image[i].msg) != NULL);
    }
}

int main(void) { return test_main(); }
