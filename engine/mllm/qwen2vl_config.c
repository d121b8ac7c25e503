/* config.c — config.json reading with jansson. */
#include "mllm/qwen2vl_config.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "duogen.h"
#include "io/file.h"
#include "io/json_config.h"

/* Looks a key up in the nested object first (newer layouts), then in the flat root. */
static json_t *get(json_t *root, json_t *nested, const char *key) {
    json_t *v = nested ? json_object_get(nested, key) : NULL;
    return v ? v : json_object_get(root, key);
}

static int get_int(json_t *root, json_t *nested, const char *key, int def, int required, int *out,
                   const char *label, char *err, size_t errlen) {
    json_t *v = get(root, nested, key);
    if (!v || json_is_null(v)) {
        if (required) {
            snprintf(err, errlen, "%s: \"%s\" is missing", label, key);
            return DG_EMODEL;
        }
        *out = def;
        return 0;
    }
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > (1 << 30)) {
        snprintf(err, errlen, "%s: \"%s\" is not a non-negative integer", label, key);
        return DG_EMODEL;
    }
    *out = (int)json_integer_value(v);
    return 0;
}

static int get_float(json_t *root, json_t *nested, const char *key, double def, float *out,
                     const char *label, char *err, size_t errlen) {
    json_t *v = get(root, nested, key);
    if (!v || json_is_null(v)) { *out = (float)def; return 0; }
    if (!json_is_number(v)) {
        snprintf(err, errlen, "%s: \"%s\" is not a number", label, key);
        return DG_EMODEL;
    }
    *out = (float)json_number_value(v);
    return 0;
}

/* "text_config." where the nested object holds the key (the value read came from there),
 * else "": messages name the key where the file has it. */
static const char *in(json_t *nested, const char *key) {
    return nested && json_object_get(nested, key) ? "text_config." : "";
}

/* A value a norm divides by or a rope raises to a power: above 0 and finite once it is a
 * float (1e39 in the file is inf here). */
static int positive(float x, const char *where, const char *key, const char *label, char *err, size_t errlen) {
    if (x > 0.0f && isfinite(x)) return 0;
    snprintf(err, errlen, "%s: %s%s %g must be above 0 and finite", label, where, key, (double)x);
    return DG_EMODEL;
}

/* v as the file writes it (compact JSON, cut to the buffer), for messages. */
static const char *shown(json_t *v, char *buf, size_t len) {
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    snprintf(buf, len, "%s", s ? s : "?");
    free(s);
    return buf;
}

static int is_string(json_t *v, const char *s) { return json_is_string(v) && !strcmp(json_string_value(v), s); }

/* hidden_act (transformers' default "silu"): both MLPs are SwiGLU, silu(gate) * up. */
static int check_act(json_t *v, const char *where, const char *label, char *err, size_t errlen) {
    char value[64];
    if (!v || json_is_null(v) || is_string(v, "silu")) return 0;
    snprintf(err, errlen, "%s: %shidden_act %s is not implemented (the MLP is SwiGLU: \"silu\")", label, where,
             shown(v, value, sizeof value));
    return DG_EMODEL;
}

/* The decoder's rope object (rope_scaling, or v5's rope_parameters): M-RoPE without
 * scaling. Qwen2_5_VLTextConfig reads "mrope" as "default" (both type keys: 4.x the old
 * "type", 5.x "rope_type"), and its default rope reads only rope_theta beside mrope_section:
 * a "factor" there is dropped with a warning, so the file asks for a scaling that neither
 * transformers nor the engine applies. Any other type ("yarn", which Qwen's model card
 * tells users to add for long inputs; "linear", "dynamic") scales the frequencies in
 * transformers; and keys the engine does not know may change the rope (Qwen3-VL's
 * "mrope_interleaved"). Each is refused, naming the key and its value. */
static int check_rope(json_t *rope, const char *where, const char *key, const char *label, char *err,
                      size_t errlen) {
    static const char *types[] = {"type", "rope_type"};
    char value[64];
    for (size_t i = 0; i < 2; i++) {
        json_t *t = json_object_get(rope, types[i]);
        if (!t || json_is_null(t) || is_string(t, "mrope") || is_string(t, "default")) continue;
        snprintf(err, errlen, "%s: %s%s.%s %s is not implemented (the decoder has M-RoPE without scaling: "
                 "\"mrope\" or \"default\")", label, where, key, types[i], shown(t, value, sizeof value));
        return DG_EMODEL;
    }
    const char *k;
    json_t *v;
    json_object_foreach(rope, k, v) {
        if (!strcmp(k, "type") || !strcmp(k, "rope_type") || !strcmp(k, "mrope_section") || !strcmp(k, "rope_theta"))
            continue;
        snprintf(err, errlen, "%s: %s%s.%s %s is not implemented (M-RoPE reads type, rope_type, mrope_section and "
                 "rope_theta; transformers' default rope ignores the rest)", label, where, key, k,
                 shown(v, value, sizeof value));
        return DG_EMODEL;
    }
    return 0;
}

/* rope_theta: the text config's, or the rope object's (v5 keeps it there); both, they
 * must agree (4.x reads the first, 5.x the second). Transformers' default 1000000. */
static int read_theta(json_t *root, json_t *tc, json_t *rope, const char *key, const char *label, float *out,
                      char *err, size_t errlen) {
    json_t *inner = json_object_get(rope, "rope_theta"), *outer = get(root, tc, "rope_theta");
    int rc;
    if (inner && !json_is_null(inner) && !json_is_number(inner)) {
        snprintf(err, errlen, "%s: %s%s.rope_theta is not a number", label, in(tc, key), key);
        return DG_EMODEL;
    }
    const float theta_def = inner && json_is_number(inner) ? (float)json_number_value(inner) : 1000000.0f;
    if ((rc = get_float(root, tc, "rope_theta", theta_def, out, label, err, errlen)) < 0) return rc;
    const int has_outer = outer && !json_is_null(outer);
    if (inner && json_is_number(inner) && has_outer && *out != theta_def) {
        snprintf(err, errlen, "%s: %srope_theta %g and %s%s.rope_theta %g disagree", label, in(tc, "rope_theta"),
                 (double)*out, in(tc, key), key, (double)theta_def);
        return DG_EMODEL;
    }
    char where[64];
    snprintf(where, sizeof where, "%s%s", has_outer ? in(tc, "rope_theta") : in(tc, key), has_outer ? "" : key);
    return positive(*out, where, has_outer ? "rope_theta" : ".rope_theta", label, err, errlen);
}

static int read_mrope(json_t *sec, const char *where, const char *key, const char *label, dg_text_config *t,
                      char *err, size_t errlen) {
    if (!json_is_array(sec) || json_array_size(sec) != 3) {
        snprintf(err, errlen, "%s: %s%s.mrope_section is not an array of 3 integers", label, where, key);
        return DG_EMODEL;
    }
    int sum = 0;
    for (int i = 0; i < 3; i++) {
        json_t *x = json_array_get(sec, (size_t)i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > 512) {
            snprintf(err, errlen, "%s: mrope_section[%d] is not a small integer", label, i);
            return DG_EMODEL;
        }
        t->mrope_section[i] = (int)json_integer_value(x);
        sum += t->mrope_section[i];
    }
    if (sum != t->head_dim / 2) {
        snprintf(err, errlen, "%s: mrope_section sums to %d, expected head_dim/2 = %d", label, sum, t->head_dim / 2);
        return DG_EMODEL;
    }
    return 0;
}

/* The decoder's positions: M-RoPE from mrope_section, required. Without it transformers'
 * Qwen2.5-VL fails in its first forward (the attention indexes mrope_section); a plain
 * 1-D RoPE reading, which this parser once fell back to, is no Qwen2.5-VL and is no
 * package duogen documents (mkmodel, the trainer and dg-import write or require
 * qwen2_5_vl configs with an mrope_section). rope_scaling wins over rope_parameters, as in
 * Qwen2_5_VLTextConfig (`rope_scaling or rope_parameters`). */
static int read_rope(json_t *root, json_t *tc, const char *label, dg_text_config *t, char *err, size_t errlen) {
    json_t *rs = get(root, tc, "rope_scaling"), *rp = get(root, tc, "rope_parameters");
    const int scaling = (rs && !json_is_null(rs)) || !rp || json_is_null(rp);
    const char *key = scaling ? "rope_scaling" : "rope_parameters";
    json_t *rope = scaling ? rs : rp;
    char value[64];
    int rc;
    if (!json_is_object(rope) || !json_object_get(rope, "mrope_section")) {
        char what[96] = "is missing";
        if (json_is_object(rope)) snprintf(what, sizeof what, "has no mrope_section");
        else if (rope && !json_is_null(rope)) snprintf(what, sizeof what, "%s is not an object", shown(rope, value, sizeof value));
        snprintf(err, errlen, "%s: %s%s %s: the decoder has M-RoPE only (Qwen2.5-VL's rope_scaling "
                 "{\"type\": \"mrope\", \"mrope_section\": [16, 24, 24]})", label, in(tc, key), key, what);
        return DG_EMODEL;
    }
    if ((rc = check_rope(rope, in(tc, key), key, label, err, errlen)) < 0 ||
        (rc = read_theta(root, tc, rope, key, label, &t->rope_theta, err, errlen)) < 0 ||
        (rc = read_mrope(json_object_get(rope, "mrope_section"), in(tc, key), key, label, t, err, errlen)) < 0)
        return rc;
    /* transformers' default rope scales the rotated width by it (4.x reads it off the config) */
    json_t *prf = get(root, tc, "partial_rotary_factor");
    if (prf && !json_is_null(prf) && !(json_is_number(prf) && json_number_value(prf) == 1.0)) {
        snprintf(err, errlen, "%s: %spartial_rotary_factor %s is not implemented (the rope rotates every dimension)",
                 label, in(tc, "partial_rotary_factor"), shown(prf, value, sizeof value));
        return DG_EMODEL;
    }
    return 0;
}

/* Attention is full and causal in every layer. Transformers slides a window in the layers
 * its layer_types (5.x) calls "sliding_attention", and (4.x, and 5.x building layer_types)
 * in the layers from max_window_layers on (default 80) when use_sliding_window is true and
 * sliding_window (default 4096) is not null. The published files say use_sliding_window
 * false; anything that slides is refused. */
static int check_attention(json_t *root, json_t *tc, const char *label, const dg_text_config *t, char *err,
                           size_t errlen) {
    json_t *types = get(root, tc, "layer_types");
    if (types && !json_is_null(types)) {
        if (!json_is_array(types) || json_array_size(types) != (size_t)t->n_layers) {
            snprintf(err, errlen, "%s: %slayer_types must list num_hidden_layers = %d layer types", label,
                     in(tc, "layer_types"), t->n_layers);
            return DG_EMODEL;
        }
        size_t i;
        json_t *v;
        json_array_foreach(types, i, v) {
            char value[64];
            if (is_string(v, "full_attention")) continue;
            snprintf(err, errlen, "%s: %slayer_types[%zu] %s is not implemented (every layer attends in full: "
                     "\"full_attention\")", label, in(tc, "layer_types"), i, shown(v, value, sizeof value));
            return DG_EMODEL;
        }
    }
    json_t *use = get(root, tc, "use_sliding_window"), *window = get(root, tc, "sliding_window");
    if (use && !json_is_null(use) && !json_is_boolean(use)) {
        snprintf(err, errlen, "%s: %suse_sliding_window must be true or false", label, in(tc, "use_sliding_window"));
        return DG_EMODEL;
    }
    int full_layers, rc;
    if ((rc = get_int(root, tc, "max_window_layers", 80, 0, &full_layers, label, err, errlen)) < 0) return rc;
    if (json_is_true(use) && !(window && json_is_null(window)) && full_layers < t->n_layers) {
        snprintf(err, errlen, "%s: %suse_sliding_window true with max_window_layers %d < num_hidden_layers %d is not "
                 "implemented (sliding-window attention from layer %d on; the engine attends in full)", label,
                 in(tc, "use_sliding_window"), full_layers, t->n_layers, full_layers);
        return DG_EMODEL;
    }
    return 0;
}

/* eos_token_id: an id or a list of at most DG_MAX_EOS ids (a longer list was cut to its
 * first ids, and the answer ran past the others). */
static int read_eos(json_t *root, json_t *tc, const char *label, dg_text_config *t, char *err, size_t errlen) {
    json_t *eos = get(root, tc, "eos_token_id");
    t->n_eos = 0;
    if (!eos || json_is_null(eos)) return 0;
    if (json_is_array(eos) && json_array_size(eos) > DG_MAX_EOS) {
        snprintf(err, errlen, "%s: %seos_token_id lists %zu ids, more than the %d the engine keeps", label,
                 in(tc, "eos_token_id"), json_array_size(eos), DG_MAX_EOS);
        return DG_EMODEL;
    }
    const size_t n = json_is_array(eos) ? json_array_size(eos) : 1;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_is_array(eos) ? json_array_get(eos, i) : eos;
        if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= (1 << 30)) {
            snprintf(err, errlen, "%s: %seos_token_id must be a token id or a list of them", label,
                     in(tc, "eos_token_id"));
            return DG_EMODEL;
        }
        t->eos_token_id[t->n_eos++] = (int)json_integer_value(v);
    }
    return 0;
}

static int parse_text(json_t *root, const char *label, dg_text_config *t, char *err, size_t errlen) {
    json_t *tc = json_object_get(root, "text_config");
    if (tc && !json_is_object(tc)) tc = NULL;
    int rc = dg_json_name(root, "model_type", "qwen2_5_vl", label, err, errlen);
    if (rc < 0) return rc;
#define INT(key, def, req, dst) if ((rc = get_int(root, tc, key, def, req, dst, label, err, errlen)) < 0) return rc
    INT("hidden_size", 0, 1, &t->hidden_size);
    INT("num_hidden_layers", 0, 1, &t->n_layers);
    INT("num_attention_heads", 0, 1, &t->n_heads);
    INT("num_key_value_heads", t->n_heads, 0, &t->n_kv_heads);
    INT("intermediate_size", 0, 1, &t->intermediate_size);
    INT("vocab_size", 0, 1, &t->vocab_size);
    INT("max_position_embeddings", 128000, 0, &t->max_position_embeddings);
    INT("bos_token_id", 151643, 0, &t->bos_token_id);
    INT("vision_start_token_id", 151652, 0, &t->vision_start_token_id);
    INT("vision_end_token_id", 151653, 0, &t->vision_end_token_id);
    INT("image_token_id", 151655, 0, &t->image_token_id);
    INT("video_token_id", 151656, 0, &t->video_token_id);
    if (t->n_heads <= 0 || t->hidden_size <= 0 || t->n_layers <= 0 || t->vocab_size <= 0 ||
        t->intermediate_size <= 0) {
        snprintf(err, errlen, "%s: hidden_size, num_hidden_layers, num_attention_heads, "
                 "intermediate_size and vocab_size must be positive", label);
        return DG_EMODEL;
    }
    INT("head_dim", t->hidden_size / t->n_heads, 0, &t->head_dim);
#undef INT
    if (t->n_kv_heads <= 0 || t->n_heads % t->n_kv_heads || t->head_dim <= 0 || t->head_dim % 2 ||
        t->head_dim > 512 || t->n_heads / t->n_kv_heads > 64) {
        snprintf(err, errlen, "%s: heads %d / kv heads %d / head_dim %d are inconsistent", label,
                 t->n_heads, t->n_kv_heads, t->head_dim);
        return DG_EMODEL;
    }
    if ((rc = check_act(get(root, tc, "hidden_act"), in(tc, "hidden_act"), label, err, errlen)) < 0) return rc;
    /* rms_norm_eps: the file's value (1e-6 in every published Qwen2.5-VL file); absent, the
     * 1e-5 of transformers' Qwen2_5_VLTextConfig, which is what transformers runs such a
     * file with (a file saved without its default-valued keys lacks it exactly then) */
    if ((rc = get_float(root, tc, "rms_norm_eps", 1e-5, &t->rms_norm_eps, label, err, errlen)) < 0 ||
        (rc = positive(t->rms_norm_eps, in(tc, "rms_norm_eps"), "rms_norm_eps", label, err, errlen)) < 0 ||
        (rc = read_rope(root, tc, label, t, err, errlen)) < 0 ||
        (rc = check_attention(root, tc, label, t, err, errlen)) < 0)
        return rc;
    json_t *tie = get(root, tc, "tie_word_embeddings");
    t->tie_word_embeddings = tie ? json_is_true(tie) : 0;
    return read_eos(root, tc, label, t, err, errlen);
}

/* The tower's rope: axial, base DG_VISION_ROPE_THETA (transformers 4.x hard-codes it; 5.x
 * writes it into vision_config.rope_parameters {"rope_theta": 10000.0, "rope_type":
 * "axial"}). Another base or type is refused rather than read by one transformers and not
 * the other. */
static int check_vision_rope(json_t *vc, const char *label, char *err, size_t errlen) {
    json_t *rp = json_object_get(vc, "rope_parameters"), *theta = json_object_get(vc, "rope_theta");
    if (rp && !json_is_null(rp) && !json_is_object(rp)) {
        snprintf(err, errlen, "%s: vision_config.rope_parameters is not an object", label);
        return DG_EMODEL;
    }
    const char *k;
    json_t *v;
    char value[64];
    json_object_foreach(rp, k, v) {
        if (!strcmp(k, "rope_theta") || (!strcmp(k, "rope_type") && (json_is_null(v) || is_string(v, "axial"))))
            continue;
        snprintf(err, errlen, "%s: vision_config.rope_parameters.%s %s is not implemented (the tower's rope is "
                 "\"axial\", rope_theta %g)", label, k, shown(v, value, sizeof value), (double)DG_VISION_ROPE_THETA);
        return DG_EMODEL;
    }
    json_t *thetas[2] = {theta, json_object_get(rp, "rope_theta")};
    for (int i = 0; i < 2; i++) {
        if (!thetas[i] || json_is_null(thetas[i]) ||
            (json_is_number(thetas[i]) && json_number_value(thetas[i]) == DG_VISION_ROPE_THETA))
            continue;
        snprintf(err, errlen, "%s: vision_config.%srope_theta %s is not implemented (the tower's rope base is %g)",
                 label, i ? "rope_parameters." : "", shown(thetas[i], value, sizeof value), (double)DG_VISION_ROPE_THETA);
        return DG_EMODEL;
    }
    return 0;
}

/* fullatt_block_indexes: the blocks that attend over the whole image, each a block of the
 * tower, at most 16. Absent: transformers' default [7, 15, 23, 31], of which a tower of
 * fewer blocks has those below its depth (transformers tests membership block by block). */
static int read_fullatt(json_t *vc, const char *label, dg_vision_config *v, char *err, size_t errlen) {
    const int cap = (int)(sizeof v->fullatt_block_indexes / sizeof v->fullatt_block_indexes[0]);
    json_t *fa = json_object_get(vc, "fullatt_block_indexes");
    v->n_fullatt = 0;
    if (!fa) {
        for (int i = 7; i < 32 && i < v->depth; i += 8) v->fullatt_block_indexes[v->n_fullatt++] = i;
        return 0;
    }
    if (!json_is_array(fa)) {
        char value[64];
        snprintf(err, errlen, "%s: vision_config.fullatt_block_indexes %s must be a list of block numbers", label,
                 shown(fa, value, sizeof value));
        return DG_EMODEL;
    }
    if (json_array_size(fa) > (size_t)cap) {
        snprintf(err, errlen, "%s: vision_config.fullatt_block_indexes lists %zu blocks, more than the %d the engine "
                 "keeps", label, json_array_size(fa), cap);
        return DG_EMODEL;
    }
    size_t i;
    json_t *x;
    json_array_foreach(fa, i, x) {
        if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) >= v->depth) {
            char value[64];
            snprintf(err, errlen, "%s: vision_config.fullatt_block_indexes[%zu] %s is not a block (depth %d: 0 .. %d)",
                     label, i, shown(x, value, sizeof value), v->depth, v->depth - 1);
            return DG_EMODEL;
        }
        v->fullatt_block_indexes[v->n_fullatt++] = (int)json_integer_value(x);
    }
    return 0;
}

static int parse_vision(json_t *root, const char *label, dg_vision_config *v, char *err, size_t errlen) {
    json_t *vc = json_object_get(root, "vision_config");
    json_t *empty = json_object();
    int rc = 0;
    if (!json_is_object(vc)) vc = empty;
    /* defaults: transformers Qwen2_5_VLVisionConfig, except hidden_size (1280 in every
     * checkpoint, 3584 in the class) and tokens_per_second (2 vs 4): spec §1.2 */
#define INT(key, def, dst) if ((rc = get_int(vc, NULL, key, def, 0, dst, label, err, errlen)) < 0) goto out
    INT("depth", 32, &v->depth);
    INT("hidden_size", 1280, &v->hidden_size);
    INT("num_heads", 16, &v->num_heads);
    INT("intermediate_size", 3420, &v->intermediate_size);
    INT("in_chans", 3, &v->in_chans);
    if (json_object_get(vc, "in_channels")) INT("in_channels", 3, &v->in_chans);
    INT("patch_size", 14, &v->patch_size);
    INT("temporal_patch_size", 2, &v->temporal_patch_size);
    INT("spatial_merge_size", 2, &v->spatial_merge_size);
    INT("window_size", 112, &v->window_size);
    INT("out_hidden_size", 3584, &v->out_hidden_size);
    INT("tokens_per_second", 2, &v->tokens_per_second);
#undef INT
    if ((rc = check_act(json_object_get(vc, "hidden_act"), "vision_config.", label, err, errlen)) < 0 ||
        (rc = check_vision_rope(vc, label, err, errlen)) < 0 ||
        (rc = read_fullatt(vc, label, v, err, errlen)) < 0)
        goto out;
    if (v->num_heads <= 0 || v->hidden_size % v->num_heads) {
        snprintf(err, errlen, "%s: vision_config hidden_size %d is not a multiple of num_heads %d",
                 label, v->hidden_size, v->num_heads);
        rc = DG_EMODEL;
    }
out:
    json_decref(empty);
    return rc;
}

int dg_config_parse(const char *json, size_t len, const char *label, dg_qwen2vl_config *c, char *err,
                    size_t errlen) {
    json_error_t je;
    json_t *root;
    int rc = dg_json_loadb(json, len, 0, &root, &je);
    memset(c, 0, sizeof *c);
    if (rc == DG_ENOMEM) {
        snprintf(err, errlen, "%s: out of memory reading it", label);
        return rc;
    }
    if (!json_is_object(root)) {
        snprintf(err, errlen, "%s: not a JSON object (%s, line %d)", label, root ? "" : je.text, je.line);
        json_decref(root);
        return DG_EMODEL;
    }
    rc = parse_text(root, label, &c->text, err, errlen);
    if (rc == 0) rc = parse_vision(root, label, &c->vision, err, errlen);
    json_decref(root);
    return rc;
}

int dg_config_load(const char *dir, dg_qwen2vl_config *c, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char why[128];
    FILE *f;
    const int opened = dg_fopen_regular(path, &f, why, sizeof why);
    if (opened) {
        snprintf(err, errlen, "%s: cannot open: %s", path, why);
        return opened;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0, r;
    int rc = 0;
    do {
        if (len + 65536 > cap) {
            char *nb = realloc(buf, cap = len + 65536 * 2);
            if (!nb) { rc = DG_ENOMEM; break; }
            buf = nb;
        }
        r = fread(buf + len, 1, cap - len, f);
        len += r;
    } while (r > 0 && len < (16u << 20));
    fclose(f);
    if (rc == 0) rc = dg_config_parse(buf, len, path, c, err, errlen);
    free(buf);
    return rc;
}
