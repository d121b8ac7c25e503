#!/usr/bin/env python3
"""A tiny random Cosmos-Predict2.5 pipeline and its outputs, for the parity test
tests/integration/test_published.py (issue 16).

1. Builds a diffusers `Cosmos2_5_PredictBasePipeline` from diffusers' and transformers' own
   classes with tiny shapes and random weights (Qwen2_5_VLForConditionalGeneration as the text
   encoder, CosmosTransformer3DModel with its own crossattn_proj, AutoencoderKLWan,
   UniPCMultistepScheduler configured as scripts/convert_cosmos_to_diffusers.py configures the
   published one) and writes it with `save_pretrained(..., max_shard_size=...)` into
   tests/golden/pipeline/tiny-cosmos2.5/, in bf16 and sharded (so the folder has the published
   layout: model_index.json, transformer/ and text_encoder/ with their *.safetensors.index.json,
   vae/, tokenizer/, scheduler/). The tokenizer is the byte-level one of `mkmodel --vocab own`
   (256 byte tokens, 8 merges, the 22 Qwen2 added tokens from id 264; 320 embedding rows), so
   the folder stays small; it has no <BOV>: the package defines one (docs/PUBLISHED.md).
2. Loads that folder back with `Cosmos2_5_PredictBasePipeline.from_pretrained` in float32 and
   runs it:
     text2world    `pipe(prompt, num_frames=1, ...)`: one latent frame, decoded;
     image2world   `pipe(image=COND, prompt, num_frames=5, output_type="latent")`: latent frame
                   0 is the condition image, frame 1 the drawn one; frame 1 is decoded alone
                   with the pipeline's VAE and post-processing, which is how DuoGen decodes an
                   image (one latent frame is one picture; the pipeline's own video decode
                   would mix frame 0 into frame 1's four pixel frames).
   The initial noise is the engine's (engine/draw/flow.c dg_flow_noise, the stream the painter
   gives the job's first image: seed * 0x9E3779B97F4A7C15 + 1), recomputed here in numpy and
   handed to the pipeline as `latents`, so that both sides start from the same noise.
3. Writes tests/golden/pipeline/: cond.png (the condition image), t2w.png and i2w.png (the
   pipeline's images, 8-bit), noise.f32 (the target frame's noise, [16, h, w] float32 LE, for
   tests/test_flow.c), goldens.json (prompt, sizes, steps, guidance, seed, checksums).

Run (a few seconds on a CPU):
    tools/reference/.venv/bin/python tools/reference/make_pipeline_goldens.py
"""
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "train"))
from tokenizer import CHAT_TEMPLATE, SPECIALS  # noqa: E402  the Qwen2 specials and chat template, one copy

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "golden", "pipeline")
PIPE = os.path.join(OUT, "tiny-cosmos2.5")

SEED = 7                        # the job's seed
WIDTH, HEIGHT = 48, 32          # multiples of 16; latent 6 x 4
STEPS = 5
GUIDANCE = 3.0                  # > 1: the pipeline runs guidance only then
PROMPT = "A red kite over a green hill."
MASK64 = (1 << 64) - 1

# ---- the engine's noise (engine/draw/flow.c) -------------------------------------------------


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def engine_noise(n, stream):
    """dg_flow_noise(x, n, stream, 0): Box-Muller over splitmix64 counters, in double, rounded
    to float32."""
    key = splitmix64(stream ^ 0x6A09E667F3BCC909)
    out = np.empty(n, dtype=np.float32)
    for k in range(n):
        r = splitmix64((key + (k >> 1) * 0x9E3779B97F4A7C15) & MASK64)
        u1 = ((r >> 32) + 1.0) / 4294967296.0
        u2 = (r & 0xFFFFFFFF) / 4294967296.0
        rad = math.sqrt(-2.0 * math.log(u1))
        out[k] = rad * (math.sin(2 * math.pi * u2) if k & 1 else math.cos(2 * math.pi * u2))
    return out


def image_stream(seed, index):
    """The painter's noise stream of a job's image `index` (engine/draw/painter.c)."""
    return (seed * 0x9E3779B97F4A7C15 + index + 1) & MASK64


# ---- the tiny pipeline -----------------------------------------------------------------------

BASE = 264                       # first added token of the own vocabulary
MERGES = [("\u0120", "t"), ("h", "e"), ("i", "n"), ("\u0120", "a"), ("e", "r"), ("o", "n"),
          ("\u0120t", "he"), ("r", "e")]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(tmp):
    """mkmodel's own byte-level vocabulary (tools/mkmodel/mllm.c), through transformers."""
    from transformers import AutoTokenizer

    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for i, (a, b) in enumerate(MERGES):
        vocab[a + b] = 256 + i
    with open(os.path.join(tmp, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tmp, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    added = {str(BASE + i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": i < 14} for i, s in enumerate(SPECIALS)}
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
        json.dump({"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
                   "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
                   "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072,
                   "pad_token": "<|endoftext|>", "split_special_tokens": False,
                   "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, f)
    return AutoTokenizer.from_pretrained(tmp)


def reinit(model, gen):
    """Weights N(0, 1/fan_in), so that every layer changes its output by O(1) (with the
    classes' 0.02 a tiny model is its embedding plus noise and a parity test would not see a
    broken layer); norm weights 1 +- 0.1; biases N(0, 0.05)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (p.ndim == 1 and "norm" in name):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))


def make_pipeline(tmp):
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import Cosmos2_5_PredictBasePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    gen = torch.Generator().manual_seed(20260416)
    tokenizer = make_tokenizer(tmp)
    layers, hidden = 2, 32
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, vocab_size=320, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
                         bos_token_id=BASE, eos_token_id=BASE + 2, pad_token_id=BASE),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=hidden,
                           fullatt_block_indexes=[0], window_size=112, patch_size=14, temporal_patch_size=2,
                           spatial_merge_size=2, tokens_per_second=2),
        image_token_id=BASE + 12, video_token_id=BASE + 13, vision_start_token_id=BASE + 9,
        vision_end_token_id=BASE + 10, tie_word_embeddings=False)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg)
    reinit(text_encoder, gen)
    transformer = CosmosTransformer3DModel(
        in_channels=17, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=4.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(128, 240, 240), patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0), concat_padding_mask=True, extra_pos_embed_type=None,
        use_crossattn_projection=True, crossattn_proj_in_channels=layers * hidden, encoder_hidden_states_channels=32)
    reinit(transformer, gen)
    vae = AutoencoderKLWan(base_dim=2, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True])
    reinit(vae, gen)
    scheduler = UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
                                        sigma_max=200.0, sigma_min=0.01)
    pipe = Cosmos2_5_PredictBasePipeline(text_encoder=text_encoder.to(torch.bfloat16), tokenizer=tokenizer,
                                         transformer=transformer.to(torch.bfloat16), vae=vae.to(torch.bfloat16),
                                         scheduler=scheduler, safety_checker=lambda *args, **kwargs: None)
    return pipe


class NoSafetyChecker:
    """The pipeline wants cosmos_guardrail's checker; its outputs do not depend on it."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, text):
        return True


# ---- running it -------------------------------------------------------------------------------


def condition_image():
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    rgb = np.stack([128 + 100 * np.sin(0.21 * x + 0.5), 128 + 90 * np.cos(0.17 * y + 0.3 * x),
                    60 + 4 * x + 2 * y], -1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def to_uint8(frames):
    """The pipeline's np output [B, T, H, W, 3] in [0, 1] (VideoProcessor.postprocess_video:
    [-1, 1] to [0, 1], clamped) to 8 bits as its "pil" output makes them (numpy_to_pil: times
    255, rounded): the first frame."""
    return (frames[0, 0] * 255).round().astype(np.uint8)


# The condition frames' timestep the engine feeds the DiT (engine/draw/painter.c
# COND_TIMESTEP; docs/specs/cosmos_dit_wan_vae.md §4). The committed goldens were made with a
# pipeline that used it; later diffusers versions default `conditional_frame_timestep` to
# 0.1, which moves the image-to-world picture by tens of levels: where the pipeline takes
# the argument it is given, so that a regeneration stays comparable with the committed one.
COND_TIMESTEP = 1e-4


def run(pipe):
    import inspect
    h, w = HEIGHT // 8, WIDTH // 8
    noise = engine_noise(16 * h * w, image_stream(SEED, 0)).reshape(16, h, w)
    common = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    if "conditional_frame_timestep" in inspect.signature(pipe.__call__).parameters:
        common["conditional_frame_timestep"] = COND_TIMESTEP
    with torch.no_grad():
        t2w = pipe(num_frames=1, latents=torch.from_numpy(noise)[None, :, None], output_type="np", **common).frames
        lat = torch.zeros(1, 16, 2, h, w)
        lat[0, :, 1] = torch.from_numpy(noise)
        out = pipe(image=condition_image(), num_frames=5, latents=lat, output_type="latent", **common).frames
        # the drawn frame alone, through the pipeline's own decode and post-processing
        target = out[:, :, 1:2] / pipe.latents_std + pipe.latents_mean
        video = pipe.vae.decode(target.to(pipe.vae.dtype), return_dict=False)[0]
        i2w = pipe.video_processor.postprocess_video(video, output_type="np")
    return noise, to_uint8(t2w), to_uint8(i2w)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    from diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict import Cosmos2_5_PredictBasePipeline

    torch.manual_seed(0)
    shutil.rmtree(PIPE, ignore_errors=True)
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        make_pipeline(tmp).save_pretrained(PIPE, safe_serialization=True, max_shard_size="60KB")
    pipe = Cosmos2_5_PredictBasePipeline.from_pretrained(PIPE, torch_dtype=torch.float32,
                                                         safety_checker=NoSafetyChecker())
    noise, t2w, i2w = run(pipe)
    condition_image().save(os.path.join(OUT, "cond.png"))
    Image.fromarray(t2w).save(os.path.join(OUT, "t2w.png"))
    Image.fromarray(i2w).save(os.path.join(OUT, "i2w.png"))
    noise.astype("<f4").tofile(os.path.join(OUT, "noise.f32"))
    files = sorted(os.path.relpath(os.path.join(d, f), PIPE) for d, _, fs in os.walk(PIPE) for f in fs)
    g = {"prompt": PROMPT, "negative_prompt": "the pipeline's DEFAULT_NEGATIVE_PROMPT", "seed": SEED,
         "width": WIDTH, "height": HEIGHT, "steps": STEPS, "guidance_scale": GUIDANCE,
         "noise": {"file": "noise.f32", "shape": [16, HEIGHT // 8, WIDTH // 8], "stream": image_stream(SEED, 0)},
         "cases": {"t2w": {"image": "t2w.png"}, "i2w": {"image": "i2w.png", "condition": "cond.png"}},
         "pipeline": {f: sha(os.path.join(PIPE, f)) for f in files},
         "made_with": {m.__name__: m.__version__ for m in (__import__("diffusers"), __import__("transformers"), torch)}}
    with open(os.path.join(OUT, "goldens.json"), "w") as f:
        json.dump(g, f, indent=2)
        f.write("\n")
    print("wrote", OUT, "pixels t2w mean", t2w.mean(), "i2w mean", i2w.mean())


if __name__ == "__main__":
    main()
