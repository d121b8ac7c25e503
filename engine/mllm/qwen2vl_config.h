/* qwen2vl_config.h — the Qwen2.5-VL config.json, read once at load (docs/specs/qwen2_5_vl.md §1).
 *
 * Accepts the published flat layout and the re-saved variants of §1.2: a nested
 * "text_config" (its values win over flat ones), rope_scaling {"type":"mrope"} or
 * {"rope_type":"default"}, and v5's "rope_parameters". Missing vision keys take the
 * transformers class defaults; missing text keys other than those with a safe default
 * are an error naming the key.
 *
 * What the engine does not compute is refused (DG_EMODEL, naming the file, the key and the
 * value), never read past: a rope other than M-RoPE without scaling (rope type other than
 * "mrope"/"default", a factor or other key beside them, no mrope_section, a
 * partial_rotary_factor), sliding-window attention in any layer, a hidden_act other than
 * "silu" (decoder or tower), a tower rope base other than DG_VISION_ROPE_THETA,
 * fullatt_block_indexes outside the tower or past 16 of them, rms_norm_eps or rope_theta
 * not above 0 and finite, eos_token_id lists longer than DG_MAX_EOS. */
#ifndef DG_QWEN2VL_CONFIG_H
#define DG_QWEN2VL_CONFIG_H

#include <stddef.h>
#include <stdint.h>

/* eos_token_id ids kept (config.json's, and generation_config.json's apart); a longer
 * list is refused. Qwen2.5-VL has one, and two in generation_config.json. */
#define DG_MAX_EOS 16

/* The vision tower's rotary base: not in the published config.json; transformers'
 * default for the axial vision rope (hard-coded in 4.x; 5.x writes it into
 * vision_config.rope_parameters). The parser refuses any other. */
#define DG_VISION_ROPE_THETA 10000.0f

typedef struct {
    int   hidden_size;            /* D */
    int   n_layers;
    int   n_heads;
    int   n_kv_heads;
    int   head_dim;               /* D / n_heads unless the file says otherwise */
    int   intermediate_size;      /* F */
    int   vocab_size;             /* V: embedding rows */
    float rms_norm_eps;
    float rope_theta;
    int   mrope_section[3];       /* t, h, w frequency counts; sum = head_dim / 2 */
    int   tie_word_embeddings;
    int   max_position_embeddings;
    int   bos_token_id;
    int   eos_token_id[DG_MAX_EOS];
    int   n_eos;
    int   vision_start_token_id, vision_end_token_id, image_token_id, video_token_id;
} dg_text_config;

typedef struct {
    int depth;
    int hidden_size;
    int num_heads;
    int intermediate_size;
    int in_chans;
    int patch_size;
    int temporal_patch_size;
    int spatial_merge_size;
    int window_size;
    int out_hidden_size;
    int tokens_per_second;
    int fullatt_block_indexes[16];
    int n_fullatt;
} dg_vision_config;

typedef struct {
    dg_text_config   text;
    dg_vision_config vision;
} dg_qwen2vl_config;

/* Reads DIR/config.json. */
int dg_config_load(const char *dir, dg_qwen2vl_config *c, char *err, size_t errlen);
/* Same from a JSON text (tests, fuzzing). `label` names it in messages. */
int dg_config_parse(const char *json, size_t len, const char *label, dg_qwen2vl_config *c,
                    char *err, size_t errlen);

#endif
