"""The four networks of the product at the sizes of the shapes model, built from the
reference classes in the published layouts the engine loads, and the training-time
forwards that compute exactly what the engine computes.

  mllm/       transformers Qwen2_5_VLForConditionalGeneration (text decoder + vision tower);
              config.json written in the layout tools/mkmodel writes, the tokenizer beside it
  vae/        diffusers AutoencoderKLWan (Wan2.1): 8x down, no temporal down, ZC content
              channels plus two coordinate channels (below)
  dit/        diffusers CosmosTransformer3DModel (Cosmos-Predict2.5 layout): 2x2 patches,
              the condition-mask channel, the padding-mask channel, no crossattn_proj
  connector   Cosmos' crossattn_proj: Linear(L*D -> d_cond) + GELU over the standardized
              hidden states of the condition layers (engine/draw/connector.h)

The coordinate channels. The DiT has no absolute position embedding (Cosmos-Predict2.5:
3-D RoPE only), so attention sees only relative offsets, and nothing in a noise sample
tells a token where on the canvas it is: a model asked for "a red circle in the top left"
can learn the colour but not the place (measured here before this choice: colours
right, places scattered). The VAE's last two latent channels therefore carry a fixed
coordinate ramp (row and column, COORD_AMPLITUDE at the edges): the encoder is trained to
output it for every picture, the decoder never reads it (its post_quant_conv columns are
zero and stay zero), and the DiT learns to generate it, which it can do exactly, since it
is the same for every picture. Through the flow x_sigma = sigma*eps + (1-sigma)*x0 the
ramp becomes legible in the target frame as sigma falls, and it is clean in every
condition frame, where RoPE's relative offset (t, 0, 0) reads it at the same place. The
engine needs no change: this is a property of the trained weights.
"""
import json
import math
import os

import torch
import torch.nn.functional as F

LATENT_SIDE = 12            # 96 / 8
# M-RoPE base of the text decoder. Qwen2.5-VL gives a picture's token (row r, column c) the
# positions (t, s+r, s+c) and splits the rotary frequencies [t | rows | columns] from the
# highest down (mrope_section), so columns get the lowest ones: with head_dim 32 and the
# usual base (1e4 .. 1e6) a column step turns them by 0.003 rad or less and the decoder
# cannot tell the left of a picture from its right (descriptions then named rows, not
# columns). Base 10 turns them by 0.12 .. 0.24 rad per column.
MLLM_ROPE_THETA = 10.0
COORD_AMPLITUDE = 2.0       # the ramps run from -A to +A across the 12 latent rows / columns

SIZES = {
    # text decoder: hidden, layers, heads, kv heads, MLP, M-RoPE section (frequencies: hd/2)
    "mllm": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, mrope=[4, 6, 6],
                 v_depth=3, v_hidden=64, v_heads=2, v_intermediate=192),
    "vae": dict(base_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=1, content_channels=8),
    "dit": dict(heads=4, head_dim=48, layers=6, d_cond=128, lora=64),
}


# ---- MLLM ---------------------------------------------------------------------------------

def mllm_config(s, vocab_rows, base):
    """config.json of the Qwen2.5-VL package, in tools/mkmodel/mllm.c's layout; `base` is
    the id of the first special token (tokenizer.py)."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": base, "eos_token_id": base + 2, "pad_token_id": base,
        "vision_start_token_id": base + 9, "vision_end_token_id": base + 10, "vision_token_id": base + 11,
        "image_token_id": base + 12, "video_token_id": base + 13, "hidden_act": "silu",
        "hidden_size": s["hidden"], "initializer_range": 0.02, "intermediate_size": s["intermediate"],
        "max_position_embeddings": 4096, "max_window_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_hidden_layers": s["layers"], "num_key_value_heads": s["kv_heads"],
        "rms_norm_eps": 1e-6, "rope_scaling": {"type": "mrope", "mrope_section": s["mrope"]},
        "rope_theta": MLLM_ROPE_THETA, "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "use_cache": True, "use_sliding_window": False, "vocab_size": vocab_rows,
        "vision_config": {
            "depth": s["v_depth"], "hidden_act": "silu", "hidden_size": s["v_hidden"],
            "intermediate_size": s["v_intermediate"], "num_heads": s["v_heads"], "in_chans": 3,
            "out_hidden_size": s["hidden"], "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [s["v_depth"] - 1],
            "tokens_per_second": 2},
    }


PREPROCESSOR = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def build_mllm(mllm_dir):
    """The MLLM from mllm_dir/config.json, float32, random init (transformers' own)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    cfg = Qwen2_5_VLConfig.from_pretrained(mllm_dir)
    cfg._attn_implementation = "sdpa"
    # config.json says bfloat16 (how the weights ship); train and compute in float32
    return Qwen2_5_VLForConditionalGeneration._from_config(cfg, dtype=torch.float32)


def image_processor():
    """The slow Pillow processor, which engine/io/image_preprocess.c reproduces bit for bit."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(min_pixels=PREPROCESSOR["min_pixels"], max_pixels=PREPROCESSOR["max_pixels"])


def condition_states(hidden_states, layers):
    """The connector's input per position: HF hidden_states[l + 1] of each condition layer
    (the last one is after the final RMSNorm, as HF returns it), each standardized per token
    with the unbiased std plus 1e-8, concatenated in layer order. [B, n, L*D]"""
    out = []
    for l in layers:
        h = hidden_states[l + 1]
        out.append((h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8))
    return torch.cat(out, -1)


class Connector(torch.nn.Module):
    """crossattn_proj = Sequential(Linear(L*D, d_cond), GELU) (Cosmos-Predict2.5)."""

    def __init__(self, d_in, d_cond):
        super().__init__()
        self.crossattn_proj = torch.nn.Sequential(torch.nn.Linear(d_in, d_cond), torch.nn.GELU())

    def forward(self, states):
        return self.crossattn_proj(states)


# ---- VAE ----------------------------------------------------------------------------------

def vae_config(s, latents_mean=None, latents_std=None):
    z = s["content_channels"] + 2
    return {"_class_name": "AutoencoderKLWan", "attn_scales": [], "base_dim": s["base_dim"],
            "dim_mult": s["dim_mult"], "dropout": 0.0, "num_res_blocks": s["num_res_blocks"],
            "temperal_downsample": [False] * (len(s["dim_mult"]) - 1), "z_dim": z,
            "latents_mean": latents_mean or [0.0] * z, "latents_std": latents_std or [1.0] * z}


def build_vae(cfg):
    """AutoencoderKLWan with unit-gain convolutions: weights N(0, 1/fan_in) over the spatial
    taps one picture meets, biases 0. (PyTorch's default init leaves the colour of a region
    far below the biases, and the per-pixel RMS norms then all but erase it: a VAE so
    initialised learnt where shapes are long before it learnt any colour.)"""
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                fan = m.in_channels * m.kernel_size[-1] * m.kernel_size[-2]
                m.weight.normal_(0.0, fan ** -0.5)
                m.bias.zero_()
    return vae


def use_single_frame_convs():
    """Makes diffusers' WanCausalConv3d run a one-frame input as the 2-D convolution it is:
    with the causal front padding of 2 frames only the kernel's last temporal tap meets the
    frame (the engine skips the others the same way). Exact; 3x fewer FLOPs for training."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    if getattr(WanCausalConv3d, "_single_frame", False):
        return
    original = WanCausalConv3d.forward

    def forward(self, x, cache_x=None):
        if cache_x is None and x.shape[2] == 1 and self.stride[0] == 1 and self._padding[4] == self.kernel_size[0] - 1:
            p = self._padding
            y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=(p[2], p[0]))
            return y.unsqueeze(2)
        return original(self, x, cache_x)

    WanCausalConv3d.forward = forward
    WanCausalConv3d._single_frame = True


def coord_ramps(side=LATENT_SIDE):
    """The two coordinate channels [2, side, side]: rows, then columns, from -A to +A."""
    r = torch.linspace(-COORD_AMPLITUDE, COORD_AMPLITUDE, side)
    return torch.stack([r.view(-1, 1).expand(side, side), r.view(1, -1).expand(side, side)])


def vae_encode_raw(vae, pixels):
    """Encoder mean and log-variance of pictures [B, 3, H, W] in [-1, 1] (diffusers'
    _encode for one frame: encoder, quant_conv). [B, z, h, w] each."""
    enc = vae.quant_conv(vae.encoder(pixels.unsqueeze(2)))[:, :, 0]
    return enc.chunk(2, dim=1)


def vae_decode_raw(vae, z):
    """Pictures [B, 3, H, W] (not clamped) from raw latents [B, z, h, w]."""
    return vae.decoder(vae.post_quant_conv(z.unsqueeze(2)), first_chunk=True)[:, :, 0]


def latent_stats(vae):
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
    return mean, std


def vae_encode(vae, pixels):
    """The DiT's latent of pictures, as dg_vae_encode gives it: (mu - mean) / std."""
    mu, _ = vae_encode_raw(vae, pixels)
    mean, std = latent_stats(vae)
    return (mu - mean) / std


def vae_decode(vae, latents):
    """Pictures in [-1, 1] from the DiT's latents, as dg_vae_decode: clamped."""
    mean, std = latent_stats(vae)
    return vae_decode_raw(vae, latents * std + mean).clamp(-1, 1)


# ---- DiT ----------------------------------------------------------------------------------

def dit_config(s, z):
    return {"_class_name": "CosmosTransformer3DModel", "in_channels": z + 1, "out_channels": z,
            "num_attention_heads": s["heads"], "attention_head_dim": s["head_dim"], "num_layers": s["layers"],
            "mlp_ratio": 4.0, "text_embed_dim": s["d_cond"], "adaln_lora_dim": s["lora"],
            "max_size": [128, 240, 240], "patch_size": [1, 2, 2], "rope_scale": [1.0, 1.0, 1.0],
            "concat_padding_mask": True, "extra_pos_embed_type": None, "use_crossattn_projection": False,
            "encoder_hidden_states_channels": s["d_cond"]}


def build_dit(cfg):
    from diffusers import CosmosTransformer3DModel
    return CosmosTransformer3DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})


def _modulation(norm, emb, temb):
    """shift, scale(, gate) per frame from a Cosmos adaLN-LoRA norm, with the adaLN-LoRA
    term temb added over the norm's width: [B, F, 3D] (blocks) or [B, F, 2D] (norm_out)."""
    m = norm.linear_2(norm.linear_1(F.silu(emb)))
    return m + temb[..., :m.shape[-1]]


def _attention(attn, h, kv, mask, rope):
    """diffusers' CosmosAttnProcessor2_0 with a key mask: q/k RMSNorm per head, RoPE (self
    attention), SDPA. h [B, N, D], kv [B, M, *], mask [B, M] (True = attend)."""
    from diffusers.models.embeddings import apply_rotary_emb
    B, N, _ = h.shape
    q = attn.to_q(h).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    k = attn.to_k(kv).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    v = attn.to_v(kv).unflatten(2, (attn.heads, -1)).transpose(1, 2)
    q, k = attn.norm_q(q), attn.norm_k(k)
    if rope is not None:
        q = apply_rotary_emb(q, rope, use_real=True, use_real_unbind_dim=-2)
        k = apply_rotary_emb(k, rope, use_real=True, use_real_unbind_dim=-2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    return attn.to_out[0](o.transpose(1, 2).flatten(2))


def dit_forward(dit, latents, is_cond, timesteps, frame_mask, ctx, ctx_mask):
    """The engine's packed DiT forward (engine/draw/dit.c) for a batch of frame stacks of
    one latent size, built from the diffusers model's own modules.

    latents [B, F, C, h, w]: each sample's frames, conditions first, its target last, then
    padding; is_cond [B, F] (the condition-mask channel); timesteps [B, F] (sigma, 1e-4 for
    conditions); frame_mask [B, F] (False: padding, attended by nobody); ctx [B, M, d_cond]
    with ctx_mask [B, M]. Frame f of a sample has RoPE temporal index f, as the engine's
    layout gives. Returns the velocity [B, F, C, h, w]."""
    B, Fr, C, h, w = latents.shape
    p = dit.config.patch_size[1]
    n = (h // p) * (w // p)
    x = torch.cat([latents, is_cond.float()[:, :, None, None, None].expand(B, Fr, 1, h, w),
                   torch.zeros(B, Fr, 1, h, w)], 2)                          # [B, F, C+2, h, w]
    x = x.view(B, Fr, C + 2, h // p, p, w // p, p).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr * n, -1)
    x = dit.patch_embed.proj(x)                                               # [B, F·n, D]
    cos, sin = dit.rope(torch.zeros(1, 1, Fr, h, w))                          # [F·n, hd] in (t, row, col) order
    tp = dit.time_embed.time_proj(timesteps.reshape(-1)).view(B, Fr, -1)
    temb = dit.time_embed.t_embedder(tp)                                      # [B, F, 3D]
    emb = dit.time_embed.norm(tp)                                             # [B, F, D]
    tok_mask = frame_mask.repeat_interleave(n, 1)                             # [B, F·n]

    def per_token(m):
        return m.repeat_interleave(n, 1)

    for blk in dit.transformer_blocks:
        for norm, kind in ((blk.norm1, "self"), (blk.norm2, "cross"), (blk.norm3, "ff")):
            shift, scale, gate = per_token(_modulation(norm, emb, temb)).chunk(3, -1)
            hn = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift
            if kind == "self":
                y = _attention(blk.attn1, hn, hn, tok_mask, (cos, sin))
            elif kind == "cross":
                y = _attention(blk.attn2, hn, ctx, ctx_mask, None)
            else:
                y = blk.ff(hn)
            x = x + gate * y
    shift, scale = per_token(_modulation(dit.norm_out, emb, temb)).chunk(2, -1)
    x = dit.proj_out(F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift)   # [B, F·n, p·p·C]
    x = x.view(B, Fr, h // p, w // p, p, p, C).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(B, Fr, C, h, w)


# ---- files ----------------------------------------------------------------------------------

def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
