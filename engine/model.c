/* dg_model: opening a model package (DESIGN §5).
 *
 *   DIR/duogen.json   {"format": "duogen-package-1", "name": ..., "components": {"mllm": "mllm",
 *                      "dit": "dit", "vae": "vae", "connector": "connector.safetensors"},
 *                      "bov_token": "<BOV>", "condition_layers": [...],
 *                      "max_context": N, "defaults": {"max_new_tokens": ..., ...}}
 *   DIR/mllm/         Qwen2.5-VL in the Hugging Face layout (config.json, safetensors, tokenizer)
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

#include "model_internal.h"

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

static int read_package(dg_model *m, json_t **manifest, char *err, size_t errlen) {
    char path[1100];
    snprintf(path, sizeof path, "%s/duogen.json", m->dir);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) {
        struct stat st;
        if (stat(path, &st))
            return fail(err, errlen, DG_EMODEL, "%s: %s (a model package needs its duogen.json)", path, strerror(errno));
        return fail(err, errlen, DG_EMODEL, "%s: line %d: %s", path, je.line, je.text);
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
            m->cond_layers[m->n_cond_layers++] = (int)json_integer_value(v);
        }
    }
    double v;
    int rc;
    m->max_context = 4096;
    if ((rc = get_num(j, "max_context", 16, 1 << 20, &v, path, err, errlen)) < 0) return rc;
    if (rc) m->max_context = (int)v;

    json_t *d = json_object_get(j, "defaults");
    dg_text_params *t = &m->text_defaults;
    dg_image_params *im = &m->image_defaults;
    *t = (dg_text_params){.max_new_tokens = 512, .top_p = 1.0f, .repetition_penalty = 1.0f};
    *im = (dg_image_params){.width = 512, .height = 512, .steps = 35, .guidance_scale = 7.0f,
                            .max_images = 4, .shift = 5.0f};
    if (d && !json_is_object(d)) return fail(err, errlen, DG_EMODEL, "%s: \"defaults\" must be an object", path);
    if (d) {
        struct { const char *key; double lo, hi; int is_int; void *field; } keys[] = {
            {"max_new_tokens", 1, 1e6, 1, &t->max_new_tokens}, {"temperature", 0, 100, 0, &t->temperature},
            {"top_p", 0, 1, 0, &t->top_p}, {"top_k", 0, 1e6, 1, &t->top_k},
            {"repetition_penalty", 0, 100, 0, &t->repetition_penalty},
            {"width", 16, 16384, 1, &im->width}, {"height", 16, 16384, 1, &im->height},
            {"steps", 1, 10000, 1, &im->steps}, {"guidance_scale", 0, 100, 0, &im->guidance_scale},
            {"max_images", 0, 1024, 1, &im->max_images}, {"shift", 0, 100, 0, &im->shift},
        };
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
            if ((rc = get_num(d, keys[i].key, keys[i].lo, keys[i].hi, &v, path, err, errlen)) < 0) return rc;
            if (!rc) continue;
            if (keys[i].is_int) *(int32_t *)keys[i].field = (int32_t)v;
            else *(float *)keys[i].field = (float)v;
        }
    }
    return 0;
}

int dg_model_open(const char *dir, const dg_model_opts *o, dg_model **out, char *err, size_t errlen) {
    *out = NULL;
    if (!dir || !dir[0]) return fail(err, errlen, DG_EMODEL, "no model directory given");
    dg_model *m = calloc(1, sizeof *m);
    json_t *manifest = NULL;
    int rc;
    if (!m) return DG_ENOMEM;
    snprintf(m->dir, sizeof m->dir, "%s", dir);
    m->bov_id = -1;
    if ((rc = read_package(m, &manifest, err, errlen)) < 0) goto fail;

    char mllm[1200];
    snprintf(mllm, sizeof mllm, "%s/%s", dir,
             json_string_value(json_object_get(json_object_get(manifest, "components"), "mllm")));
    if (o && o->progress) o->progress(o->progress_user, "tokenizer", 0.0);
    if ((rc = dg_tok_open(mllm, &m->tok, err, errlen)) < 0) goto fail;
    if ((rc = dg_config_load(mllm, &m->cfg, err, errlen)) < 0) goto fail;
    if ((rc = dg_backend_new(o && o->device ? o->device : "cpu", o ? o->threads : 0, &m->be, err, errlen)) < 0)
        goto fail;
    if (o && o->progress) o->progress(o->progress_user, "weights", 0.1);
    if ((rc = dg_st_open(mllm, &m->mllm_st, err, errlen)) < 0) goto fail;
    if ((rc = dg_qwen2_load(&m->llm, &m->cfg.text, m->mllm_st, m->be, err, errlen)) < 0) goto fail;
    for (int i = 0; i < m->n_cond_layers; i++)
        if (m->cond_layers[i] < 0 || m->cond_layers[i] >= m->cfg.text.n_layers) {
            rc = fail(err, errlen, DG_EMODEL, "%s/duogen.json: condition layer %d is outside 0..%d",
                      dir, m->cond_layers[i], m->cfg.text.n_layers - 1);
            goto fail;
        }

    /* the answer ends at any EOS id of the config or at <|im_end|> (the chat turn's end) */
    for (int i = 0; i < m->cfg.text.n_eos; i++) m->stop_ids[m->n_stop_ids++] = m->cfg.text.eos_token_id[i];
    int32_t im_end = dg_tok_added_id(m->tok, "<|im_end|>");
    if (im_end >= 0) m->stop_ids[m->n_stop_ids++] = im_end;
    if (!m->n_stop_ids) {
        rc = fail(err, errlen, DG_EMODEL, "%s: no eos_token_id in config.json and no <|im_end|> token", mllm);
        goto fail;
    }
    const char *bov = json_string_value(json_object_get(manifest, "bov_token"));
    if (bov) {
        m->bov_id = dg_tok_added_id(m->tok, bov);
        if (m->bov_id < 0 || m->bov_id >= m->cfg.text.vocab_size) {
            rc = fail(err, errlen, DG_EMODEL, "%s/duogen.json: bov_token \"%s\" is not an added token of %s "
                      "within its %d embedding rows", dir, bov, mllm, m->cfg.text.vocab_size);
            goto fail;
        }
    }
    if (m->max_context > m->cfg.text.max_position_embeddings && m->cfg.text.max_position_embeddings > 0)
        m->max_context = m->cfg.text.max_position_embeddings;
    snprintf(m->describe, sizeof m->describe, "%s: qwen2.5-vl %dL/%dd/%dh vocab %d on %s",
             json_string_value(json_object_get(manifest, "name")) ? json_string_value(json_object_get(manifest, "name")) : dir,
             m->cfg.text.n_layers, m->cfg.text.hidden_size, m->cfg.text.n_heads, m->cfg.text.vocab_size, m->be->name);
    if (o && o->progress) o->progress(o->progress_user, "ready", 1.0);
    json_decref(manifest);
    *out = m;
    return 0;
fail:
    json_decref(manifest);
    dg_model_close(m);
    return rc;
}

void dg_model_close(dg_model *m) {
    if (!m) return;
    dg_qwen2_unload(&m->llm);
    dg_st_close(m->mllm_st);
    dg_tok_close(m->tok);
    dg_backend_free(m->be);
    free(m);
}
