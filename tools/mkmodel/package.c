/* The package manifest (docs/DESIGN.md §5): DIR/duogen.json naming the components that were
 * written, the <BOV> token, the LLM layers whose hidden states feed the connector, and the
 * preset's defaults. <BOV> is added to mllm/tokenizer_config.json as a special added token
 * right after the last one (151665 for the real Qwen2 vocabulary, inside the 151936
 * embedding rows: no resize, as OmniGen2 does for its image token; docs/specs/duogen_paper.md). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mkmodel.h"

static int exists(const char *dir, const char *name) {
    char path[4096];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, name);
    return stat(path, &st) == 0;
}

static int add_bov(const char *mllm, int vocab_size, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/tokenizer_config.json", mllm);
    json_error_t je;
    json_t *tc = json_load_file(path, 0, &je);
    json_t *added = tc ? json_object_get(tc, "added_tokens_decoder") : NULL;
    if (!json_is_object(added)) {
        snprintf(err, errlen, "%s: no added_tokens_decoder (%s)", path, tc ? "missing" : je.text);
        json_decref(tc);
        return -1;
    }
    long last = -1;
    const char *key;
    json_t *v;
    json_object_foreach(added, key, v) {
        const char *content = json_string_value(json_object_get(v, "content"));
        if (content && !strcmp(content, "<BOV>")) {
            json_decref(tc);   /* already there: writing the package again changes nothing */
            return 0;
        }
        long id = strtol(key, NULL, 10);
        if (id > last) last = id;
    }
    if (last + 1 >= vocab_size) {
        snprintf(err, errlen, "%s: no embedding row left for <BOV> (last added token %ld, vocab_size %d)",
                 path, last, vocab_size);
        json_decref(tc);
        return -1;
    }
    char id[32];
    snprintf(id, sizeof id, "%ld", last + 1);
    json_object_set_new(added, id, json_pack("{s:s,s:b,s:b,s:b,s:b,s:b}", "content", "<BOV>", "lstrip", 0,
                                             "normalized", 0, "rstrip", 0, "single_word", 0, "special", 1));
    int rc = json_dump_file(tc, path, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(tc);
    if (rc) snprintf(err, errlen, "%s: write failed", path);
    return rc ? -1 : 0;
}

int mk_write_package(const char *dir, mk_preset preset, char *err, size_t errlen) {
    char mllm[4096], path[4096];
    snprintf(mllm, sizeof mllm, "%s/mllm", dir);
    snprintf(path, sizeof path, "%s/config.json", mllm);
    json_error_t je;
    json_t *cfg = json_load_file(path, 0, &je);
    if (!cfg) {
        snprintf(err, errlen, "%s: %s", path, je.text);
        return -1;
    }
    json_t *text = json_object_get(cfg, "text_config");
    json_t *src = json_is_object(text) && json_object_get(text, "num_hidden_layers") ? text : cfg;
    int layers = (int)json_integer_value(json_object_get(src, "num_hidden_layers"));
    int vocab = (int)json_integer_value(json_object_get(src, "vocab_size"));
    json_decref(cfg);
    if (layers <= 0 || vocab <= 0) {
        snprintf(err, errlen, "%s: num_hidden_layers or vocab_size missing", path);
        return -1;
    }
    if (add_bov(mllm, vocab, err, errlen) < 0) return -1;

    static const char *names[] = {"duogen-tiny", "duogen-small", "duogen-full"};
    /* defaults a CPU runs in seconds (tiny), a minute (small), and the paper's setting (full) */
    static const struct { int tokens, side, steps, images, context; double guidance; } d[] = {
        {48, 64, 6, 2, 2048, 4.0}, {256, 256, 20, 2, 4096, 5.0}, {1024, 1024, 35, 4, 16384, 7.0},
    };
    json_t *m = json_object(), *comp = json_object(), *cl = json_array(), *def = json_object();
    json_object_set_new(m, "format", json_string("duogen-package-1"));
    json_object_set_new(m, "name", json_string(names[preset]));
    json_object_set_new(comp, "mllm", json_string("mllm"));
    if (exists(dir, "dit")) json_object_set_new(comp, "dit", json_string("dit"));
    if (exists(dir, "vae")) json_object_set_new(comp, "vae", json_string("vae"));
    if (exists(dir, "connector.safetensors")) json_object_set_new(comp, "connector", json_string("connector.safetensors"));
    json_object_set_new(m, "components", comp);
    json_object_set_new(m, "bov_token", json_string("<BOV>"));
    for (int i = 0; i < layers; i++) json_array_append_new(cl, json_integer(i));   /* all, as Cosmos-Predict2.5 */
    json_object_set_new(m, "condition_layers", cl);
    json_object_set_new(m, "max_context", json_integer(d[preset].context));
    json_object_set_new(def, "max_new_tokens", json_integer(d[preset].tokens));
    json_object_set_new(def, "temperature", json_real(0.0));
    json_object_set_new(def, "width", json_integer(d[preset].side));
    json_object_set_new(def, "height", json_integer(d[preset].side));
    json_object_set_new(def, "steps", json_integer(d[preset].steps));
    json_object_set_new(def, "guidance_scale", json_real(d[preset].guidance));
    json_object_set_new(def, "max_images", json_integer(d[preset].images));
    json_object_set_new(def, "shift", json_real(5.0));
    json_object_set_new(m, "defaults", def);
    snprintf(path, sizeof path, "%s/duogen.json", dir);
    int rc = json_dump_file(m, path, JSON_INDENT(2));
    json_decref(m);
    if (rc) {
        snprintf(err, errlen, "%s: write failed", path);
        return -1;
    }
    return 0;
}
