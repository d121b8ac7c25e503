/* dit.c — writes DIR/dit/: a Cosmos-Predict2.5 DiT in the diffusers CosmosTransformer3DModel
 * layout (docs/specs/cosmos_dit_wan_vae.md §1-2) with random bf16 weights.
 *
 * tiny: 2 heads x 32, 2 blocks, text width 32, LoRA 16 (seconds on a CPU);
 * small: 8 heads x 128 (D 1024), 8 blocks, text 1024, LoRA 256 (about 0.15 B, CPU benchmarks);
 * full: the 2B shapes (16 x 128, 28 blocks, text 1024, LoRA 256).
 * tiny and small: the text projection (crossattn_proj) is the connector's
 * (connector.safetensors), so use_crossattn_projection is false and the DiT reads
 * text_embed_dim-wide context; full: the published Cosmos-Predict2.5-2B layout, with
 * crossattn_proj (100352 -> 1024, bias) in the DiT's own file and config
 * (docs/PUBLISHED.md), and no connector.safetensors.
 * Init: matrices N(0, 1/fan_in) so that every block changes the stream by O(1) (a fidelity
 * test then sees every part); norm weights 1 ± 0.1. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "mkmodel.h"

typedef struct {
    int heads, head_dim, layers, text, lora;
    int proj_in;   /* crossattn_proj_in_channels when the DiT carries its projection, else 0 */
} dit_shape;

static const dit_shape SHAPES[] = {
    [MK_TINY] = {2, 32, 2, 32, 16, 0},
    [MK_SMALL] = {8, 128, 8, 1024, 256, 0},
    [MK_FULL] = {16, 128, 28, 1024, 256, 28 * 3584},   /* Qwen2.5-VL-7B: 28 layers x 3584 */
};

int mk_dit_has_projection(mk_preset preset) { return SHAPES[preset].proj_in > 0; }

int mk_dit_text_dim(mk_preset preset) { return SHAPES[preset].text; }

static int mat(mk_list *l, const char *name, int64_t rows, int64_t cols) {
    const int64_t sh[2] = {rows, cols};
    return mk_add(l, DG_DTYPE_BF16, 0.0, 1.0 / sqrt((double)cols), name, 2, sh);
}

static int vec(mk_list *l, const char *name, int64_t n) {
    return mk_add(l, DG_DTYPE_BF16, 1.0, 0.1, name, 1, &n);
}

int mk_write_dit(const char *dir, mk_preset preset, uint64_t seed, char *err, size_t errlen) {
    const dit_shape *s = &SHAPES[preset];
    const int64_t D = (int64_t)s->heads * s->head_dim, F = 4 * D, C = 16, R = s->lora;
    char sub[4096], n[160], cfg[2048];
    mk_list l = {0};
    int rc = -1;
    snprintf(sub, sizeof sub, "%s/dit", dir);
    if ((mkdir(dir, 0755) < 0 && errno != EEXIST) || (mkdir(sub, 0755) < 0 && errno != EEXIST)) {
        snprintf(err, errlen, "%s: %s", sub, strerror(errno));
        return -1;
    }
#define M(rows, cols, ...) do { snprintf(n, sizeof n, __VA_ARGS__); if (mat(&l, n, rows, cols)) goto mem; } while (0)
#define V(len, ...) do { snprintf(n, sizeof n, __VA_ARGS__); if (vec(&l, n, len)) goto mem; } while (0)
    M(D, (C + 2) * 4, "patch_embed.proj.weight");
    M(D, D, "time_embed.t_embedder.linear_1.weight");
    M(3 * D, D, "time_embed.t_embedder.linear_2.weight");
    V(D, "time_embed.norm.weight");
    for (int b = 0; b < s->layers; b++) {
        const char *t = "transformer_blocks";
        M(D, D, "%s.%d.attn1.to_q.weight", t, b);
        M(D, D, "%s.%d.attn1.to_k.weight", t, b);
        M(D, D, "%s.%d.attn1.to_v.weight", t, b);
        M(D, D, "%s.%d.attn1.to_out.0.weight", t, b);
        V(s->head_dim, "%s.%d.attn1.norm_q.weight", t, b);
        V(s->head_dim, "%s.%d.attn1.norm_k.weight", t, b);
        M(D, D, "%s.%d.attn2.to_q.weight", t, b);
        M(D, s->text, "%s.%d.attn2.to_k.weight", t, b);
        M(D, s->text, "%s.%d.attn2.to_v.weight", t, b);
        M(D, D, "%s.%d.attn2.to_out.0.weight", t, b);
        V(s->head_dim, "%s.%d.attn2.norm_q.weight", t, b);
        V(s->head_dim, "%s.%d.attn2.norm_k.weight", t, b);
        M(F, D, "%s.%d.ff.net.0.proj.weight", t, b);
        M(D, F, "%s.%d.ff.net.2.weight", t, b);
        for (int k = 1; k <= 3; k++) {
            M(R, D, "%s.%d.norm%d.linear_1.weight", t, b, k);
            M(3 * D, R, "%s.%d.norm%d.linear_2.weight", t, b, k);
        }
    }
    M(R, D, "norm_out.linear_1.weight");
    M(2 * D, R, "norm_out.linear_2.weight");
    M(4 * C, D, "proj_out.weight");
    if (s->proj_in) {   /* inputs standardized per token: N(0, 1/fan_in) keeps unit scale */
        M(s->text, s->proj_in, "crossattn_proj.0.weight");
        snprintf(n, sizeof n, "crossattn_proj.0.bias");
        const int64_t nb = s->text;
        if (mk_add(&l, DG_DTYPE_BF16, 0.0, 0.1, n, 1, &nb)) goto mem;
    }
#undef M
#undef V
    snprintf(cfg, sizeof cfg,
             "{\n  \"_class_name\": \"CosmosTransformer3DModel\",\n  \"in_channels\": 17,\n"
             "  \"out_channels\": 16,\n  \"num_attention_heads\": %d,\n  \"attention_head_dim\": %d,\n"
             "  \"num_layers\": %d,\n  \"mlp_ratio\": 4.0,\n  \"text_embed_dim\": %d,\n"
             "  \"adaln_lora_dim\": %d,\n  \"max_size\": [128, 240, 240],\n  \"patch_size\": [1, 2, 2],\n"
             "  \"rope_scale\": [1.0, 3.0, 3.0],\n  \"concat_padding_mask\": true,\n"
             "  \"extra_pos_embed_type\": null,\n  \"use_crossattn_projection\": %s,\n"
             "  \"crossattn_proj_in_channels\": %d,\n  \"encoder_hidden_states_channels\": %d\n}\n",
             s->heads, s->head_dim, s->layers, s->text, s->lora, s->proj_in ? "true" : "false",
             s->proj_in ? s->proj_in : s->text, s->text);
    if (mk_write_text(sub, "config.json", cfg, err, errlen) < 0) goto out;
    if (mk_write_diffusers(sub, &l, seed, err, errlen) < 0) goto out;
    rc = 0;
    goto out;
mem:
    snprintf(err, errlen, "dit: out of memory");
out:
    mk_list_free(&l);
    return rc;
}
