/* dg-import — a model package from published checkpoints, their files left where they are
 * (docs/PUBLISHED.md).
 *
 *   dg-import --pipeline DIR [--mllm DIR] --out PKG [--name NAME] [--draw-marker TEXT]
 *             [--system-prompt TEXT] [--max-context N] [--force]
 *
 * --pipeline: a diffusers Cosmos2_5_PredictBasePipeline folder (nvidia/Cosmos-Predict2.5-2B at
 * revision diffusers/base/post-trained): model_index.json, transformer/, vae/, text_encoder/,
 * tokenizer/, scheduler/. --mllm: a Hugging Face Qwen2.5-VL chat checkpoint that writes the
 * text in place of the pipeline's text encoder; its decoder must have the width and depth the
 * transformer's crossattn_proj takes (layers x hidden = crossattn_proj_in_channels).
 *
 * PKG gets duogen.json and symbolic links: dit -> transformer/, vae -> vae/, mllm -> the
 * --mllm folder, or mllm/ with a link to each file of text_encoder/ and tokenizer/. Nothing
 * is converted or copied. duogen.json records what the pipeline's code does rather than its
 * files say (diffusers pipeline_cosmos2_5_predict.py, `_get_prompt_embeds` and `__call__`):
 * the system prompt, padding to max_sequence_length 512 with the tokenizer's pad token on
 * its padding side, all decoder layers standardized (unbiased std + 1e-8), the default
 * negative prompt; and the scheduler's settings as defaults (Karras sigmas, 36 steps,
 * guidance 7, 1280x704). A tokenizer without <BOV> gets one on the first embedding row no
 * token uses ("bov_id"). --draw-marker makes TEXT act as <BOV> when the model writes it, and
 * tells the model so in the system prompt of jobs that have none (--system-prompt replaces
 * that text). --max-context: the package's context in tokens (512 .. 2^20: the pipeline's
 * prompt alone is 512; default 8192, or less where the decoder's max_position_embeddings is).
 * --force: PKG may exist; what an earlier import made there (also one that stopped half-way)
 * is replaced, anything else left; a name of an import's holding what an import does not
 * make stops it before anything is removed. Exit status 0, or 1 with a message that names the file and
 * what is wrong. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "duogen.h"
#include "text/tokenizer.h"

/* diffusers pipeline_cosmos2_5_predict.py: _get_prompt_embeds' system message,
 * DEFAULT_NEGATIVE_PROMPT, __call__'s defaults */
#define PIPE_SYSTEM "You are a helpful assistant who will provide prompts to an image generator."
#define PIPE_NEGATIVE                                                                                       \
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "         \
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "    \
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, "          \
    "jerky movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special "   \
    "effects, fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and "       \
    "flickering. Overall, the video is of poor quality."
#define PIPE_MAX_SEQUENCE 512
#define MARKER_SYSTEM                                                                                     \
    "You are a helpful assistant. You can show pictures: write %s where a picture should appear, and it " \
    "will be drawn there from the conversation."

typedef struct {
    const char *pipeline, *mllm, *out, *name, *marker, *system;
    int         max_context, force;
} opts;

static int die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("dg-import: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    return 1;
}

static json_t *load(const char *dir, const char *name, char *path, size_t cap) {
    json_error_t je;
    snprintf(path, cap, "%s/%s", dir, name);
    json_t *j = json_load_file(path, 0, &je);
    if (!j) die("%s: %s", path, je.text);
    return j;
}

/* model_index.json names the published classes. */
static int check_index(const char *dir) {
    static const char *want[][3] = {
        {"transformer", "diffusers", "CosmosTransformer3DModel"}, {"vae", "diffusers", "AutoencoderKLWan"},
        {"scheduler", "diffusers", "UniPCMultistepScheduler"},
        {"text_encoder", "transformers", "Qwen2_5_VLForConditionalGeneration"}, {"tokenizer", "transformers", NULL},
    };
    char path[PATH_MAX];
    json_t *j = load(dir, "model_index.json", path, sizeof path);
    if (!j) return 1;
    int rc = 0;
    const char *cls = json_string_value(json_object_get(j, "_class_name"));
    if (!cls || strcmp(cls, "Cosmos2_5_PredictBasePipeline"))
        rc = die("%s: _class_name is \"%s\", not Cosmos2_5_PredictBasePipeline", path, cls ? cls : "");
    for (size_t i = 0; i < sizeof want / sizeof *want && !rc; i++) {
        json_t *c = json_object_get(j, want[i][0]);
        const char *lib = json_string_value(json_array_get(c, 0)), *k = json_string_value(json_array_get(c, 1));
        if (!lib || !k || strcmp(lib, want[i][1]) || (want[i][2] && strcmp(k, want[i][2])))
            rc = die("%s: \"%s\" must be [\"%s\", \"%s\"]", path, want[i][0], want[i][1],
                     want[i][2] ? want[i][2] : "Qwen2Tokenizer");
    }
    json_decref(j);
    return rc;
}

/* The scheduler the engine runs: UniPC bh2 order 2 with corrector, flow sigmas, Karras over
 * [0.01, 200] (engine/draw/flow.h). */
static int check_scheduler(const char *dir) {
    char path[PATH_MAX];
    json_t *j = load(dir, "scheduler/scheduler_config.json", path, sizeof path);
    if (!j) return 1;
    struct { const char *key, *want; } strs[] = {{"prediction_type", "flow_prediction"}, {"solver_type", "bh2"},
                                                 {"final_sigmas_type", "zero"}};
    const char *trues[] = {"use_flow_sigmas", "use_karras_sigmas", "predict_x0", "lower_order_final"};
    const char *falses[] = {"thresholding", "use_dynamic_shifting", "use_exponential_sigmas", "use_beta_sigmas"};
    int rc = 0;
    for (size_t i = 0; i < 3 && !rc; i++) {
        const char *v = json_string_value(json_object_get(j, strs[i].key));
        if (!v || strcmp(v, strs[i].want)) rc = die("%s: \"%s\" must be \"%s\"", path, strs[i].key, strs[i].want);
    }
    for (size_t i = 0; i < 4 && !rc; i++)
        if (!json_is_true(json_object_get(j, trues[i]))) rc = die("%s: \"%s\" must be true", path, trues[i]);
    for (size_t i = 0; i < 4 && !rc; i++)
        if (json_is_true(json_object_get(j, falses[i]))) rc = die("%s: \"%s\" must be false", path, falses[i]);
    json_t *dc = json_object_get(j, "disable_corrector");
    if (!rc && (json_integer_value(json_object_get(j, "solver_order")) != 2 || (dc && json_array_size(dc))))
        rc = die("%s: \"solver_order\" must be 2 and \"disable_corrector\" empty", path);
    if (!rc && (json_number_value(json_object_get(j, "sigma_min")) != 0.01 ||
                json_number_value(json_object_get(j, "sigma_max")) != 200.0))
        rc = die("%s: the Karras sigmas must span [0.01, 200] (the published scheduler's)", path);
    json_decref(j);
    return rc;
}

/* The decoder's depth and width (config.json, flat or under text_config). */
static int mllm_shape(const char *dir, int *layers, int *hidden, int *vocab, int *max_pos) {
    char path[PATH_MAX];
    json_t *j = load(dir, "config.json", path, sizeof path);
    if (!j) return 1;
    json_t *t = json_object_get(j, "text_config");
    json_t *src = json_is_object(t) && json_object_get(t, "hidden_size") ? t : j;
    const char *type = json_string_value(json_object_get(j, "model_type"));
    *layers = (int)json_integer_value(json_object_get(src, "num_hidden_layers"));
    *hidden = (int)json_integer_value(json_object_get(src, "hidden_size"));
    *vocab = (int)json_integer_value(json_object_get(src, "vocab_size"));
    *max_pos = (int)json_integer_value(json_object_get(src, "max_position_embeddings"));
    int rc = 0;
    if (!type || strcmp(type, "qwen2_5_vl"))
        rc = die("%s: model_type \"%s\": a Qwen2.5-VL (qwen2_5_vl) checkpoint is needed", path, type ? type : "");
    else if (*layers < 1 || *hidden < 1 || *vocab < 1)
        rc = die("%s: no num_hidden_layers, hidden_size or vocab_size", path);
    json_decref(j);
    return rc;
}

/* The transformer's crossattn_proj input width: what the condition layers must give. */
static int proj_channels(const char *dir, long *in) {
    char path[PATH_MAX];
    json_t *j = load(dir, "transformer/config.json", path, sizeof path);
    if (!j) return 1;
    int rc = 0;
    *in = (long)json_integer_value(json_object_get(j, "crossattn_proj_in_channels"));
    if (!json_is_true(json_object_get(j, "use_crossattn_projection")) || *in < 1)
        rc = die("%s: a Cosmos-Predict2.5 transformer has use_crossattn_projection true and "
                 "crossattn_proj_in_channels", path);
    json_decref(j);
    return rc;
}

/* Whether PATH is the duogen.json of an import (it names what it was imported from): a
 * package of another making (mkmodel's, a trained one) has its own, never replaced. */
static int imported_json(const char *path) {
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    const int ours = j && json_is_object(json_object_get(j, "imported_from"));
    json_decref(j);
    return ours;
}

/* Under --force: what an earlier import made in PKG goes (duogen.json, the dit and vae links,
 * the mllm link or folder of links), also when that import stopped half-way; anything else
 * there is left. Every name is looked at first (apply 0), and one that is not what an import
 * makes stops this one before anything is removed; then (apply 1) they go. */
static int clear_package(const char *out, int apply) {
    static const char *const names[] = {"duogen.json", "dit", "vae", "mllm"};
    char path[PATH_MAX + 64], sub[2 * PATH_MAX];
    struct stat st;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        snprintf(path, sizeof path, "%s/%s", out, names[i]);
        if (lstat(path, &st) < 0) {
            if (errno == ENOENT) continue;
            return die("%s: %s", path, strerror(errno));
        }
        if (S_ISLNK(st.st_mode) || (i == 0 && S_ISREG(st.st_mode) && imported_json(path))) {
            if (apply && unlink(path) < 0) return die("%s: %s", path, strerror(errno));
            continue;
        }
        if (i == 3 && S_ISDIR(st.st_mode)) {   /* the folder of links of an import without --mllm */
            DIR *d = opendir(path);
            if (!d) return die("%s: %s", path, strerror(errno));
            struct dirent *e;
            while ((e = readdir(d))) {
                if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2]))) continue;
                snprintf(sub, sizeof sub, "%s/%s", path, e->d_name);
                if (lstat(sub, &st) < 0 || !S_ISLNK(st.st_mode)) {
                    closedir(d);
                    return die("%s: not a link an import made: remove it yourself (nothing was changed)", sub);
                }
                if (apply && unlink(sub) < 0) {
                    closedir(d);
                    return die("%s: %s", sub, strerror(errno));
                }
            }
            closedir(d);
            if (apply && rmdir(path) < 0) return die("%s: %s", path, strerror(errno));
            continue;
        }
        return die("%s: not what an import makes (a link%s): remove it yourself (nothing was changed)", path,
                   i == 0 ? ", or a file naming what it was imported from" : "");
    }
    return 0;
}

static int link_to(const char *target, const char *link) {
    char abs[PATH_MAX];
    if (!realpath(target, abs)) return die("%s: %s", target, strerror(errno));
    if (symlink(abs, link) < 0) return die("%s: %s", link, strerror(errno));
    return 0;
}

/* PKG/mllm/: a link to each file of the text encoder's and the tokenizer's folders; a name
 * in both keeps the first (the text encoder's). */
static int link_files(const char *from, const char *to) {
    char abs[PATH_MAX], src[2 * PATH_MAX], dst[2 * PATH_MAX];
    DIR *d = realpath(from, abs) ? opendir(abs) : NULL;
    if (!d) return die("%s: %s", from, strerror(errno));
    struct dirent *e;
    struct stat st;
    int rc = 0;
    while (!rc && (e = readdir(d))) {
        snprintf(src, sizeof src, "%s/%s", abs, e->d_name);
        snprintf(dst, sizeof dst, "%s/%s", to, e->d_name);
        if (stat(src, &st) < 0 || !S_ISREG(st.st_mode) || lstat(dst, &st) == 0) continue;
        if (symlink(src, dst) < 0) rc = die("%s: %s", dst, strerror(errno));
    }
    closedir(d);
    return rc;
}

/* The tokenizer's pad token and side (tokenizer_config.json; the fast tokenizer's default
 * side is right). */
static int pad_of(const char *dir, char *pad, size_t cap, char *side, size_t side_cap) {
    char path[PATH_MAX];
    json_t *j = load(dir, "tokenizer_config.json", path, sizeof path);
    if (!j) return 1;
    json_t *p = json_object_get(j, "pad_token");
    const char *s = json_is_object(p) ? json_string_value(json_object_get(p, "content")) : json_string_value(p);
    const char *ps = json_string_value(json_object_get(j, "padding_side"));
    int rc = s ? 0 : die("%s: no \"pad_token\" (the pipeline pads its prompt to %d tokens)", path, PIPE_MAX_SEQUENCE);
    if (s) snprintf(pad, cap, "%s", s);
    snprintf(side, side_cap, "%s", ps ? ps : "right");
    json_decref(j);
    return rc;
}

/* <BOV>: the tokenizer's, or the first row after every token id (inside vocab_size rows). */
static int bov_row(const char *mllm, int vocab, json_t *m) {
    dg_tok *tok;
    char err[512];
    if (dg_tok_open(mllm, &tok, err, sizeof err) < 0) return die("%s", err);
    int32_t have = dg_tok_added_id(tok, "<BOV>"), next = dg_tok_n_ids(tok);
    dg_tok_close(tok);
    json_object_set_new(m, "bov_token", json_string("<BOV>"));
    if (have >= 0) return 0;
    if (next >= vocab)
        return die("%s: every one of the %d embedding rows is a token: none is free for <BOV>", mllm, vocab);
    json_object_set_new(m, "bov_id", json_integer(next));
    return 0;
}

static json_t *condition(const char *pad, const char *side) {
    return json_pack("{s:s,s:s,s:s,s:i,s:s,s:s,s:s,s:f}", "source", "prompt", "system_prompt", PIPE_SYSTEM,
                     "negative_prompt", PIPE_NEGATIVE, "max_tokens", PIPE_MAX_SEQUENCE, "pad_token", pad,
                     "padding_side", side, "std", "unbiased", "eps", 1e-8);
}

static json_t *defaults(void) {
    return json_pack("{s:i,s:f,s:i,s:i,s:i,s:f,s:s,s:i}", "max_new_tokens", 1024, "temperature", 0.0, "width",
                     1280, "height", 704, "steps", 36, "guidance_scale", 7.0, "schedule", "karras", "max_images", 4);
}

static int write_manifest(const opts *o, int layers, int vocab, int max_pos, const char *mllm, const char *tokdir) {
    char pad[64], side[16], path[PATH_MAX], abs[PATH_MAX];
    if (pad_of(tokdir, pad, sizeof pad, side, sizeof side)) return 1;
    json_t *m = json_object(), *cl = json_array();
    json_object_set_new(m, "format", json_string("duogen-package-1"));
    json_object_set_new(m, "name", json_string(o->name));
    json_object_set_new(m, "components", json_pack("{s:s,s:s,s:s}", "mllm", "mllm", "dit", "dit", "vae", "vae"));
    int rc = bov_row(mllm, vocab, m);
    for (int i = 0; i < layers; i++) json_array_append_new(cl, json_integer(i));
    json_object_set_new(m, "condition_layers", cl);
    json_object_set_new(m, "condition", condition(pad, side));
    int ctx = o->max_context ? o->max_context : 8192;
    if (max_pos > 0 && ctx > max_pos) ctx = max_pos;   /* >= PIPE_MAX_SEQUENCE: import() checked */
    json_object_set_new(m, "max_context", json_integer(ctx));
    if (o->marker) {
        char sys[1024];
        snprintf(sys, sizeof sys, MARKER_SYSTEM, o->marker);
        json_object_set_new(m, "draw_marker", json_string(o->marker));
        json_object_set_new(m, "system_prompt", json_string(o->system ? o->system : sys));
    } else if (o->system) {
        json_object_set_new(m, "system_prompt", json_string(o->system));
    }
    json_object_set_new(m, "defaults", defaults());
    char mllm_abs[PATH_MAX];
    json_object_set_new(m, "imported_from",
                        json_pack("{s:s,s:s?}", "pipeline", realpath(o->pipeline, abs) ? abs : o->pipeline, "mllm",
                                  o->mllm && realpath(o->mllm, mllm_abs) ? mllm_abs : o->mllm));
    snprintf(path, sizeof path, "%s/duogen.json", o->out);
    if (!rc && json_dump_file(m, path, JSON_INDENT(2)) < 0) rc = die("%s: write failed", path);
    json_decref(m);
    return rc;
}

static int import(const opts *o) {
    char te[PATH_MAX], tokdir[PATH_MAX], path[PATH_MAX], mllm[PATH_MAX];
    int layers, hidden, vocab, max_pos;
    long proj_in;
    if (check_index(o->pipeline) || check_scheduler(o->pipeline) || proj_channels(o->pipeline, &proj_in)) return 1;
    snprintf(te, sizeof te, "%s/%s", o->mllm ? o->mllm : o->pipeline, o->mllm ? "" : "text_encoder");
    if (mllm_shape(te, &layers, &hidden, &vocab, &max_pos)) return 1;
    if ((long)layers * hidden != proj_in)
        return die("%s: %d decoder layers x width %d give %ld condition channels, but the transformer's "
                   "crossattn_proj takes %ld (crossattn_proj_in_channels): the MLLM must have the text "
                   "encoder's depth and width (Qwen2.5-VL-7B: 28 x 3584 = 100352)",
                   te, layers, hidden, (long)layers * hidden, proj_in);
    if (max_pos > 0 && max_pos < PIPE_MAX_SEQUENCE)   /* before anything is made: nothing to clear up */
        return die("%s/config.json: max_position_embeddings %d: the pipeline's prompt alone is %d tokens; this "
                   "decoder cannot hold it", te, max_pos, PIPE_MAX_SEQUENCE);
    if (mkdir(o->out, 0755) < 0 && !(errno == EEXIST && o->force)) return die("%s: %s", o->out, strerror(errno));
    if (o->force && (clear_package(o->out, 0) || clear_package(o->out, 1))) return 1;
    snprintf(mllm, sizeof mllm, "%s/mllm", o->out);
    const char *links[][2] = {{"transformer", "dit"}, {"vae", "vae"}};
    for (int i = 0; i < 2; i++) {
        char target[PATH_MAX];
        snprintf(target, sizeof target, "%s/%s", o->pipeline, links[i][0]);
        snprintf(path, sizeof path, "%s/%s", o->out, links[i][1]);
        if (link_to(target, path)) return 1;
    }
    if (o->mllm) {
        if (link_to(o->mllm, mllm)) return 1;
        snprintf(tokdir, sizeof tokdir, "%s", mllm);
    } else {
        if (mkdir(mllm, 0755) < 0) return die("%s: %s", mllm, strerror(errno));
        snprintf(tokdir, sizeof tokdir, "%s/tokenizer", o->pipeline);
        if (link_files(te, mllm) || link_files(tokdir, mllm)) return 1;
        snprintf(tokdir, sizeof tokdir, "%s", mllm);
    }
    return write_manifest(o, layers, vocab, max_pos, mllm, tokdir);
}

#define USAGE "usage: dg-import --pipeline DIR [--mllm DIR] --out PKG [--name NAME] [--draw-marker TEXT] " \
              "[--system-prompt TEXT] [--max-context N] [--force]"

int main(int argc, char **argv) {
    opts o = {.name = "cosmos-predict2.5"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            printf("%s\n(what each option does: the header of tools/dg-import/main.c, and docs/PUBLISHED.md)\n", USAGE);
            return 0;
        }
        if (!strcmp(a, "--force")) { o.force = 1; continue; }
        if (!v) return die("%s: needs a value (see the header of tools/dg-import/main.c)", a);
        if (!strcmp(a, "--pipeline")) o.pipeline = v;
        else if (!strcmp(a, "--mllm")) o.mllm = v;
        else if (!strcmp(a, "--out")) o.out = v;
        else if (!strcmp(a, "--name")) o.name = v;
        else if (!strcmp(a, "--draw-marker")) o.marker = v;
        else if (!strcmp(a, "--system-prompt")) o.system = v;
        else if (!strcmp(a, "--max-context")) {
            char *end;
            long n = strtol(v, &end, 10);
            /* the package's condition prompt is PIPE_MAX_SEQUENCE tokens: its context holds them */
            if (*end || end == v || n < PIPE_MAX_SEQUENCE || n > 1 << 20)
                return die("--max-context %s: a number of tokens in %d..%d (the pipeline's prompt alone is %d)", v,
                           PIPE_MAX_SEQUENCE, 1 << 20, PIPE_MAX_SEQUENCE);
            o.max_context = (int)n;
        }
        else return die("unknown option %s", a);
        i++;
    }
    if (!o.pipeline || !o.out)
        return die(USAGE);
    if (o.marker && (!o.marker[0] || strlen(o.marker) >= 64)) return die("--draw-marker: 1 to 63 bytes");
    return import(&o);
}
