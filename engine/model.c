/* dg_model: opening a model package (docs/DESIGN.md §5).
 *
 *   DIR/duogen.json   {"format": "duogen-package-1", "name": ..., "components": {"mllm": "mllm",
 *                      "dit": "dit", "vae": "vae", "connector": "connector.safetensors"},
 *                      "bov_token": "<BOV>", "bov_id": N, "draw_marker": "[image]",
 *                      "system_prompt": "...", "condition_layers": [...],
 *                      "condition": {"source": "prompt", ...}, "max_context": N,
 *                      "defaults": {"max_new_tokens": ..., ..., "schedule": "karras" | "shifted"}}
 *   DIR/mllm/         Qwen2.5-VL in the Hugging Face layout (config.json, safetensors, tokenizer)
 *
 * "connector" may be absent when the DiT carries its own crossattn_proj (a published
 * Cosmos-Predict2.5 transformer); "bov_id" puts a "bov_token" the tokenizer lacks on that
 * embedding row; "condition" records a published pipeline's conditioning (docs/PUBLISHED.md).
 * A component path is relative to DIR unless it is absolute.
 *
 * Every problem stops the load with a message naming the file and the key or tensor. */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "draw/flow.h"
#include "io/json_config.h"
#include "model.h"
#include "params.h"

const char *dg_model_describe(const dg_model *m) { return m ? m->describe : "none"; }

static int fail(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(char *err, size_t errlen, int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return code;
}

/* Reads an optional number from `obj`; a present value of the wrong type or range fails. */
static int get_num(json_t *obj, const char *key, double lo, double hi, double *out, const char *file,
                   char *err, size_t errlen) {
    json_t *v = json_object_get(obj, key);
    if (!v) return 0;
    if (!json_is_number(v) || json_number_value(v) < lo || json_number_value(v) > hi)
        return fail(err, errlen, DG_EMODEL, "%s: \"%s\" must be a number in %g..%g", file, key, lo, hi);
    *out = json_number_value(v);
    return 1;
}

/* duogen.json "defaults": what a request gets for each parameter it does not set (duogen.h).
 * "schedule" is "karras" or "shifted"; without it a package's shift > 0 means shifted (the
 * rule of packages written before the schedule was a parameter). */
static int read_defaults(dg_model *m, json_t *d, const char *path, char *err, size_t errlen) {
    dg_text_params *t = &m->text_defaults;
    dg_image_params *im = &m->image_defaults;
    *t = (dg_text_params){.max_new_tokens = 512, .top_p = 1.0f, .repetition_penalty = 1.0f};
    *im = (dg_image_params){.width = 512, .height = 512, .steps = 35, .guidance_scale = 7.0f,
                            .max_images = 4, .shift = 5.0f};
    if (d && !json_is_object(d)) return fail(err, errlen, DG_EMODEL, "%s: \"defaults\" must be an object", path);
    json_t *schedule = d ? json_object_get(d, "schedule") : NULL;
    if (d) {
        struct { const char *key; double lo, hi; int is_int; void *field; } keys[] = {
            {"max_new_tokens", 1, 1e6, 1, &t->max_new_tokens}, {"temperature", 0, 100, 0, &t->temperature},
            {"top_p", 0, 1, 0, &t->top_p}, {"top_k", 0, 1e6, 1, &t->top_k},
            {"repetition_penalty", 0, 100, 0, &t->repetition_penalty},
            {"width", 16, 16384, 1, &im->width}, {"height", 16, 16384, 1, &im->height},
            {"steps", 1, DG_FLOW_MAX_STEPS, 1, &im->steps}, {"guidance_scale", 0, 100, 0, &im->guidance_scale},
            {"max_images", 0, 1024, 1, &im->max_images}, {"shift", 0, 100, 0, &im->shift},
        };
        double v;
        int rc;
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            if ((rc = get_num(d, keys[i].key, keys[i].lo, keys[i].hi, &v, path, err, errlen)) < 0) return rc;
            if (!rc) continue;
            if (keys[i].is_int) *(int32_t *)keys[i].field = (int32_t)v;
            else *(float *)keys[i].field = (float)v;
        }
    }
    const char *name = json_string_value(schedule);
    if (schedule && (!name || (strcmp(name, "karras") && strcmp(name, "shifted"))))
        return fail(err, errlen, DG_EMODEL, "%s: defaults \"schedule\" must be \"karras\" or \"shifted\"", path);
    im->schedule = name ? (!strcmp(name, "shifted") ? DG_SCHEDULE_SHIFTED : DG_SCHEDULE_KARRAS)
                        : (im->shift > 0 ? DG_SCHEDULE_SHIFTED : DG_SCHEDULE_KARRAS);
    if (im->schedule == DG_SCHEDULE_SHIFTED && !(im->shift > 0))
        return fail(err, errlen, DG_EMODEL, "%s: defaults \"schedule\" is \"shifted\" but \"shift\" is 0", path);
    t->set = DG_TEXT_ALL;
    im->set = DG_IMAGE_ALL;
    return 0;
}

static int read_package(dg_model *m, json_t **manifest, char *err, size_t errlen) {
    char path[1100];
    snprintf(path, sizeof path, "%s/duogen.json", m->dir);
    json_error_t je;
    json_t *j;
    const int jrc = dg_json_load_file(path, 0, &j, &je);
    if (jrc) {
        struct stat st;
        if (stat(path, &st))
            return fail(err, errlen, DG_EMODEL, "%s: %s (a model package needs its duogen.json)", path, strerror(errno));
        if (jrc == DG_ENOMEM) return fail(err, errlen, DG_ENOMEM, "%s: out of memory reading it", path);
        char why[256];
        return fail(err, errlen, DG_EMODEL, "%s: %s", path, dg_json_why(&je, why, sizeof why));
    }
    *manifest = j;
    if (!json_is_object(j)) return fail(err, errlen, DG_EMODEL, "%s: not a JSON object", path);
    const char *format = json_string_value(json_object_get(j, "format"));
    if (!format || strcmp(format, "duogen-package-1"))
        return fail(err, errlen, DG_EMODEL, "%s: \"format\" must be \"duogen-package-1\"", path);
    json_t *comp = json_object_get(j, "components");
    if (!json_is_object(comp) || !json_is_string(json_object_get(comp, "mllm")))
        return fail(err, errlen, DG_EMODEL, "%s: \"components\" must name at least \"mllm\"", path);
    json_t *layers = json_object_get(j, "condition_layers");
    if (layers) {
        if (!json_is_array(layers) || json_array_size(layers) > DG_MAX_COND_LAYERS)
            return fail(err, errlen, DG_EMODEL, "%s: \"condition_layers\" must be a list of at most %d layer numbers",
                        path, DG_MAX_COND_LAYERS);
        for (size_t i = 0; i < json_array_size(layers); i++) {
            json_t *v = json_array_get(layers, i);
            if (!json_is_integer(v)) return fail(err, errlen, DG_EMODEL, "%s: condition_layers[%zu] is not an integer", path, i);
            /* bounded before the cast (2^32 came in as layer 0; checked against the decoder's
             * layers once it is open) */
            if (json_integer_value(v) < 0 || json_integer_value(v) > 1 << 20)
                return fail(err, errlen, DG_EMODEL, "%s: condition_layers[%zu] is %" JSON_INTEGER_FORMAT
                            ", not a layer number", path, i, json_integer_value(v));
            const int layer = (int)json_integer_value(v);
            for (int k = 0; k < m->n_cond_layers; k++)   /* each layer's rows fill one slot of the connector's */
                if (m->cond_layers[k] == layer)
                    return fail(err, errlen, DG_EMODEL, "%s: condition_layers names layer %d twice", path, layer);
            m->cond_layers[m->n_cond_layers++] = layer;
        }
    }
    double v;
    int rc;
    m->max_context = 4096;
    if ((rc = get_num(j, "max_context", 16, 1 << 20, &v, path, err, errlen)) < 0) return rc;
    if (rc) m->max_context = (int)v;
    return read_defaults(m, json_object_get(j, "defaults"), path, err, errlen);
}

/* dir/name parsed into *out, or *out NULL when the file is absent (an optional config):
 * 0, DG_ENOMEM, or DG_EMODEL naming the file and line. path gets the file's path. */
static int load_optional(const char *dir, const char *name, json_t **out, char *path, size_t pathlen, char *err,
                         size_t errlen) {
    struct stat st;
    json_error_t je;
    snprintf(path, pathlen, "%s/%s", dir, name);
    *out = NULL;
    if (stat(path, &st)) return 0;
    const int jrc = dg_json_load_file(path, 0, out, &je);
    if (jrc == DG_ENOMEM) return fail(err, errlen, DG_ENOMEM, "%s: out of memory reading it", path);
    char why[256];
    if (jrc) return fail(err, errlen, DG_EMODEL, "%s: %s", path, dg_json_why(&je, why, sizeof why));
    return 0;
}

/* preprocessor_config.json: the fields that change pixel_values ("size": {"shortest_edge",
 * "longest_edge"} is the newer spelling of min/max_pixels). Without the file, the published
 * checkpoint's values; a file that leaves a field out gets transformers' class default for
 * it, as Qwen2VLImageProcessor reads it: the pixel bounds 56*56 and 28*28*1280 (the
 * checkpoint's file says 12845056). The switches the engine does not have (no resize,
 * rescale, normalization or RGB conversion, another resample filter than bicubic) are
 * refused, naming the key: pixels the model never saw would come out. */
static int read_preprocessor(dg_model *m, const char *mllm, char *err, size_t errlen) {
    char path[1300];
    dg_image_preprocess_config *c = &m->pp;
    dg_image_preprocess_config_default(c);
    json_t *j;
    int rc = load_optional(mllm, "preprocessor_config.json", &j, path, sizeof path, err, errlen);
    if (rc < 0 || !j) return rc;
    c->min_pixels = 56 * 56;
    c->max_pixels = 28 * 28 * 1280;
    static const char *const on[] = {"do_resize", "do_rescale", "do_normalize", "do_convert_rgb"};
    for (size_t i = 0; i < sizeof on / sizeof on[0]; i++) {
        json_t *b = json_object_get(j, on[i]);
        if (b && !json_is_null(b) && !json_is_true(b)) {
            json_decref(j);
            return fail(err, errlen, DG_EMODEL, "%s: \"%s\" must be true (the engine always does that step)", path,
                        on[i]);
        }
    }
    json_t *resample = json_object_get(j, "resample");
    if (resample && !json_is_null(resample) && !(json_is_integer(resample) && json_integer_value(resample) == 3)) {
        json_decref(j);
        return fail(err, errlen, DG_EMODEL, "%s: \"resample\" must be 3 (bicubic, the engine's only filter)", path);
    }
    double v;
    json_t *size = json_object_get(j, "size");
    struct { json_t *obj; const char *key; double lo, hi; int64_t *i64; int32_t *i32; double *d; } keys[] = {
        /* min_pixels and max_pixels after size: where a file has both, they win, as in
         * transformers' Qwen2VLImageProcessor (they override size's edges) */
        {size, "shortest_edge", 1, 1e12, &c->min_pixels, NULL, NULL}, {size, "longest_edge", 1, 1e12, &c->max_pixels, NULL, NULL},
        {j, "min_pixels", 1, 1e12, &c->min_pixels, NULL, NULL}, {j, "max_pixels", 1, 1e12, &c->max_pixels, NULL, NULL},
        {j, "patch_size", 1, 1024, NULL, &c->patch_size, NULL}, {j, "temporal_patch_size", 1, 16, NULL, &c->temporal_patch_size, NULL},
        {j, "merge_size", 1, 16, NULL, &c->merge_size, NULL}, {j, "rescale_factor", 0, 1, NULL, NULL, &c->rescale_factor},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0] && rc >= 0; i++) {
        if (!json_is_object(keys[i].obj)) continue;
        if ((rc = get_num(keys[i].obj, keys[i].key, keys[i].lo, keys[i].hi, &v, path, err, errlen)) <= 0) continue;
        if (keys[i].i64) *keys[i].i64 = (int64_t)v;
        else if (keys[i].i32) *keys[i].i32 = (int32_t)v;
        else *keys[i].d = v;
    }
    for (int k = 0; k < 2 && rc >= 0; k++) {
        json_t *a = json_object_get(j, k ? "image_std" : "image_mean");
        if (!a) continue;
        int numbers = json_is_array(a) && json_array_size(a) == 3;
        for (size_t i = 0; numbers && i < 3; i++) numbers = json_is_number(json_array_get(a, i));
        if (!numbers) {
            rc = fail(err, errlen, DG_EMODEL, "%s: \"%s\" must be a list of 3 numbers", path, k ? "image_std" : "image_mean");
            break;
        }
        for (int i = 0; i < 3; i++) (k ? c->image_std : c->image_mean)[i] = json_number_value(json_array_get(a, (size_t)i));
    }
    for (int i = 0; i < 3 && rc >= 0; i++)
        if (!(c->image_std[i] > 0.0 && c->image_std[i] < 1e6))
            rc = fail(err, errlen, DG_EMODEL, "%s: image_std[%d] %g must be above 0", path, i, c->image_std[i]);
    json_decref(j);
    return rc < 0 ? rc : 0;
}

/* The patches are cut for the tower's patch embedding and merged by its merger: the
 * preprocessor's sizes (its file's, or the defaults without one) must be the tower's. */
static int check_preprocessor(const dg_model *m, const char *mllm, char *err, size_t errlen) {
    const dg_image_preprocess_config *c = &m->pp;
    const dg_vision_config *vc = &m->cfg.vision;
    if (c->patch_size == vc->patch_size && c->temporal_patch_size == vc->temporal_patch_size &&
        c->merge_size == vc->spatial_merge_size)
        return 0;
    return fail(err, errlen, DG_EMODEL, "%s/preprocessor_config.json: patch_size %d, temporal_patch_size %d, "
                "merge_size %d must be config.json's vision_config patch_size %d, temporal_patch_size %d, "
                "spatial_merge_size %d", mllm, c->patch_size, c->temporal_patch_size, c->merge_size, vc->patch_size,
                vc->temporal_patch_size, vc->spatial_merge_size);
}

/* A string of at most cap - 1 bytes into out ("" when absent). */
static int get_text(json_t *obj, const char *key, char *out, size_t cap, const char *path, char *err,
                    size_t errlen) {
    json_t *v = json_object_get(obj, key);
    out[0] = 0;
    if (!v) return 0;
    if (!json_is_string(v) || json_string_length(v) >= cap)
        return fail(err, errlen, DG_EMODEL, "%s: \"%s\" must be a string of less than %zu bytes", path, key, cap);
    memcpy(out, json_string_value(v), json_string_length(v) + 1);
    return 1;
}

/* duogen.json "condition": how the DiT's semantic condition is made. "context" (the default):
 * the conversation's positions through the accumulator (docs/DESIGN.md §6); "prompt": as a
 * published pipeline does (draw/prompt_cond.h), with its system prompt, negative prompt,
 * max_tokens, pad token and side. "std" and "eps" name the standardization, which must be
 * the connector's (unbiased std, 1e-8 added to it). Read once the tokenizer is open. */
static int read_condition(dg_model *m, json_t *c, const char *path, char *err, size_t errlen) {
    char source[16], pad[64], side[8], std[16];
    dg_prompt_recipe *r = &m->recipe;
    double v = 512, eps = DG_CONNECTOR_EPS;
    int rc;
    if (!c) return 0;
    if (!json_is_object(c)) return fail(err, errlen, DG_EMODEL, "%s: \"condition\" must be an object", path);
    if ((rc = get_text(c, "source", source, sizeof source, path, err, errlen)) < 0 ||
        (rc = get_text(c, "system_prompt", r->system_prompt, sizeof r->system_prompt, path, err, errlen)) < 0 ||
        (rc = get_text(c, "negative_prompt", r->negative_prompt, sizeof r->negative_prompt, path, err, errlen)) < 0 ||
        (rc = get_text(c, "pad_token", pad, sizeof pad, path, err, errlen)) < 0 ||
        (rc = get_text(c, "padding_side", side, sizeof side, path, err, errlen)) < 0 ||
        (rc = get_text(c, "std", std, sizeof std, path, err, errlen)) < 0 ||
        (rc = get_num(c, "max_tokens", 1, DG_PROMPT_MAX_TOKENS, &v, path, err, errlen)) < 0 ||
        (rc = get_num(c, "eps", 0, 1, &eps, path, err, errlen)) < 0)
        return rc;
    if ((std[0] && strcmp(std, "unbiased")) || (float)eps != DG_CONNECTOR_EPS)
        return fail(err, errlen, DG_EMODEL, "%s: condition \"std\" \"%s\", \"eps\" %g: only the unbiased "
                    "std plus %g is supported (docs/PUBLISHED.md)", path, std, eps, (double)DG_CONNECTOR_EPS);
    if (!source[0] || !strcmp(source, "context")) return 0;
    if (strcmp(source, "prompt"))
        return fail(err, errlen, DG_EMODEL, "%s: condition \"source\" must be \"context\" or \"prompt\"", path);
    r->max_tokens = (int)v;
    r->pad_left = !strcmp(side, "left");
    if (side[0] && !r->pad_left && strcmp(side, "right"))
        return fail(err, errlen, DG_EMODEL, "%s: condition \"padding_side\" must be \"left\" or \"right\"", path);
    if ((r->pad_id = dg_tok_added_id(m->tok, pad)) < 0)
        return fail(err, errlen, DG_EMODEL, "%s: condition \"pad_token\" \"%s\" is not an added token of the "
                    "tokenizer", path, pad);
    if (r->max_tokens > m->max_context)
        return fail(err, errlen, DG_EMODEL, "%s: condition \"max_tokens\" %d is more than max_context %d", path,
                    r->max_tokens, m->max_context);
    m->cond_from_prompt = 1;
    return 0;
}

/* DIR/name, or name when it is absolute. */
static void component_path(const dg_model *m, const char *name, char *out, size_t cap) {
    if (name[0] == '/') snprintf(out, cap, "%s", name);
    else snprintf(out, cap, "%s/%s", m->dir, name);
}

/* The connector: connector.safetensors, or the DiT's own crossattn_proj (one of the two). */
static int load_connector(dg_model *m, const char *con, char *err, size_t errlen) {
    char path[1300];
    if (con && m->dit.cfg.proj_in)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: the DiT has its own crossattn_proj and the package "
                    "names a connector too: keep one", m->dir);
    if (!con && !m->dit.cfg.proj_in)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: no \"connector\" component and the DiT has no "
                    "crossattn_proj", m->dir);
    if (!con)
        return dg_connector_bind(&m->conn, m->dit.st, m->cond_layers, m->n_cond_layers, m->cfg.text.hidden_size,
                                 m->be, err, errlen);
    component_path(m, con, path, sizeof path);
    return dg_connector_load(&m->conn, path, m->cond_layers, m->n_cond_layers, m->cfg.text.hidden_size, m->be,
                             err, errlen);
}

/* The drawing side: dit/ and vae/ come together, with a connector (load_connector). */
static int load_draw(dg_model *m, json_t *comp, char *err, size_t errlen) {
    const char *dit = json_string_value(json_object_get(comp, "dit"));
    const char *vae = json_string_value(json_object_get(comp, "vae"));
    const char *con = json_string_value(json_object_get(comp, "connector"));
    if (!dit && !vae && !con) return 0;
    if (!dit || !vae)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: components \"dit\" and \"vae\" come together, with "
                    "a \"connector\" unless the DiT has its own (found %s%s%s)", m->dir, dit ? "dit " : "",
                    vae ? "vae " : "", con ? "connector" : "");
    if (m->bov_id < 0)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: a package that draws needs \"bov_token\"", m->dir);
    if (!m->n_cond_layers)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: a package that draws needs \"condition_layers\"", m->dir);
    char path[1300];
    int rc;
    component_path(m, dit, path, sizeof path);
    if ((rc = dg_dit_load(&m->dit, path, m->be, err, errlen)) < 0) return rc;
    component_path(m, vae, path, sizeof path);
    if ((rc = dg_vae_load(&m->vae, path, m->be, err, errlen)) < 0) return rc;
    if ((rc = load_connector(m, con, err, errlen)) < 0) return rc;
    if (m->conn.d_cond != m->dit.cfg.text_dim)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: the connector gives %d channels, the DiT's "
                    "cross-attention takes %d", m->dir, m->conn.d_cond, m->dit.cfg.text_dim);
    if (m->vae.cfg.z_dim != m->dit.cfg.latent_channels)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: the VAE has %d latent channels, the DiT %d", m->dir,
                    m->vae.cfg.z_dim, m->dit.cfg.latent_channels);
    if (!m->has_vision)
        return fail(err, errlen, DG_EMODEL, "%s/duogen.json: a package that draws needs the vision tower "
                    "(generated images go back into the context)", m->dir);
    m->has_draw = 1;
    return 0;
}

/* The MLLM's tokenizer, with "bov_token" added on the row "bov_id" when the package gives
 * one (a tokenizer that lacks <BOV>; docs/PUBLISHED.md "<BOV>"). */
static int open_tokenizer(dg_model *m, json_t *manifest, const char *mllm, const char *path, char *err,
                          size_t errlen) {
    const char *bov = json_string_value(json_object_get(manifest, "bov_token"));
    json_t *id = json_object_get(manifest, "bov_id");
    if (!id) return dg_tok_open(mllm, &m->tok, err, errlen);
    if (!bov || !json_is_integer(id) || json_integer_value(id) < 0 || json_integer_value(id) >= (1 << 30))
        return fail(err, errlen, DG_EMODEL, "%s: \"bov_id\" must be a row number, with \"bov_token\"", path);
    dg_tok_token extra = {bov, (int32_t)json_integer_value(id)};
    return dg_tok_open_with(mllm, &extra, 1, &m->tok, err, errlen);
}

/* "draw_marker" (bov_text becomes it: the text the model writes before an image) and
 * "system_prompt". */
static int read_prompts(dg_model *m, json_t *manifest, const char *path, char *err, size_t errlen) {
    int rc = get_text(manifest, "draw_marker", m->draw_marker, sizeof m->draw_marker, path, err, errlen);
    if (rc < 0) return rc;
    if (m->draw_marker[0] && m->bov_id < 0)
        return fail(err, errlen, DG_EMODEL, "%s: a \"draw_marker\" needs \"bov_token\"", path);
    if (m->draw_marker[0]) snprintf(m->bov_text, sizeof m->bov_text, "%s", m->draw_marker);
    json_t *sp = json_object_get(manifest, "system_prompt");
    if (!sp) return 0;
    if (!json_is_string(sp) || !(m->system_prompt = strdup(json_string_value(sp))))
        return fail(err, errlen, DG_EMODEL, "%s: \"system_prompt\" must be a string", path);
    return 0;
}

/* stop_ids holds every id its sources can give (DG_MAX_EOS of config.json, as many of
 * generation_config.json, <|im_end|>), so none is dropped. */
static void add_stop(dg_model *m, int32_t id) {
    for (int i = 0; i < m->n_stop_ids; i++) if (m->stop_ids[i] == id) return;
    if (m->n_stop_ids < (int)(sizeof m->stop_ids / sizeof m->stop_ids[0])) m->stop_ids[m->n_stop_ids++] = id;
}

/* generation_config.json's eos_token_id (an id or a list of at most DG_MAX_EOS: Qwen2.5-VL's
 * is [151645, 151643], <|im_end|> and <|endoftext|>), which transformers' generate stops at:
 * ids beside config.json's. Absent file or key: nothing. */
static int read_generation_eos(dg_model *m, const char *mllm, char *err, size_t errlen) {
    char path[1300];
    json_t *j;
    int rc = load_optional(mllm, "generation_config.json", &j, path, sizeof path, err, errlen);
    if (rc < 0 || !j) return rc;
    json_t *eos = json_object_get(j, "eos_token_id");
    if (json_is_array(eos) && json_array_size(eos) > DG_MAX_EOS) {
        const size_t n = json_array_size(eos);
        json_decref(j);
        return fail(err, errlen, DG_EMODEL, "%s: eos_token_id lists %zu ids, more than the %d the engine keeps", path, n,
                    DG_MAX_EOS);
    }
    if (eos && !json_is_integer(eos) && !json_is_array(eos)) rc = -1;
    for (size_t i = 0; rc == 0 && eos && i < (json_is_array(eos) ? json_array_size(eos) : 1); i++) {
        json_t *v = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= m->cfg.text.vocab_size) rc = -1;
        else add_stop(m, (int32_t)json_integer_value(v));
    }
    json_decref(j);
    if (rc < 0)
        return fail(err, errlen, DG_EMODEL, "%s: \"eos_token_id\" must be a token id or a list of them (0..%d)", path,
                    m->cfg.text.vocab_size - 1);
    return 0;
}

/* The MLLM file's read into huge pages, as load progress between "weights" (0.1) and the
 * binding (0.3). */
static void weights_tick(void *user, double done) {
    const dg_model_opts *o = user;
    o->progress(o->progress_user, "weights", 0.1 + 0.2 * done);
}

/* Each weight bound: the phase again (a GPU upload of billions of weights runs minutes
 * between two phases, past a start timeout that only the phases extended). */
typedef struct {
    const dg_model_opts *o;
    const char *phase;
    double fraction;
} load_phase;

static void bind_tick(void *user) {
    const load_phase *p = user;
    p->o->progress(p->o->progress_user, p->phase, p->fraction);
}

int dg_model_open(const char *dir, const dg_model_opts *o, dg_model **out, char *err, size_t errlen) {
    *out = NULL;
    if (!dir || !dir[0]) return fail(err, errlen, DG_EMODEL, "no model directory given");
    if (err && errlen) err[0] = 0;
    dg_model *m = calloc(1, sizeof *m);
    json_t *manifest = NULL;
    int rc;
    if (!m) return fail(err, errlen, DG_ENOMEM, "%s: out of memory", dir);
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    m->bov_id = -1;
    if ((rc = read_package(m, &manifest, err, errlen)) < 0) goto fail;

    char mllm[1200], path[1200];
    component_path(m, json_string_value(json_object_get(json_object_get(manifest, "components"), "mllm")), mllm,
                   sizeof mllm);
    snprintf(path, sizeof path, "%s/duogen.json", dir);
    if (o && o->progress) o->progress(o->progress_user, "tokenizer", 0.0);
    if ((rc = open_tokenizer(m, manifest, mllm, path, err, errlen)) < 0) goto fail;
    if ((rc = dg_config_load(mllm, &m->cfg, err, errlen)) < 0) goto fail;
    /* every token has an embedding row (not every row a token: Qwen2.5-VL's 151,665 ids in
     * 152,064 rows); found here, not by each request that uses a token past the rows */
    if (dg_tok_n_ids(m->tok) > m->cfg.text.vocab_size) {
        rc = fail(err, errlen, DG_EMODEL, "%s: the tokenizer has ids up to %d, past config.json's vocab_size %d",
                  mllm, dg_tok_n_ids(m->tok) - 1, m->cfg.text.vocab_size);
        goto fail;
    }
    const dg_backend_opts bo = {.n_threads = o ? o->threads : 0, .device_bytes = o ? o->device_memory : 0,
                                .cpu_bf16_compute = o ? o->cpu_bf16_compute : 0,
                                .cpu_mapped_weights = o ? o->cpu_mapped_weights : 0};
    if ((rc = dg_backend_new_opts(o && o->device ? o->device : "cpu", &bo, &m->be, err, errlen)) < 0)
        goto fail;
    if (o && o->progress) o->progress(o->progress_user, "weights", 0.1);
    if ((rc = dg_st_open_flags(mllm, m->be->weights_hugepages ? DG_ST_HUGEPAGES : 0, o && o->progress ? weights_tick : NULL,
                               (void *)o, &m->mllm_st, err, errlen)) < 0)
        goto fail;
    load_phase tick = {o, "weights", 0.3};
    if (o && o->progress) m->be->load_tick = bind_tick, m->be->load_tick_user = &tick;
    if ((rc = dg_qwen2_load(&m->llm, &m->cfg.text, m->mllm_st, m->be, err, errlen)) < 0) goto fail;
    if ((!o || o->logit_screen >= 0) && (rc = dg_qwen2_screen(&m->llm, o && o->logit_screen > 0, err, errlen)) < 0)
        goto fail;
    if (dg_st_find(m->mllm_st, "visual.patch_embed.proj.weight")) {
        /* the tower's rows take the place of <|image_pad|> embeddings in the decoder */
        if (m->cfg.vision.out_hidden_size != m->cfg.text.hidden_size) {
            rc = fail(err, errlen, DG_EMODEL, "%s/config.json: vision_config.out_hidden_size %d must be the decoder's "
                      "hidden_size %d (the tower's rows stand for image tokens)", mllm,
                      m->cfg.vision.out_hidden_size, m->cfg.text.hidden_size);
            goto fail;
        }
        if ((rc = dg_vision_load(&m->vision, &m->cfg.vision, m->mllm_st, m->be, err, errlen)) < 0) goto fail;
        if ((rc = read_preprocessor(m, mllm, err, errlen)) < 0 || (rc = check_preprocessor(m, mllm, err, errlen)) < 0)
            goto fail;
        m->has_vision = 1;
    }
    m->image_pad_id = m->cfg.text.image_token_id;
    m->vision_start_id = m->cfg.text.vision_start_token_id;
    m->vision_end_id = m->cfg.text.vision_end_token_id;
    /* with a tower the image's tokens are embedded and fed like any other: an id past the
     * embedding rows failed every job with an image, in its step */
    const struct { const char *key; int32_t id; } image_ids[] = {{"vision_start_token_id", m->vision_start_id},
                                                                 {"vision_end_token_id", m->vision_end_id},
                                                                 {"image_token_id", m->image_pad_id}};
    for (size_t i = 0; m->has_vision && i < sizeof image_ids / sizeof image_ids[0]; i++)
        if (image_ids[i].id < 0 || image_ids[i].id >= m->cfg.text.vocab_size) {
            rc = fail(err, errlen, DG_EMODEL, "%s/config.json: \"%s\" %d is outside the vocabulary (vocab_size %d)",
                      mllm, image_ids[i].key, image_ids[i].id, m->cfg.text.vocab_size);
            goto fail;
        }
    for (int i = 0; i < m->n_cond_layers; i++)
        if (m->cond_layers[i] < 0 || m->cond_layers[i] >= m->cfg.text.n_layers) {
            rc = fail(err, errlen, DG_EMODEL, "%s/duogen.json: condition layer %d is outside 0..%d",
                      dir, m->cond_layers[i], m->cfg.text.n_layers - 1);
            goto fail;
        }

    /* the answer ends at any EOS id of the configs or at <|im_end|> (the chat turn's end) */
    for (int i = 0; i < m->cfg.text.n_eos; i++) add_stop(m, m->cfg.text.eos_token_id[i]);
    if ((rc = read_generation_eos(m, mllm, err, errlen)) < 0) goto fail;
    int32_t im_end = dg_tok_added_id(m->tok, "<|im_end|>");
    if (im_end >= 0) add_stop(m, im_end);
    if (!m->n_stop_ids) {
        rc = fail(err, errlen, DG_EMODEL, "%s: no eos_token_id in config.json and no <|im_end|> token", mllm);
        goto fail;
    }
    const char *bov = json_string_value(json_object_get(manifest, "bov_token"));
    if (bov) {
        m->bov_id = dg_tok_added_id(m->tok, bov);
        if (strlen(bov) >= sizeof m->bov_text) {
            rc = fail(err, errlen, DG_EMODEL, "%s/duogen.json: bov_token \"%.40s...\" is longer than %zu bytes",
                      dir, bov, sizeof m->bov_text - 1);
            goto fail;
        }
        snprintf(m->bov_text, sizeof m->bov_text, "%s", bov);
        if (m->bov_id < 0 || m->bov_id >= m->cfg.text.vocab_size) {
            rc = fail(err, errlen, DG_EMODEL, "%s/duogen.json: bov_token \"%s\" is not an added token of %s "
                      "within its %d embedding rows", dir, bov, mllm, m->cfg.text.vocab_size);
            goto fail;
        }
    }
    if (m->max_context > m->cfg.text.max_position_embeddings && m->cfg.text.max_position_embeddings > 0)
        m->max_context = m->cfg.text.max_position_embeddings;
    if ((rc = read_condition(m, json_object_get(manifest, "condition"), path, err, errlen)) < 0 ||
        (rc = read_prompts(m, manifest, path, err, errlen)) < 0)
        goto fail;
    if (o && o->progress) o->progress(o->progress_user, "dit, vae and connector", 0.6);
    tick = (load_phase){o, "dit, vae and connector", 0.6};
    if ((rc = load_draw(m, json_object_get(manifest, "components"), err, errlen)) < 0) goto fail;
    m->be->load_tick = NULL;   /* `tick` ends with this call */
    const char *name = json_string_value(json_object_get(manifest, "name"));
    int n = snprintf(m->describe, sizeof m->describe, "%s: qwen2.5-vl %dL/%dd vocab %d%s", name ? name : dir,
                     m->cfg.text.n_layers, m->cfg.text.hidden_size, m->cfg.text.vocab_size,
                     m->has_vision ? " + vision" : "");
    if (m->has_draw && n > 0 && (size_t)n < sizeof m->describe)
        n += snprintf(m->describe + n, sizeof m->describe - (size_t)n, " + cosmos dit %dL/%dd + wan vae",
                      m->dit.cfg.n_layers, m->dit.cfg.hidden);
    if (n > 0 && (size_t)n < sizeof m->describe)
        n += snprintf(m->describe + n, sizeof m->describe - (size_t)n, " on %s%s", m->be->name,
                      m->be->bf16_compute ? " (bf16 compute)" : "");
    if (dg_st_seeded(m->mllm_st) && n > 0 && (size_t)n < sizeof m->describe)
        snprintf(m->describe + n, sizeof m->describe - (size_t)n, " (SEEDED weights: benchmark only)");
    if (o && o->progress) o->progress(o->progress_user, "ready", 1.0);
    json_decref(manifest);
    *out = m;
    return 0;
fail:
    /* a part that failed without a word (an allocation deep in a loader) still gets one */
    if (err && errlen && !err[0])
        fail(err, errlen, rc, rc == DG_ENOMEM ? "%s: out of memory" : "%s: failed (%s)", dir, dg_error_name(rc));
    json_decref(manifest);
    dg_model_close(m);
    return rc;
}

void dg_model_close(dg_model *m) {
    if (!m) return;
    dg_connector_unload(&m->conn);
    dg_vae_unload(&m->vae);
    dg_dit_unload(&m->dit);
    dg_vision_unload(&m->vision);
    dg_qwen2_unload(&m->llm);
    dg_st_close(m->mllm_st);
    dg_tok_close(m->tok);
    dg_backend_free(m->be);
    free(m->system_prompt);
    free(m);
}
