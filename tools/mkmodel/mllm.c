/* mllm.c — writes DIR/mllm/: a Qwen2.5-VL package in the Hugging Face layout (spec
 * docs/specs/qwen2_5_vl.md §1-2, §5.1, §7) with random weights: the text decoder and the vision tower. */
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "mkmodel.h"

typedef struct {
    /* text */
    int    hidden, layers, heads, kv_heads, intermediate, vocab;   /* vocab: with the real vocab */
    int    mrope[3];
    int    tie;
    double std;             /* weight init std (HF initializer_range; larger for tiny, see below) */
    size_t max_shard;
    /* vision */
    int    v_depth, v_hidden, v_heads, v_intermediate, v_fullatt;
} mllm_shape;

/* tiny: seconds on a CPU; std 1/sqrt(64) so that every layer changes the output by O(1)
 *       (with HF's 0.02 a 64-wide model is the embedding plus noise, and a fidelity test
 *       would not see a broken attention);
 * small: Qwen2.5-0.5B text shapes (vision: real widths, 4 blocks);
 * full: Qwen2.5-VL-7B (spec §1.1), sharded like the published files. */
static const mllm_shape SHAPES[] = {
    [MK_TINY] = {64, 2, 4, 2, 128, 151936, {2, 3, 3}, 1, 0.125, (size_t)1 << 31,
                 2, 32, 2, 64, 1},
    [MK_SMALL] = {896, 24, 14, 2, 4864, 151936, {8, 12, 12}, 1, 0.02, (size_t)1 << 31,
                  4, 1280, 16, 3420, 3},
    [MK_FULL] = {3584, 28, 28, 4, 18944, 152064, {16, 24, 24}, 0, 0.02, (size_t)4 << 30,
                 32, 1280, 16, 3420, 7},
};

/* Qwen2.5's added tokens in id order (its published tokenizer_config.json, vocab/qwen2 here,
 * which tools/train/tokenizer.py reads) */
static const char *SPECIALS[] = {
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
};
#define N_SPECIALS 22
#define N_SPECIAL_TRUE 14      /* the first 14 have "special": true (spec §1.3) */
#define QWEN_SPECIAL_BASE 151643

/* The own vocabulary without --vocab: the 256 byte tokens, a few merges, the specials. */
static const char *OWN_MERGES[][2] = {
    {"\xc4\xa0", "t"}, {"h", "e"}, {"i", "n"}, {"\xc4\xa0", "a"}, {"e", "r"}, {"o", "n"},
    {"\xc4\xa0t", "he"}, {"r", "e"},
};
#define N_OWN_MERGES 8
#define OWN_VOCAB 320          /* embedding rows: 256 + 8 + 22 tokens, padded like Qwen's */

static int dump(const char *dir, const char *name, json_t *j, char *err, size_t errlen) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int rc = json_dump_file(j, path, JSON_INDENT(2) | JSON_REAL_PRECISION(10));
    json_decref(j);
    if (rc < 0) snprintf(err, errlen, "%s: write failed", path);
    return rc;
}

static json_t *int_array(const int *v, int n) {
    json_t *a = json_array();
    for (int i = 0; i < n; i++) json_array_append_new(a, json_integer(v[i]));
    return a;
}

static int write_config(const char *dir, const mllm_shape *s, int vocab, int base, char *err,
                        size_t errlen) {
    json_t *c = json_object(), *v = json_object(), *rope = json_object();
    json_object_set_new(c, "architectures", json_pack("[s]", "Qwen2_5_VLForConditionalGeneration"));
    json_object_set_new(c, "model_type", json_string("qwen2_5_vl"));
    json_object_set_new(c, "attention_dropout", json_real(0.0));
    json_object_set_new(c, "bos_token_id", json_integer(base));
    json_object_set_new(c, "eos_token_id", json_integer(base + 2));
    json_object_set_new(c, "pad_token_id", json_integer(base));
    json_object_set_new(c, "vision_start_token_id", json_integer(base + 9));
    json_object_set_new(c, "vision_end_token_id", json_integer(base + 10));
    json_object_set_new(c, "vision_token_id", json_integer(base + 11));
    json_object_set_new(c, "image_token_id", json_integer(base + 12));
    json_object_set_new(c, "video_token_id", json_integer(base + 13));
    json_object_set_new(c, "hidden_act", json_string("silu"));
    json_object_set_new(c, "hidden_size", json_integer(s->hidden));
    json_object_set_new(c, "initializer_range", json_real(s->std));
    json_object_set_new(c, "intermediate_size", json_integer(s->intermediate));
    json_object_set_new(c, "max_position_embeddings", json_integer(128000));
    json_object_set_new(c, "max_window_layers", json_integer(s->layers));
    json_object_set_new(c, "num_attention_heads", json_integer(s->heads));
    json_object_set_new(c, "num_hidden_layers", json_integer(s->layers));
    json_object_set_new(c, "num_key_value_heads", json_integer(s->kv_heads));
    json_object_set_new(c, "rms_norm_eps", json_real(1e-6));
    json_object_set_new(rope, "type", json_string("mrope"));
    json_object_set_new(rope, "mrope_section", int_array(s->mrope, 3));
    json_object_set_new(c, "rope_scaling", rope);
    json_object_set_new(c, "rope_theta", json_real(1000000.0));
    json_object_set_new(c, "sliding_window", json_integer(32768));
    json_object_set_new(c, "tie_word_embeddings", json_boolean(s->tie));
    json_object_set_new(c, "torch_dtype", json_string("bfloat16"));
    json_object_set_new(c, "transformers_version", json_string("4.41.2"));
    json_object_set_new(c, "use_cache", json_true());
    json_object_set_new(c, "use_sliding_window", json_false());
    json_object_set_new(c, "vocab_size", json_integer(vocab));
    json_object_set_new(v, "depth", json_integer(s->v_depth));
    json_object_set_new(v, "hidden_act", json_string("silu"));
    json_object_set_new(v, "hidden_size", json_integer(s->v_hidden));
    json_object_set_new(v, "intermediate_size", json_integer(s->v_intermediate));
    json_object_set_new(v, "num_heads", json_integer(s->v_heads));
    json_object_set_new(v, "in_chans", json_integer(3));
    json_object_set_new(v, "out_hidden_size", json_integer(s->hidden));
    json_object_set_new(v, "patch_size", json_integer(14));
    json_object_set_new(v, "spatial_merge_size", json_integer(2));
    json_object_set_new(v, "spatial_patch_size", json_integer(14));
    json_object_set_new(v, "temporal_patch_size", json_integer(2));
    json_object_set_new(v, "window_size", json_integer(112));
    int fa[4], nfa = 0;
    for (int j = s->v_fullatt; j < s->v_depth && nfa < 4; j += s->v_fullatt + 1) fa[nfa++] = j;
    json_object_set_new(v, "fullatt_block_indexes", int_array(fa, nfa));
    json_object_set_new(v, "tokens_per_second", json_integer(2));
    json_object_set_new(c, "vision_config", v);
    return dump(dir, "config.json", c, err, errlen);
}

static int write_side_configs(const char *dir, int base, char *err, size_t errlen) {
    double mean[3] = {0.48145466, 0.4578275, 0.40821073}, stdv[3] = {0.26862954, 0.26130258, 0.27577711};
    json_t *p = json_object(), *g = json_object();
    json_object_set_new(p, "min_pixels", json_integer(3136));
    json_object_set_new(p, "max_pixels", json_integer(12845056));
    json_object_set_new(p, "patch_size", json_integer(14));
    json_object_set_new(p, "temporal_patch_size", json_integer(2));
    json_object_set_new(p, "merge_size", json_integer(2));
    json_object_set_new(p, "image_mean", json_pack("[fff]", mean[0], mean[1], mean[2]));
    json_object_set_new(p, "image_std", json_pack("[fff]", stdv[0], stdv[1], stdv[2]));
    json_object_set_new(p, "image_processor_type", json_string("Qwen2VLImageProcessor"));
    json_object_set_new(p, "processor_class", json_string("Qwen2_5_VLProcessor"));
    if (dump(dir, "preprocessor_config.json", p, err, errlen) < 0) return -1;
    json_object_set_new(g, "bos_token_id", json_integer(base));
    json_object_set_new(g, "pad_token_id", json_integer(base));
    json_object_set_new(g, "do_sample", json_true());
    json_object_set_new(g, "eos_token_id", json_pack("[ii]", base + 2, base));
    json_object_set_new(g, "repetition_penalty", json_real(1.05));
    json_object_set_new(g, "temperature", json_real(1e-6));
    json_object_set_new(g, "transformers_version", json_string("4.49.0"));
    return dump(dir, "generation_config.json", g, err, errlen);
}

/* GPT-2's bytes_to_unicode: printable bytes map to themselves, the 68 others to U+0100+n. */
static void byte_token(int b, char out[4]) {
    static int table[256];
    int n = 0;
    for (int i = 0; i < 256; i++) {
        int printable = (i >= '!' && i <= '~') || (i >= 0xa1 && i <= 0xac) || (i >= 0xae && i <= 0xff);
        table[i] = printable ? i : 256 + n++;
    }
    int cp = table[b];
    if (cp < 0x80) { out[0] = (char)cp; out[1] = 0; }
    else { out[0] = (char)(0xc0 | cp >> 6); out[1] = (char)(0x80 | (cp & 0x3f)); out[2] = 0; }
}

static int write_own_tokenizer(const char *dir, char *err, size_t errlen) {
    json_t *vocab = json_object();
    char tok[4], name[32], path[4096];
    for (int b = 0; b < 256; b++) {
        byte_token(b, tok);
        json_object_set_new(vocab, tok, json_integer(b));
    }
    for (int i = 0; i < N_OWN_MERGES; i++) {
        snprintf(name, sizeof name, "%s%s", OWN_MERGES[i][0], OWN_MERGES[i][1]);
        json_object_set_new(vocab, name, json_integer(256 + i));
    }
    if (dump(dir, "vocab.json", vocab, err, errlen) < 0) return -1;
    snprintf(path, sizeof path, "%s/merges.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f) { snprintf(err, errlen, "%s: %s", path, strerror(errno)); return -1; }
    fprintf(f, "#version: 0.2\n");
    for (int i = 0; i < N_OWN_MERGES; i++) fprintf(f, "%s %s\n", OWN_MERGES[i][0], OWN_MERGES[i][1]);
    if (fclose(f) != 0) { snprintf(err, errlen, "%s: write failed", path); return -1; }

    const int base = 256 + N_OWN_MERGES;
    json_t *tc = json_object(), *added = json_object();
    for (int i = 0; i < N_SPECIALS; i++) {
        snprintf(name, sizeof name, "%d", base + i);
        json_object_set_new(added, name, json_pack("{s:s,s:b,s:b,s:b,s:b,s:b}", "content", SPECIALS[i],
                                                   "lstrip", 0, "normalized", 0, "rstrip", 0,
                                                   "single_word", 0, "special", i < N_SPECIAL_TRUE));
    }
    json_object_set_new(tc, "add_prefix_space", json_false());
    json_object_set_new(tc, "added_tokens_decoder", added);
    json_object_set_new(tc, "bos_token", json_null());
    json_object_set_new(tc, "chat_template", json_string(mk_chat_template));
    json_object_set_new(tc, "clean_up_tokenization_spaces", json_false());
    json_object_set_new(tc, "eos_token", json_string("<|im_end|>"));
    json_object_set_new(tc, "errors", json_string("replace"));
    json_object_set_new(tc, "model_max_length", json_integer(131072));
    json_object_set_new(tc, "pad_token", json_string("<|endoftext|>"));
    json_object_set_new(tc, "split_special_tokens", json_false());
    json_object_set_new(tc, "tokenizer_class", json_string("Qwen2Tokenizer"));
    json_object_set_new(tc, "unk_token", json_null());
    return dump(dir, "tokenizer_config.json", tc, err, errlen);
}

#define ADD(std_, mean_, nd, ...)                                                              \
    do {                                                                                   \
        int64_t sh_[] = {__VA_ARGS__};                                                     \
        if (mk_add(l, DG_DTYPE_BF16, mean_, std_, name, nd, sh_) < 0) return -1;           \
    } while (0)

/* Norm weights: 1 ± 0.1 rather than HF's exact ones, so that a missing multiply shows. */
static int list_text(mk_list *l, const mllm_shape *s, int vocab) {
    const int64_t D = s->hidden, F = s->intermediate, hd = s->hidden / s->heads;
    const int64_t QD = s->heads * hd, KD = s->kv_heads * hd;
    char name[128];
    snprintf(name, sizeof name, "model.embed_tokens.weight");
    ADD(s->std, 0.0, 2, vocab, D);
    for (int i = 0; i < s->layers; i++) {
#define P(suffix) snprintf(name, sizeof name, "model.layers.%d.%s", i, suffix)
        P("input_layernorm.weight"); ADD(0.1, 1.0, 1, D);
        P("self_attn.q_proj.weight"); ADD(s->std, 0.0, 2, QD, D);
        P("self_attn.q_proj.bias"); ADD(s->std, 0.0, 1, QD);
        P("self_attn.k_proj.weight"); ADD(s->std, 0.0, 2, KD, D);
        P("self_attn.k_proj.bias"); ADD(s->std, 0.0, 1, KD);
        P("self_attn.v_proj.weight"); ADD(s->std, 0.0, 2, KD, D);
        P("self_attn.v_proj.bias"); ADD(s->std, 0.0, 1, KD);
        P("self_attn.o_proj.weight"); ADD(s->std, 0.0, 2, D, QD);
        P("post_attention_layernorm.weight"); ADD(0.1, 1.0, 1, D);
        P("mlp.gate_proj.weight"); ADD(s->std, 0.0, 2, F, D);
        P("mlp.up_proj.weight"); ADD(s->std, 0.0, 2, F, D);
        P("mlp.down_proj.weight"); ADD(s->std, 0.0, 2, D, F);
#undef P
    }
    snprintf(name, sizeof name, "model.norm.weight");
    ADD(0.1, 1.0, 1, D);
    if (!s->tie) {
        snprintf(name, sizeof name, "lm_head.weight");
        ADD(s->std, 0.0, 2, vocab, D);
    }
    return 0;
}

/* Spec §2.1: the vision tower and the merger, published names. */
static int list_vision(mk_list *l, const mllm_shape *s) {
    const int64_t C = s->v_hidden, I = s->v_intermediate, M = 4 * C, O = s->hidden;
    const double std = s->std;
    char name[128];
    snprintf(name, sizeof name, "visual.patch_embed.proj.weight");
    ADD(std, 0.0, 5, C, 3, 2, 14, 14);
    for (int j = 0; j < s->v_depth; j++) {
#define P(suffix) snprintf(name, sizeof name, "visual.blocks.%d.%s", j, suffix)
        P("norm1.weight"); ADD(0.1, 1.0, 1, C);
        P("norm2.weight"); ADD(0.1, 1.0, 1, C);
        P("attn.qkv.weight"); ADD(std, 0.0, 2, 3 * C, C);
        P("attn.qkv.bias"); ADD(std, 0.0, 1, 3 * C);
        P("attn.proj.weight"); ADD(std, 0.0, 2, C, C);
        P("attn.proj.bias"); ADD(std, 0.0, 1, C);
        P("mlp.gate_proj.weight"); ADD(std, 0.0, 2, I, C);
        P("mlp.gate_proj.bias"); ADD(std, 0.0, 1, I);
        P("mlp.up_proj.weight"); ADD(std, 0.0, 2, I, C);
        P("mlp.up_proj.bias"); ADD(std, 0.0, 1, I);
        P("mlp.down_proj.weight"); ADD(std, 0.0, 2, C, I);
        P("mlp.down_proj.bias"); ADD(std, 0.0, 1, C);
#undef P
    }
    snprintf(name, sizeof name, "visual.merger.ln_q.weight"); ADD(0.1, 1.0, 1, C);
    snprintf(name, sizeof name, "visual.merger.mlp.0.weight"); ADD(std, 0.0, 2, M, M);
    snprintf(name, sizeof name, "visual.merger.mlp.0.bias"); ADD(std, 0.0, 1, M);
    snprintf(name, sizeof name, "visual.merger.mlp.2.weight"); ADD(std, 0.0, 2, O, M);
    snprintf(name, sizeof name, "visual.merger.mlp.2.bias"); ADD(std, 0.0, 1, O);
    return 0;
}
#undef ADD

static int make_dir(const char *path, char *err, size_t errlen) {
    if (mkdir(path, 0755) < 0 && errno != EEXIST) {
        snprintf(err, errlen, "%s: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

int mk_write_mllm(const char *dir, mk_preset preset, uint64_t seed, const char *vocab_dir,
                  char *err, size_t errlen) {
    const mllm_shape *s = &SHAPES[preset];
    char mdir[4096];
    mk_list l = {0};
    int rc = -1;
    const int vocab = vocab_dir ? s->vocab : OWN_VOCAB;
    const int base = vocab_dir ? QWEN_SPECIAL_BASE : 256 + N_OWN_MERGES;
    snprintf(mdir, sizeof mdir, "%s/mllm", dir);
    if (make_dir(dir, err, errlen) < 0 || make_dir(mdir, err, errlen) < 0) return -1;
    if (write_config(mdir, s, vocab, base, err, errlen) < 0) goto out;
    if (write_side_configs(mdir, base, err, errlen) < 0) goto out;
    if (vocab_dir) {
        if (mk_copy_file(vocab_dir, mdir, "vocab.json", err, errlen) < 0 ||
            mk_copy_file(vocab_dir, mdir, "merges.txt", err, errlen) < 0 ||
            mk_copy_file(vocab_dir, mdir, "tokenizer_config.json", err, errlen) < 0)
            goto out;
    } else if (write_own_tokenizer(mdir, err, errlen) < 0) {
        goto out;
    }
    if (list_text(&l, s, vocab) < 0 || list_vision(&l, s) < 0) {
        snprintf(err, errlen, "out of memory");
        goto out;
    }
    rc = st_write(mdir, &l, seed, s->max_shard, err, errlen);
out:
    mk_list_free(&l);
    return rc;
}
