/* dit.h — the Cosmos-Predict2.5 DiT (diffusers CosmosTransformer3DModel layout; spec
 * docs/specs/cosmos_dit_wan_vae.md §1-3) over the backend interface, run on DuoGen's packed frames
 * (dit_pack.h): patch embedding with the condition-mask and padding-mask channels,
 * timestep embedding and adaLN-LoRA modulation, per-head RMSNorm on q and k, 3-D RoPE,
 * self- and cross-attention, GELU MLP, final layer, unpatchify.
 *
 * The model (dg_dit) is immutable after load and shareable; it keeps the checkpoint mapped
 * (matrices are read in their stored dtype). A dg_dit_state is one caller's scratch, sized
 * once for the largest packed sequence and context, and the backend its forwards run on
 * (the load's, or a fork of it: backend.h); nothing is allocated per step.
 *
 *     dg_dit dit; dg_dit_state *s; dg_dit_layout L;
 *     dg_dit_load(&dit, "pkg/dit", be, err, sizeof err);
 *     dg_dit_state_new(&dit, be, 4096, 512, &s, err, sizeof err);
 *     dg_dit_layout_build(&L, h, w, cond, n, dit.cfg.latent_channels, 2, 2, err, sizeof err);
 *     dg_dit_set_layout(&dit, s, &L, err, sizeof err);     // RoPE tables: once per image
 *     for each step, for each CFG branch:
 *         dg_dit_forward(&dit, s, &(dg_dit_input){latents, t, ctx, n_ctx}, v, err, sizeof err);
 *     or both branches (or images of one layout) in one forward:
 *         dg_dit_forward_batch(&dit, s, (dg_dit_input[2]){cond, uncond}, 2, (float *[2]){vc, vu}, ...);
 *
 * Batching (docs/DESIGN.md §6 "Batching"): the inputs of one forward share the installed
 * layout; their tokens are stacked, every weight is one GEMM over all of them, attention
 * (self and cross) runs within each input. On the CPU each input's velocity is the same
 * bits as its own forward's (rows whatever m, attention per segment).
 *
 * Numerics: fp32 everywhere (weights widened as read); diffusers' eps values (q/k RMSNorm
 * 1e-5, LayerNorms and the t-embedding norm 1e-6). The timestep input is σ itself (diffusers
 * feeds the float sigma; P25 feeds trunc(1000σ)/1000 — spec §9.1). */
#ifndef DG_DIT_H
#define DG_DIT_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "draw/dit_pack.h"
#include "io/safetensors.h"
#include "io/weights.h"

typedef struct {
    int   latent_channels;   /* 16: in_channels (17) less the condition mask */
    int   out_channels;      /* 16 */
    int   n_heads, head_dim; /* 16 x 128 */
    int   hidden;            /* D = n_heads · head_dim */
    int   n_layers;          /* 28 */
    int   mlp_hidden;        /* F = mlp_ratio · D */
    int   text_dim;          /* cross-attention K/V input width (1024) */
    int   lora_dim;          /* adaln_lora_dim (256) */
    int   patch_h, patch_w;  /* 2, 2 (patch_t must be 1; read_config refuses patch_h != patch_w) */
    int   max_t, max_h, max_w;  /* max_size / patch: RoPE position limits */
    float rope_scale[3];     /* t, h, w: 1, 3, 3 */
    int   proj_in;           /* crossattn_proj_in_channels (100352) when the checkpoint carries
                                its own crossattn_proj (use_crossattn_projection), else 0 */
} dg_dit_config;

typedef struct {
    dg_weight wq, wk, wv, wo;        /* [D, D] attn1.to_q/k/v, to_out.0 */
    float    *q_norm, *k_norm;       /* [hd] attn1.norm_q/k */
    dg_weight cq, ck, cv, co;        /* [D, D], [D, text], [D, text], [D, D] attn2.* */
    float    *cq_norm, *ck_norm;     /* [hd] attn2.norm_q/k */
    dg_weight ff1;                   /* [F, D] ff.net.0.proj */
    dg_weight ff2;                   /* [D, F] ff.net.2 */
    dg_weight mod1[3];               /* [lora, D] norm1/2/3.linear_1 */
    dg_weight mod2[3];               /* [3D, lora] norm1/2/3.linear_2 */
} dg_dit_block;

typedef struct {
    dg_dit_config cfg;
    dg_backend   *be;          /* borrowed: the load's (weights); forwards use the state's */
    dg_st        *st;          /* owned: the mapped checkpoint the matrices point into (and
                                  crossattn_proj, read by the connector) */
    dg_weight     patch;       /* [D, (C+2)·ph·pw] patch_embed.proj */
    dg_weight     t1;          /* [D, D]  time_embed.t_embedder.linear_1 */
    dg_weight     t2;          /* [3D, D] time_embed.t_embedder.linear_2 */
    float        *t_norm;      /* [D]     time_embed.norm */
    dg_dit_block *blocks;      /* owned: [n_layers] */
    dg_weight     out1;        /* [lora, D] norm_out.linear_1 */
    dg_weight     out2;        /* [2D, lora] norm_out.linear_2 */
    dg_weight     proj_out;    /* [ph·pw·C_out, D] */
    dg_buffer_list owned;      /* fp32 norm weights in backend memory */
} dg_dit;

typedef struct {
    const float *const *latents;  /* [n_frames] host [C, h_f, w_f]: conditions clean, target x_σ */
    const float *timesteps;       /* [n_frames] per frame: σ for the target, 1e-4 (post-trained)
                                     for condition frames */
    const float *ctx;             /* host [n_ctx, text_dim]: the connector's output */
    int          n_ctx;
} dg_dit_input;

#define DG_DIT_MAX_BATCH 8   /* inputs of one forward */

typedef struct {
    dg_backend    *be;         /* borrowed: the buffers' and the forwards' backend */
    int            max_tokens, max_ctx;   /* of one forward: all its inputs together */
    dg_dit_layout  layout;     /* set by dg_dit_set_layout */
    int            has_layout;
    float *x;       /* [max_tokens, D]  residual stream */
    float *h;       /* [max_tokens, D]  modulated input / block output */
    float *q, *k, *v, *att;    /* [max_tokens, D] */
    float *ff;      /* [max_tokens, F] */
    float *ctx;     /* [max_ctx, text]  context */
    float *ck, *cv; /* [max_ctx, D]     cross-attention keys and values */
    float *tok;     /* [max_tokens, (C+2)·ph·pw] patch vectors */
    float *out;     /* [max_tokens, ph·pw·C_out] final projection */
    float *cos, *sin;          /* [max_tokens, hd/2] RoPE tables of the layout */
    /* F_max = min(max_tokens, DG_DIT_MAX_FRAMES · DG_DIT_MAX_BATCH): a row per frame of each input */
    float *sinus;   /* [F_max, D]      timestep sinusoids, one row per frame */
    float *temb;    /* [F_max, 3D]     adaLN-LoRA term (t_embedder output) */
    float *emb;     /* [F_max, D]      SiLU(RMSNorm(sinusoid)): the modulation MLPs' input */
    float *lora;    /* [F_max, lora] */
    float *mod;     /* [F_max, 3D]     shift, scale, gate per frame */
    float *host_tok;    /* host [max_tokens, (C+2)·ph·pw] */
    float *host_out;    /* host [max_tokens, ph·pw·C_out] */
    float *host_rope;   /* host [2, max_tokens, hd/2] */
    float *host_sinus;  /* host [F_max, D] */
} dg_dit_state;

/* Reads DIR/config.json (every key of the published Cosmos-Predict2.5 config: docs/PUBLISHED.md
 * lists what each must be) and DIR's weights (diffusion_pytorch_model.safetensors, or its
 * shards through diffusion_pytorch_model.safetensors.index.json; bf16, fp16 or fp32); binds
 * every tensor with its shape checked, and checks crossattn_proj's shape when the config has
 * one (the connector binds it from m->st). DG_EMODEL names the key or tensor. */
int  dg_dit_load(dg_dit *m, const char *dir, dg_backend *be, char *err, size_t errlen);
void dg_dit_unload(dg_dit *m);   /* accepts a zeroed or half-loaded model */

/* be: m's backend or a fork of it (backend.h), which must outlive the state. */
int  dg_dit_state_new(const dg_dit *m, dg_backend *be, int max_tokens, int max_ctx, dg_dit_state **out,
                      char *err, size_t errlen);
void dg_dit_state_free(const dg_dit *m, dg_dit_state *s);   /* accepts NULL */

/* Installs a packed layout (its RoPE tables): once per generated image. DG_ELIMIT when it
 * exceeds the state or the model's position limits; DG_EINVAL for a patch mismatch. */
int  dg_dit_set_layout(const dg_dit *m, dg_dit_state *s, const dg_dit_layout *L, char *err,
                       size_t errlen);

/* One network evaluation over the installed layout: the velocity of every frame into
 * `velocity` (host, the frames' [C_out, h_f, w_f] one after another, n_latent floats). */
int  dg_dit_forward(const dg_dit *m, dg_dit_state *s, const dg_dit_input *in, float *velocity,
                    char *err, size_t errlen);
/* n_in <= DG_DIT_MAX_BATCH evaluations over the installed layout in one forward:
 * velocity[i] gets in[i]'s, as dg_dit_forward would. n_in · layout tokens <= max_tokens and
 * Σ n_ctx <= max_ctx, else DG_ELIMIT. */
int  dg_dit_forward_batch(const dg_dit *m, dg_dit_state *s, const dg_dit_input *in, int n_in,
                          float *const *velocity, char *err, size_t errlen);

#endif
