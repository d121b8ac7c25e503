/* model.h — what a loaded model package holds, shared by model.c (loading) and
 * sched.c (running). Not part of the public interface (duogen.h). */
#ifndef DG_MODEL_H
#define DG_MODEL_H

#include "backend.h"
#include "mllm/qwen2vl_config.h"
#include "draw/connector.h"
#include "draw/dit.h"
#include "draw/prompt_cond.h"
#include "duogen.h"
#include "io/image_preprocess.h"
#include "mllm/qwen2.h"
#include "io/safetensors.h"
#include "text/tokenizer.h"
#include "draw/vae.h"
#include "mllm/vision.h"

#define DG_MAX_COND_LAYERS 128

struct dg_model {
    char              dir[1024];
    char              describe[256];
    dg_backend       *be;               /* owned: the weights' backend (load only); each
                                           scheduler runs on a fork of it */
    dg_tok           *tok;              /* owned */
    dg_qwen2vl_config cfg;              /* mllm/config.json */
    dg_st            *mllm_st;          /* owned: the MLLM's mapped weights */
    dg_qwen2          llm;              /* bound text decoder */

    int               has_vision;       /* visual.* tensors present: images can be read */
    dg_vision         vision;
    dg_image_preprocess_config pp;      /* mllm/preprocessor_config.json */
    int               has_draw;         /* dit, vae and connector present: images can be drawn */
    dg_dit            dit;
    dg_vae            vae;
    dg_connector      conn;
    int32_t  image_pad_id, vision_start_id, vision_end_id;

    int32_t  bov_id;                    /* <BOV>, or -1 when the package draws no images: an
                                           added token of the tokenizer, or the free embedding
                                           row duogen.json "bov_id" gives it */
    char     bov_text[64];              /* what the model writes before an image: the draw
                                           marker when the package has one, else <BOV>'s text;
                                           "" with bov_id -1 */
    char     draw_marker[64];           /* duogen.json "draw_marker": text that acts as <BOV>
                                           when the model writes it, never in the answer; "" */
    char    *system_prompt;             /* owned: duogen.json "system_prompt", the system
                                           message of a job that has none; NULL: the chat
                                           template's */
    int      cond_from_prompt;          /* duogen.json "condition" "source": "prompt": the DiT
                                           is conditioned as the pipeline does (recipe) */
    dg_prompt_recipe recipe;
    int32_t  stop_ids[2 * DG_MAX_EOS + 1];   /* tokens that end the answer: the EOS ids of config.json
                                                and generation_config.json, and <|im_end|> */
    int      n_stop_ids;
    int      max_context;               /* positions of one sequence (prompt + answer) */
    int      cond_layers[DG_MAX_COND_LAYERS];   /* decoder layers feeding the connector */
    int      n_cond_layers;
    dg_text_params  text_defaults;      /* duogen.json "defaults": every field a value */
    dg_image_params image_defaults;
};

#endif
