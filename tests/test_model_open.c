/* Opening packages whose configs disagree with themselves or with transformers' reading of
 * them (found by review): each is refused with a message naming the file and the key, or
 * read as transformers reads it. The tiny package (own vocabulary) with one file edited:
 * - vision_config.out_hidden_size other than the decoder's hidden_size (the tower's rows
 *   stand for image tokens: they overran the embedding buffer);
 * - the DiT's out_channels other than in_channels - 1 (the velocity overran the latent);
 * - a DiT patch_size of 0 (a division by zero, the process killed); sizes whose products
 *   wrap an int (a DiT head count: loaded, then its first step crashed; the vision tower's
 *   merge x patch: a division by zero); a DiT of no blocks, a VAE of no residual blocks;
 * - duogen.json naming a condition layer twice (every drawing failed: the second slot
 *   never filled);
 * - preprocessor_config.json's patch or merge size other than the tower's (every image
 *   failed), its mean or std not numbers (read as 0: other pixels, no error) or a std of 0;
 * - a DiT patch_size with non-square patches (the painter sized widths by patch_h; its
 *   weights have the shapes of 2x2 patches, so it opened);
 * - token ids past config.json's vocab_size (found by each request that used one), the
 *   image's own ids among them (each job with an image failed in its step);
 * - generation_config.json's eos_token_id list ([<|im_end|>, <|endoftext|>] in
 *   Qwen2.5-VL): the answer ends at any of them, as transformers' generate does;
 * - preprocessor_config.json with both size.{shortest,longest}_edge and min/max_pixels:
 *   min/max_pixels win, as in Qwen2VLImageProcessor; with neither, that class's
 *   defaults; do_* switches off and other resample filters are refused;
 * - values the engine does not compute, read past before (a second review): a rope other
 *   than M-RoPE without scaling (YaRN, linear, a factor, no mrope_section: 1-D RoPE),
 *   sliding-window attention, a hidden_act other than silu, the tower's rope base other than
 *   10000, fullatt_block_indexes outside the tower or past 16 (dropped), rms_norm_eps,
 *   rope_theta or the VAE's latents_std not above 0 or not finite, eos_token_id lists past
 *   4 (cut); a DiT file without extra_pos_embed_type (diffusers' default "learnable") or
 *   without concat_padding_mask (diffusers' true: it was refused); while the files of the
 *   published layouts and transformers 5's and diffusers' re-saves still open;
 * - something other than a regular file in place of a package's file (a FIFO blocked the
 *   start for ever; a directory said "mmap: No such device" or "not valid JSON: line 1
 *   column 0"; a link to nowhere in place of the weights "no model.safetensors"), and bytes
 *   after the last tensor's data (copied into memory: a file grown by 3 GB loaded);
 * And the load's progress: reported as each weight is bound, not only between phases (a
 * GPU upload of billions of weights ran minutes without a word, past systemd's start
 * timeout, which each report extends). */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/harness.h"
#include "common/jobs.h"
#include "common/package.h"
#include "draw/dit.h"
#include "draw/vae.h"
#include "duogen.h"
#include "io/image_preprocess.h"
#include "model.h"

/* A fresh tiny package with `file` edited by `edit`; 0 or -1. */
static int edited(const char *file, void (*edit)(json_t *), char *dir, size_t len) {
    if (test_make_package("tiny", 3, NULL, dir, len) < 0) return -1;
    char path[700];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    json_error_t je;
    json_t *j = json_load_file(path, 0, &je);
    if (!j) return -1;
    edit(j);
    int rc = json_dump_file(j, path, JSON_INDENT(1));
    json_decref(j);
    return rc;
}

static void wide_tower(json_t *j) {
    json_object_set_new(json_object_get(j, "vision_config"), "out_hidden_size", json_integer(96));
}
static void more_out_channels(json_t *j) { json_object_set_new(j, "out_channels", json_integer(32)); }
static void zero_patch(json_t *j) { json_object_set_new(j, "patch_size", json_pack("[i,i,i]", 1, 0, 0)); }
static void tall_patch(json_t *j) { json_object_set_new(j, "patch_size", json_pack("[i,i,i]", 1, 4, 1)); }
static void few_rows(json_t *j) {   /* the image's ids within them: the tokenizer's are not */
    json_object_set_new(j, "vocab_size", json_integer(200));
    json_object_set_new(j, "vision_start_token_id", json_integer(10));
    json_object_set_new(j, "vision_end_token_id", json_integer(11));
    json_object_set_new(j, "image_token_id", json_integer(12));
}
static void wrapping_heads(json_t *j) {   /* 2^27 + 2 heads of 32: the product wraps to 64, the width */
    json_object_set_new(j, "num_attention_heads", json_integer((1 << 27) + 2));
}
static void no_blocks(json_t *j) { json_object_set_new(j, "num_layers", json_integer(0)); }
static void wrapping_merge(json_t *j) {   /* merge x patch = 2^32: 0 in an int */
    json_object_set_new(json_object_get(j, "vision_config"), "spatial_merge_size", json_integer(65536));
    json_object_set_new(json_object_get(j, "vision_config"), "patch_size", json_integer(65536));
}
static void layer_twice(json_t *j) { json_object_set_new(j, "condition_layers", json_pack("[i,i]", 0, 0)); }
static void layer_past_int(json_t *j) {   /* 2^32: cut to an int, it was layer 0 */
    json_object_set_new(j, "condition_layers", json_pack("[I,i]", (json_int_t)1 << 32, 1));
}
static void rope_scale_zero(json_t *j) { json_object_set_new(j, "rope_scale", json_pack("[f,f,f]", 1.0, 0.0, 1.0)); }
static void rope_scale_negative(json_t *j) { json_object_set_new(j, "rope_scale", json_pack("[f,f,f]", 1.0, -1.0, 1.0)); }
static void unmerged(json_t *j) { json_object_set_new(j, "merge_size", json_integer(1)); }
static void mean_as_text(json_t *j) { json_object_set_new(j, "image_mean", json_pack("[s,s,s]", "0.48", "0.45", "0.40")); }
static void flat_std(json_t *j) { json_object_set_new(j, "image_std", json_pack("[f,f,f]", 0.26, 0.0, 0.27)); }
static void no_res_blocks(json_t *j) { json_object_set_new(j, "num_res_blocks", json_integer(0)); }
static void pad_past_rows(json_t *j) { json_object_set_new(j, "image_token_id", json_integer(999999)); }

/* Opens dir, expecting a refusal whose message holds `want`. */
static void refused(const char *dir, const char *want) {
    char err[512] = "";
    dg_model *m = NULL;
    int rc = dg_model_open(dir, NULL, &m, err, sizeof err);
    CHECK_EQ_INT(rc, DG_EMODEL);
    if (!strstr(err, want)) test_fail(__FILE__, __LINE__, "message \"%s\" lacks \"%s\"", err, want);
    dg_model_close(m);
}

/* The tiny package with `file` edited by `edit`, which the loader must refuse saying `want`. */
static void refused_edit(const char *file, void (*edit)(json_t *), const char *want) {
    char dir[512];
    if (edited(file, edit, dir, sizeof dir) < 0) {
        test_fail(__FILE__, __LINE__, "cannot write the edited %s (to be refused with \"%s\")", file, want);
        return;
    }
    refused(dir, want);
}

TEST(configs_that_disagree_are_refused_by_name) {
    refused_edit("mllm/config.json", wide_tower,
                 "mllm/config.json: vision_config.out_hidden_size 96 must be the decoder's hidden_size 64");
    refused_edit("dit/config.json", more_out_channels, "dit/config.json: out_channels 32 must be in_channels - 1 = 16");
    refused_edit("dit/config.json", zero_patch, "dit/config.json: patch_size [1, 0, 0]");
    refused_edit("dit/config.json", tall_patch, "dit/config.json: patch_size [1, 4, 1]: patches must be square");
    refused_edit("mllm/config.json", few_rows, "past config.json's vocab_size 200");
    refused_edit("mllm/config.json", pad_past_rows,
                 "mllm/config.json: \"image_token_id\" 999999 is outside the vocabulary");
    refused_edit("dit/config.json", wrapping_heads,
                 "dit/config.json: \"num_attention_heads\" 134217730 must be 1 .. 65536");
    refused_edit("dit/config.json", no_blocks, "dit/config.json: \"num_layers\" 0 must be 1 .. 65536");
    refused_edit("mllm/config.json", wrapping_merge, "vision_config: \"patch_size\" 65536 must be 1 .. 1024");
    refused_edit("duogen.json", layer_twice, "duogen.json: condition_layers names layer 0 twice");
    refused_edit("duogen.json", layer_past_int, "duogen.json: condition_layers[0] is 4294967296, not a layer number");
    /* the RoPE's frequencies infinite or NaN: every picture came out black, the jobs "done" */
    refused_edit("dit/config.json", rope_scale_zero, "dit/config.json: rope_scale [1, 0, 1]: each must be above 0");
    refused_edit("dit/config.json", rope_scale_negative, "dit/config.json: rope_scale [1, -1, 1]: each must be above 0");
    refused_edit("mllm/preprocessor_config.json", unmerged,
                 "preprocessor_config.json: patch_size 14, temporal_patch_size 2, merge_size 1 must be config.json's");
    refused_edit("mllm/preprocessor_config.json", mean_as_text,
                 "preprocessor_config.json: \"image_mean\" must be a list of 3 numbers");
    refused_edit("mllm/preprocessor_config.json", flat_std, "preprocessor_config.json: image_std[1] 0 must be above 0");
    refused_edit("vae/config.json", no_res_blocks, "vae/config.json: base_dim");
}

/* Opens dir, expecting success; the model is the caller's (NULL after printing why not). */
static dg_model *opens(const char *dir) {
    char err[512] = "";
    dg_model *m = NULL;
    if (dg_model_open(dir, NULL, &m, err, sizeof err) < 0) test_fail(__FILE__, __LINE__, "%s: %s", dir, err);
    return m;
}

/* The decoder's rope (mllm/config.json): M-RoPE without scaling, or refused by key and value. */
static void yarn(json_t *j) {   /* the block Qwen's model card says to add for long inputs */
    json_object_set_new(j, "rope_scaling", json_pack("{s:s,s:[i,i,i],s:f,s:i}", "type", "yarn", "mrope_section", 2, 3, 3,
                                                     "factor", 4.0, "original_max_position_embeddings", 32768));
}
static void linear_v5(json_t *j) {
    json_object_del(j, "rope_scaling");
    json_object_set_new(j, "rope_parameters", json_pack("{s:s,s:[i,i,i],s:f,s:f}", "rope_type", "linear",
                                                        "mrope_section", 2, 3, 3, "factor", 2.0, "rope_theta", 1e6));
}
static void mrope_with_factor(json_t *j) {   /* transformers drops the factor with a warning */
    json_object_set_new(json_object_get(j, "rope_scaling"), "factor", json_integer(4));
}
static void no_rope(json_t *j) { json_object_del(j, "rope_scaling"); }
static void rope_as_text(json_t *j) { json_object_set_new(j, "rope_scaling", json_string("mrope")); }
static void rope_without_sections(json_t *j) { json_object_set_new(j, "rope_scaling", json_pack("{s:s}", "type", "default")); }
static void resaved_rope(json_t *j) {   /* transformers 4.49 .. 4.5x re-saved the published block so */
    json_object_set_new(j, "rope_scaling", json_pack("{s:[i,i,i],s:s,s:s}", "mrope_section", 2, 3, 3, "rope_type",
                                                     "default", "type", "default"));
}
static void negative_theta(json_t *j) { json_object_set_new(j, "rope_theta", json_real(-1.0)); }

TEST(rope_other_than_mrope_is_refused_by_key_and_value) {
    char dir[512];
    refused_edit("mllm/config.json", yarn, "mllm/config.json: rope_scaling.type \"yarn\" is not implemented");
    refused_edit("mllm/config.json", linear_v5,
                 "mllm/config.json: rope_parameters.rope_type \"linear\" is not implemented");
    refused_edit("mllm/config.json", mrope_with_factor, "mllm/config.json: rope_scaling.factor 4 is not implemented");
    refused_edit("mllm/config.json", no_rope, "mllm/config.json: rope_scaling is missing: the decoder has M-RoPE only");
    refused_edit("mllm/config.json", rope_as_text, "mllm/config.json: rope_scaling \"mrope\" is not an object");
    refused_edit("mllm/config.json", rope_without_sections, "mllm/config.json: rope_scaling has no mrope_section");
    refused_edit("mllm/config.json", negative_theta, "mllm/config.json: rope_theta -1 must be above 0 and finite");
    CHECK_EQ_INT(edited("mllm/config.json", resaved_rope, dir, sizeof dir), 0);
    dg_model_close(opens(dir));
}

/* Attention slides a window in no layer: the tiny decoder has 2 layers. */
static void sliding_second_layer(json_t *j) {
    json_object_set_new(j, "use_sliding_window", json_true());
    json_object_set_new(j, "max_window_layers", json_integer(1));
}
static void sliding_past_the_layers(json_t *j) {   /* the first 2 layers full: all of them */
    json_object_set_new(j, "use_sliding_window", json_true());
    json_object_set_new(j, "max_window_layers", json_integer(2));
}
static void sliding_layer_type(json_t *j) {   /* transformers 5's per-layer list */
    json_object_set_new(j, "layer_types", json_pack("[s,s]", "full_attention", "sliding_attention"));
}

TEST(sliding_window_attention_is_refused) {
    char dir[512];
    refused_edit("mllm/config.json", sliding_second_layer,
                 "mllm/config.json: use_sliding_window true with max_window_layers 1 < num_hidden_layers 2 is not "
                 "implemented");
    refused_edit("mllm/config.json", sliding_layer_type,
                 "mllm/config.json: layer_types[1] \"sliding_attention\" is not implemented");
    CHECK_EQ_INT(edited("mllm/config.json", sliding_past_the_layers, dir, sizeof dir), 0);
    dg_model_close(opens(dir));
}

/* Both MLPs are SwiGLU and the tower's rope base is 10000: other activations and bases are
 * refused. */
static void gelu_decoder(json_t *j) { json_object_set_new(j, "hidden_act", json_string("gelu")); }
static void quick_gelu_tower(json_t *j) {
    json_object_set_new(json_object_get(j, "vision_config"), "hidden_act", json_string("quick_gelu"));
}
static void tower_rope_base(json_t *j) {   /* transformers 5 writes the tower's rope so */
    json_object_set_new(json_object_get(j, "vision_config"), "rope_parameters",
                        json_pack("{s:f,s:s}", "rope_theta", 100000.0, "rope_type", "axial"));
}
static void tower_rope_as_published(json_t *j) {
    json_object_set_new(json_object_get(j, "vision_config"), "rope_parameters",
                        json_pack("{s:f,s:s}", "rope_theta", 10000.0, "rope_type", "axial"));
}

TEST(activations_and_the_towers_rope_base_are_checked) {
    char dir[512];
    refused_edit("mllm/config.json", gelu_decoder,
                 "mllm/config.json: hidden_act \"gelu\" is not implemented (the MLP is SwiGLU: \"silu\")");
    refused_edit("mllm/config.json", quick_gelu_tower,
                 "mllm/config.json: vision_config.hidden_act \"quick_gelu\" is not implemented");
    refused_edit("mllm/config.json", tower_rope_base,
                 "mllm/config.json: vision_config.rope_parameters.rope_theta 100000.0 is not implemented");
    CHECK_EQ_INT(edited("mllm/config.json", tower_rope_as_published, dir, sizeof dir), 0);
    dg_model_close(opens(dir));
}

/* fullatt_block_indexes: blocks of the tower (the tiny one has 2), at most 16 of them. */
static void full_block_past_the_tower(json_t *j) {
    json_object_set_new(json_object_get(j, "vision_config"), "fullatt_block_indexes", json_pack("[i,i]", 1, 2));
}
static void full_block_as_text(json_t *j) {
    json_object_set_new(json_object_get(j, "vision_config"), "fullatt_block_indexes", json_pack("[s]", "1"));
}
static void full_blocks_past_the_cap(json_t *j) {
    json_t *a = json_array();
    for (int i = 0; i < 17; i++) json_array_append_new(a, json_integer(i % 2));
    json_object_set_new(json_object_get(j, "vision_config"), "fullatt_block_indexes", a);
}

TEST(full_attention_blocks_are_blocks_of_the_tower) {
    refused_edit("mllm/config.json", full_block_past_the_tower,
                 "mllm/config.json: vision_config.fullatt_block_indexes[1] 2 is not a block (depth 2: 0 .. 1)");
    refused_edit("mllm/config.json", full_block_as_text,
                 "mllm/config.json: vision_config.fullatt_block_indexes[0] \"1\" is not a block");
    refused_edit("mllm/config.json", full_blocks_past_the_cap,
                 "mllm/config.json: vision_config.fullatt_block_indexes lists 17 blocks, more than the 16");
}

/* rms_norm_eps: above 0 and finite as a float; absent, transformers' class default 1e-5. */
static void zero_eps(json_t *j) { json_object_set_new(j, "rms_norm_eps", json_real(0.0)); }
static void huge_eps(json_t *j) { json_object_set_new(j, "rms_norm_eps", json_real(1e39)); }
static void no_eps(json_t *j) { json_object_del(j, "rms_norm_eps"); }

TEST(rms_norm_eps_is_positive_and_defaults_as_transformers) {
    char dir[512];
    refused_edit("mllm/config.json", zero_eps, "mllm/config.json: rms_norm_eps 0 must be above 0 and finite");
    refused_edit("mllm/config.json", huge_eps, "mllm/config.json: rms_norm_eps inf must be above 0 and finite");
    CHECK_EQ_INT(edited("mllm/config.json", no_eps, dir, sizeof dir), 0);
    dg_model *m = opens(dir);
    if (m) CHECK(m->cfg.text.rms_norm_eps == 1e-5f);
    dg_model_close(m);
}

/* The VAE's latent statistics: each std above 0 and finite (the latent is divided by it),
 * each mean finite. */
static void zero_std(json_t *j) { json_array_set_new(json_object_get(j, "latents_std"), 3, json_real(0.0)); }
static void huge_std(json_t *j) { json_array_set_new(json_object_get(j, "latents_std"), 5, json_real(1e39)); }
static void huge_mean(json_t *j) { json_array_set_new(json_object_get(j, "latents_mean"), 0, json_real(-1e39)); }

TEST(vae_latents_std_is_positive_and_finite) {
    refused_edit("vae/config.json", zero_std, "vae/config.json: latents_std[3] 0 must be above 0 and finite");
    refused_edit("vae/config.json", huge_std, "vae/config.json: latents_std[5] inf must be above 0 and finite");
    refused_edit("vae/config.json", huge_mean, "vae/config.json: latents_mean[0] -inf must be finite");
}

/* A DiT key the file leaves out takes CosmosTransformer3DModel's default: extra_pos_embed_type
 * "learnable" (refused), concat_padding_mask true (opens). */
static void no_pos_embed_type(json_t *j) { json_object_del(j, "extra_pos_embed_type"); }
static void no_padding_mask_key(json_t *j) { json_object_del(j, "concat_padding_mask"); }

TEST(dit_keys_left_out_take_diffusers_defaults) {
    char dir[512];
    refused_edit("dit/config.json", no_pos_embed_type,
                 "dit/config.json: \"extra_pos_embed_type\" is missing: diffusers then adds its default \"learnable\"");
    CHECK_EQ_INT(edited("dit/config.json", no_padding_mask_key, dir, sizeof dir), 0);
    dg_model_close(opens(dir));
}

/* A file naming another network (transformers' model_type, diffusers' _class_name) is refused:
 * its tensors could bind by name and shape and compute something else (Qwen2-VL's decoder,
 * say, whose names are these). Without the key, the file is read as the one it must be. */
static void qwen2_vl(json_t *j) { json_object_set_new(j, "model_type", json_string("qwen2_vl")); }
static void no_model_type(json_t *j) { json_object_del(j, "model_type"); }
static void wan_dit(json_t *j) { json_object_set_new(j, "_class_name", json_string("WanTransformer3DModel")); }
static void other_vae(json_t *j) { json_object_set_new(j, "_class_name", json_string("AutoencoderKLCosmos")); }
static void class_as_number(json_t *j) { json_object_set_new(j, "_class_name", json_integer(3)); }

TEST(files_naming_another_network_are_refused) {
    char dir[512];
    refused_edit("mllm/config.json", qwen2_vl,
                 "mllm/config.json: model_type \"qwen2_vl\" is not the model this reads (\"qwen2_5_vl\")");
    refused_edit("dit/config.json", wan_dit,
                 "dit/config.json: _class_name \"WanTransformer3DModel\" is not the model this reads "
                 "(\"CosmosTransformer3DModel\")");
    refused_edit("vae/config.json", other_vae,
                 "vae/config.json: _class_name \"AutoencoderKLCosmos\" is not the model this reads");
    refused_edit("vae/config.json", class_as_number,
                 "vae/config.json: _class_name must be a string (\"AutoencoderKLWan\")");
    CHECK_EQ_INT(edited("mllm/config.json", no_model_type, dir, sizeof dir), 0);
    dg_model_close(opens(dir));
}

/* eos_token_id lists longer than the engine keeps are refused, not cut (the answer ran past
 * the ids cut off), and so are entries that are not ids. */
static void many_eos(json_t *j) {
    json_t *a = json_array();
    for (int i = 0; i <= DG_MAX_EOS; i++) json_array_append_new(a, json_integer(i));
    json_object_set_new(j, "eos_token_id", a);
}

static void eos_as_text(json_t *j) { json_object_set_new(j, "eos_token_id", json_pack("[i,s]", 266, "<|im_end|>")); }

TEST(eos_lists_past_the_cap_are_refused) {
    char want[160];
    snprintf(want, sizeof want, "mllm/config.json: eos_token_id lists %d ids, more than the %d the engine keeps",
             DG_MAX_EOS + 1, DG_MAX_EOS);
    refused_edit("mllm/config.json", many_eos, want);
    refused_edit("mllm/config.json", eos_as_text,   /* skipped before */
                 "mllm/config.json: eos_token_id must be a token id or a list of them");
    snprintf(want, sizeof want, "mllm/generation_config.json: eos_token_id lists %d ids, more than the %d", DG_MAX_EOS + 1,
             DG_MAX_EOS);
    refused_edit("mllm/generation_config.json", many_eos, want);
}

/* The tiny pipeline of the parity goldens, saved by transformers 5.25 and diffusers 0.42
 * (tests/golden/pipeline/tiny-cosmos2.5): the nested text_config with rope_parameters
 * {"rope_type": "default", "type": "mrope"}, layer_types, the tower's rope_parameters, and
 * the DiT's and VAE's files as save_pretrained writes them, each opens. */
TEST(files_saved_by_transformers_5_and_diffusers_open) {
    const char *pipe = "tests/golden/pipeline/tiny-cosmos2.5";
    char dir[300], err[512];
    dg_qwen2vl_config c;
    dg_backend *be = NULL;
    dg_dit dit;
    dg_vae vae;
    snprintf(dir, sizeof dir, "%s/text_encoder", pipe);
    CHECK_EQ_INT(dg_config_load(dir, &c, err, sizeof err), 0);
    CHECK(c.text.mrope_section[0] == 2 && c.text.rms_norm_eps == 1e-6f && c.vision.n_fullatt == 1);
    if (dg_backend_new("cpu", 1, &be, err, sizeof err) < 0) { CHECK(!"backend"); return; }
    snprintf(dir, sizeof dir, "%s/transformer", pipe);
    if (dg_dit_load(&dit, dir, be, err, sizeof err) == 0) dg_dit_unload(&dit);
    else test_fail(__FILE__, __LINE__, "%s", err);
    snprintf(dir, sizeof dir, "%s/vae", pipe);
    if (dg_vae_load(&vae, dir, be, err, sizeof err) == 0) dg_vae_unload(&vae);
    else test_fail(__FILE__, __LINE__, "%s", err);
    dg_backend_free(be);
}

/* A job whose first token is `tok` (a bias of 100): how its answer ends. */
static test_job first_token(dg_model *m, int32_t tok) {
    char err[256];
    dg_sched *s = NULL;
    test_job c = {0};
    dg_part part = {.kind = DG_PART_TEXT, .text = "Hello.", .text_len = 6};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    dg_logit_bias bias = {tok, 100.0f};
    dg_request r = {.id = "eos", .messages = &msg, .n_messages = 1,
                    .text = {.set = DG_TEXT_MAX_NEW_TOKENS | DG_TEXT_TEMPERATURE, .max_new_tokens = 5,
                             .temperature = 0, .logit_bias = &bias, .n_logit_bias = 1},
                    .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
    if (dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err) == 0) CHECK_EQ_INT(test_job_run(s, &r, &c), 0);
    dg_sched_free(s);
    return c;
}

static int ticks_weights, ticks_draw;
static void count_progress(void *user, const char *phase, double fraction) {
    (void)user;
    (void)fraction;
    ticks_weights += !strcmp(phase, "weights");
    ticks_draw += !strcmp(phase, "dit, vae and connector");
}

TEST(load_progress_is_reported_per_weight) {
    char dir[512], err[512];
    if (test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
    dg_model_opts o = {.progress = count_progress};
    dg_model *m = NULL;
    CHECK_EQ_INT(dg_model_open(dir, &o, &m, err, sizeof err), 0);
    /* the tiny decoder has 2 layers of 12 tensors, the DiT 2 blocks of more: one report a
     * weight, beyond the phase's own */
    if (ticks_weights < 20 || ticks_draw < 20)
        test_fail(__FILE__, __LINE__, "%d reports while the decoder's weights were bound, %d for the "
                  "drawing networks'", ticks_weights, ticks_draw);
    dg_model_close(m);
}

TEST(generation_configs_eos_ids_end_the_answer) {
    char dir[512], err[512];
    if (test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
    size_t len;
    char *gen = test_read_file(dir, "mllm/generation_config.json", &len);
    json_error_t je;
    json_t *g = gen ? json_loads(gen, 0, &je) : NULL;
    json_t *eos = json_object_get(g, "eos_token_id");
    CHECK(json_is_array(eos) && json_array_size(eos) == 2);   /* [<|im_end|>, <|endoftext|>] */
    const int32_t endoftext = (int32_t)json_integer_value(json_array_get(eos, 1));
    dg_model *m = NULL;
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (m) {
        test_job c = first_token(m, endoftext);
        CHECK_EQ_INT(c.reason, DG_FINISH_STOP);
        CHECK_EQ_INT(c.usage.generated_tokens, 0);
        test_job_free(&c);
        dg_model_close(m);
    }
    json_decref(g);
    free(gen);
}

static void both_sizes(json_t *j) {
    /* a file re-saved by newer transformers (size) and then edited as Qwen's README says
     * (max_pixels): the edit holds */
    json_object_set_new(j, "size", json_pack("{s:i,s:i}", "shortest_edge", 3136, "longest_edge", 12845056));
    json_object_set_new(j, "max_pixels", json_integer(100352));
}
static void max_pixels_only(json_t *j) { json_object_set_new(j, "max_pixels", json_integer(100352)); }

/* "What is it?" about one PNG, one token of answer, no drawing (parts[2] and msg the caller's). */
static dg_request question_about(const uint8_t *png, size_t len, dg_part *parts, dg_message *msg) {
    parts[0] = (dg_part){.kind = DG_PART_IMAGE, .image = png, .image_len = len};
    parts[1] = (dg_part){.kind = DG_PART_TEXT, .text = "What is it?", .text_len = 11};
    *msg = (dg_message){DG_ROLE_USER, parts, 2};
    return (dg_request){.id = "px", .messages = msg, .n_messages = 1,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 1},
                        .image = {.set = DG_IMAGE_MAX_IMAGES, .max_images = 0}};
}

static int64_t prompt_tokens_of_a_big_image(const char *dir) {
    char err[512];
    dg_model *m = NULL;
    dg_sched *s = NULL;
    test_job c = {0};
    size_t len;
    uint8_t *png = test_png(1000, 800, 4, &len);
    dg_part parts[2];
    dg_message msg;
    dg_request r = question_about(png, len, parts, &msg);
    int64_t n = -1;
    if (dg_model_open(dir, NULL, &m, err, sizeof err) == 0 &&
        dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err) == 0 && test_job_run(s, &r, &c) == 0)
        n = c.usage.prompt_tokens;
    else
        printf("  %s\n", err);
    test_job_free(&c);
    dg_sched_free(s);
    dg_model_close(m);
    free(png);
    return n;
}

TEST(min_and_max_pixels_win_over_size) {
    char a[512], b[512];
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", max_pixels_only, a, sizeof a), 0);
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", both_sizes, b, sizeof b), 0);
    const int64_t na = prompt_tokens_of_a_big_image(a), nb = prompt_tokens_of_a_big_image(b);
    /* 1000x800 under 100352 pixels: 128 tokens of the merged 28x28 patches, and the chat's */
    CHECK(na > 0 && na < 200);
    CHECK_EQ_INT(nb, na);
}

static void no_pixel_bounds(json_t *j) {
    json_object_del(j, "min_pixels");
    json_object_del(j, "max_pixels");
    json_object_del(j, "size");
}
static void no_normalize(json_t *j) { json_object_set_new(j, "do_normalize", json_false()); }
static void nearest(json_t *j) { json_object_set_new(j, "resample", json_integer(0)); }
static void all_said(json_t *j) {   /* a re-saved file that spells out what the engine does */
    json_object_set_new(j, "do_resize", json_true());
    json_object_set_new(j, "do_convert_rgb", json_true());
    json_object_set_new(j, "resample", json_integer(3));
}

/* A preprocessor_config.json without pixel bounds gets Qwen2VLImageProcessor's class
 * defaults (56*56 .. 28*28*1280), not the published file's 12845056: a 1300x1000 image
 * is 868x1120 after transformers' smart_resize (hand-computed: over 1003520 pixels, scaled
 * by sqrt(1300000/1003520) and floored to multiples of 28), a 62x80 patch grid, where the
 * checkpoint's bound keeps it at 1008x1288. Steps the engine does not have are refused,
 * naming the key; spelled out as the engine does them, they open. */
TEST(a_preprocessor_file_without_bounds_takes_transformers_defaults) {
    char dir[512], err[512];
    dg_model *m = NULL;
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", no_pixel_bounds, dir, sizeof dir), 0);
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (m) {
        int32_t grid[3];
        CHECK_EQ_INT(dg_image_grid(1000, 1300, &m->pp, grid, err, sizeof err), 0);
        CHECK(grid[0] == 1 && grid[1] == 62 && grid[2] == 80);
        CHECK(m->pp.min_pixels == 3136 && m->pp.max_pixels == 1003520);
        dg_model_close(m);
        m = NULL;
    }
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", no_normalize, dir, sizeof dir), 0);
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "preprocessor_config.json") && strstr(err, "\"do_normalize\" must be true"));
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", nearest, dir, sizeof dir), 0);
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), DG_EMODEL);
    CHECK(strstr(err, "\"resample\" must be 3"));
    CHECK_EQ_INT(edited("mllm/preprocessor_config.json", all_said, dir, sizeof dir), 0);
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (m) CHECK(m->pp.max_pixels == 12845056);   /* the tiny package's file says so */
    dg_model_close(m);
}

/* dg_sched_opts.max_image_pixels (the worker's max_image_pixels): an input image over it is
 * refused before it is decoded, naming the limit; 0 keeps the 50M default. */
TEST(max_image_pixels_bounds_an_input_image) {
    char dir[512], err[512];
    if (test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
    dg_model *m = NULL;
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (!m) return;
    size_t len;
    uint8_t *png = test_png(60, 40, 1, &len);
    dg_part parts[2];
    dg_message msg;
    dg_request r = question_about(png, len, parts, &msg);
    for (int64_t limit = 1000; limit >= 0; limit -= 1000) {   /* 60x40 = 2400 pixels */
        dg_sched *s = NULL;
        test_job c = {0};
        CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1, .max_image_pixels = limit}, &s, err, sizeof err), 0);
        int rc = test_job_run(s, &r, &c);
        if (limit) {
            CHECK_EQ_INT(rc, DG_ELIMIT);
            CHECK(strstr(c.error, "1000") != NULL);
        } else {
            CHECK_EQ_INT(rc, 0);
        }
        test_job_free(&c);
        dg_sched_free(s);
    }
    dg_sched *bad = NULL;
    CHECK_EQ_INT(dg_sched_new(m, &(dg_sched_opts){.max_image_pixels = -1}, &bad, err, sizeof err), DG_EINVAL);
    free(png);
    dg_model_close(m);
}

/* A max_pixels that is not a whole number of 2x2 patch groups (1960: 10 patches of 14x14)
 * or under one group (100): the start stopped with "vision state: max_patches 10 is not a
 * positive multiple of 4"; transformers' smart_resize makes such a picture 28x56 (1960) or
 * 28x28 (100, its least). Both now run a picture, as transformers sizes it. */
static int64_t small_max_pixels;
static void set_small_max_pixels(json_t *j) {
    json_object_set_new(j, "max_pixels", json_integer(small_max_pixels));
    json_object_set_new(j, "min_pixels", json_integer(small_max_pixels < 784 ? small_max_pixels : 784));
}

TEST(a_max_pixels_between_patch_groups_runs) {
    static const int64_t limits[] = {1960, 100};
    for (size_t k = 0; k < sizeof limits / sizeof limits[0]; k++) {
        char dir[512], err[512];
        small_max_pixels = limits[k];
        if (edited("mllm/preprocessor_config.json", set_small_max_pixels, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
        dg_model *m = opens(dir);
        if (!m) return;
        dg_sched *s = NULL;
        const int rc = dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err);
        size_t len;
        uint8_t *png = test_png(60, 40, 1, &len);
        dg_part parts[2];
        dg_message msg;
        dg_request r = question_about(png, len, parts, &msg);
        test_job c = {0};
        if (rc) test_fail(__FILE__, __LINE__, "max_pixels %lld: %s", (long long)limits[k], err);
        if (!rc) CHECK_EQ_INT(test_job_run(s, &r, &c), 0);
        test_job_free(&c);
        dg_sched_free(s);
        free(png);
        dg_model_close(m);
    }
}

/* A picture larger than the DiT's positions reach (max_size / patch: 1920 a side for the
 * tiny model, as for Cosmos-Predict2.5) is refused at submit; it failed at its first
 * denoising step, after the answer's text and a DiT state sized for it. */
TEST(a_picture_past_the_dits_positions_is_refused_at_submit) {
    char dir[512], err[512];
    if (test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) { CHECK(!"package"); return; }
    dg_model *m = NULL;
    dg_sched *s = NULL;
    CHECK_EQ_INT(dg_model_open(dir, NULL, &m, err, sizeof err), 0);
    if (!m || dg_sched_new(m, &(dg_sched_opts){.max_inflight = 1}, &s, err, sizeof err)) { dg_model_close(m); return; }
    dg_part part = {.kind = DG_PART_TEXT, .text = "Draw.", .text_len = 5};
    dg_message msg = {DG_ROLE_USER, &part, 1};
    static const int sizes[][2] = {{2048, 16}, {16, 2048}, {1920, 16}};
    for (int i = 0; i < 3; i++) {
        dg_request r = {.id = "big", .messages = &msg, .n_messages = 1,
                        .text = {.set = DG_TEXT_MAX_NEW_TOKENS, .max_new_tokens = 1},
                        .image = {.set = DG_IMAGE_WIDTH | DG_IMAGE_HEIGHT | DG_IMAGE_STEPS, .width = sizes[i][0],
                                  .height = sizes[i][1], .steps = 1}};
        test_job c = {0};
        int rc = test_job_run(s, &r, &c);
        if (i < 2) {
            CHECK_EQ_INT(rc, DG_ELIMIT);
            CHECK(strstr(c.error, "this model draws at most 1920x1920") != NULL);
        } else {
            CHECK_EQ_INT(rc, 0);
        }
        test_job_free(&c);
    }
    dg_sched_free(s);
    dg_model_close(m);
}


/* One tiny package (of this test's own: MADE_MAX a process at most) with dir/file set aside and
 * replaced by what `put` makes there, which the loader must refuse saying want; the file
 * is put back after. */
static void refused_in_place_of(const char *file, int (*put)(const char *path), const char *want) {
    static char dir[512];
    char path[700], aside[720];
    if (!dir[0] && test_make_package("tiny", 3, NULL, dir, sizeof dir) < 0) {
        test_fail(__FILE__, __LINE__, "cannot make the package");
        dir[0] = 0;
        return;
    }
    snprintf(path, sizeof path, "%s/%s", dir, file);
    snprintf(aside, sizeof aside, "%s.aside", path);
    if (rename(path, aside) || put(path)) {
        test_fail(__FILE__, __LINE__, "cannot put something in place of %s", path);
        return;
    }
    refused(dir, want);
    if (remove(path) || rename(aside, path)) test_fail(__FILE__, __LINE__, "cannot put %s back", path);
}

static int put_fifo(const char *path) { return mkfifo(path, 0644); }
static int put_dir(const char *path) { return mkdir(path, 0755); }
static int put_dangling(const char *path) { return symlink("nowhere.safetensors", path); }

TEST(odd_files_in_a_package_are_named) {
    /* a FIFO: the start waited for a writer for ever (open() and jansson's read) */
    refused_in_place_of("duogen.json", put_fifo, "duogen.json: not a regular file (a FIFO)");
    refused_in_place_of("mllm/config.json", put_fifo, "mllm/config.json: cannot open: not a regular file (a FIFO)");
    refused_in_place_of("mllm/vocab.json", put_fifo, "mllm/vocab.json: cannot read: not a regular file (a FIFO)");
    refused_in_place_of("mllm/merges.txt", put_fifo, "mllm/merges.txt: cannot read: not a regular file (a FIFO)");
    refused_in_place_of("mllm/model.safetensors", put_fifo, "mllm/model.safetensors: not a regular file (a FIFO)");
    /* a directory: "mmap: No such device", "not valid JSON: line 1 column 0" */
    refused_in_place_of("vae/diffusion_pytorch_model.safetensors", put_dir,
                        "vae/diffusion_pytorch_model.safetensors: not a regular file (a directory)");
    refused_in_place_of("dit/config.json", put_dir, "dit/config.json: not a regular file (a directory)");
    /* a link to nowhere: "no model.safetensors or diffusion_pytorch_model.safetensors" */
    refused_in_place_of("mllm/model.safetensors", put_dangling, "mllm/model.safetensors: No such file or directory");
}

TEST(bytes_after_the_last_tensor_are_refused) {
    char dir[512], path[700];
    CHECK(test_make_package("tiny", 3, NULL, dir, sizeof dir) == 0);
    snprintf(path, sizeof path, "%s/dit/diffusion_pytorch_model.safetensors", dir);
    FILE *f = fopen(path, "ab");
    CHECK(f && fputc(0, f) == 0 && fclose(f) == 0);
    refused(dir, "dit/diffusion_pytorch_model.safetensors: 1 bytes after the last tensor's data");
}

int main(void) { return test_main(); }
