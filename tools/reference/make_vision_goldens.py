#!/usr/bin/env python3
"""Golden outputs of the Qwen2.5-VL vision tower and the multimodal prefill for
tests/test_vision.c and tests/test_mrope.c.

Builds the tiny package with build/mkmodel (the preset, seed and vocabulary of the decoder
goldens), loads it with transformers' Qwen2_5_VLForConditionalGeneration in float32 with
eager attention, and writes tests/golden/vision/:

  img_<w>x<h>.png      the test images (deterministic, drawn here with numpy)
  goldens.json         package recipe and checksum, transformers/torch versions; per image:
                       grid, window_index and cu_window_seqlens (get_vision_window_index);
                       the multimodal prompt: ids, grids, get_rope_index positions and
                       delta, top-16 (id, logit) of every prefill position, 16 greedy
                       tokens and the top-16 of each generated step
  vision_<name>.f32    the merged vision embeddings of each image alone, [tokens, out_hidden]
  vision_pair.f32      the two prompt images in one vision call (what the prefill uses)
  prompt.last.f32      the last-position prefill logits row

All .f32 files are little-endian float32. Pixel values come from the slow Pillow image
processor (Qwen2VLImageProcessorPil), which engine/image_preprocess.c reproduces bit for
bit.

Run:  tools/reference/.venv/bin/python tools/reference/make_vision_goldens.py
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

SEED = 1
PRESET = "tiny"
TOPK = 16
DECODE_STEPS = 16
# (width, height): a partial last row and column of windows; a wider one; a side that is a
# multiple of the window (transformers then pads with empty windows that it drops)
IMAGES = [(230, 150), (300, 200), (224, 224)]
PROMPT_IMAGES = [0, 1]
PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
          "<|vision_start|><|image_pad|><|vision_end|>What is in the first picture?"
          "<|vision_start|><|image_pad|><|vision_end|>And in the second one?<|im_end|>\n"
          "<|im_start|>assistant\n")


def fnv1a64(path):
    h = 0xCBF29CE484222325
    with open(path, "rb") as f:
        data = f.read()
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def topk(row):
    v, i = torch.topk(row, TOPK)
    return [[int(a), float(b)] for a, b in zip(i.tolist(), v.tolist())]


def draw(w, h, seed):
    """Smooth colour ramps, a disc and noise: every channel varies across every window."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 127.5 + 127.5 * np.sin(x / 9.0) * np.cos(y / 13.0)
    disc = (x - 0.6 * w) ** 2 + (y - 0.4 * h) ** 2 < (0.25 * min(w, h)) ** 2
    img = np.stack([r, g, b], axis=-1)
    img[disc] = 255 - img[disc]
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def write_f32(path, t):
    t.detach().to(torch.float32).numpy().astype("<f4").tofile(path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkmodel", default=os.path.join(root, "build", "mkmodel"))
    ap.add_argument("--vocab", default=os.path.join(root, "tools", "mkmodel", "vocab", "qwen2"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "golden", "vision"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([args.mkmodel, "--preset", PRESET, "--seed", str(SEED), "--out", tmp,
                        "--vocab", args.vocab], check=True)
        mdir = os.path.join(tmp, "mllm")
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            mdir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k != "error_msgs"}
        if bad or info.get("error_msgs"):
            sys.exit(f"loading was not clean: {info}")
        model.eval()
        vcfg = model.config.vision_config
        tok = AutoTokenizer.from_pretrained(mdir)
        proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
        out = {
            "generator": "tools/reference/make_vision_goldens.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "attn_implementation": "eager",
            "image_processor": "Qwen2VLImageProcessorPil",
            "package": {"preset": PRESET, "seed": SEED, "vocab": "tools/mkmodel/vocab/qwen2",
                        "weights_fnv1a64": f"{fnv1a64(os.path.join(mdir, 'model.safetensors')):016x}"},
            "out_hidden": vcfg.out_hidden_size,
            "topk": TOPK,
            "images": [],
        }
        pix, grids = [], []
        with torch.no_grad():
            for n, (w, h) in enumerate(IMAGES):
                name = f"img_{w}x{h}.png"
                path = os.path.join(args.out, name)
                draw(w, h, 100 + n).save(path, optimize=True)
                img = Image.open(path).convert("RGB")
                p = proc(images=[img], return_tensors="pt")
                pix.append(p["pixel_values"])
                grids.append(p["image_grid_thw"])
                emb = model.model.visual(p["pixel_values"], grid_thw=p["image_grid_thw"]).pooler_output
                wi, cu = get_vision_window_index(p["image_grid_thw"], vcfg.spatial_merge_size,
                                                 vcfg.window_size, vcfg.patch_size)
                write_f32(os.path.join(args.out, f"vision_{w}x{h}.f32"), emb)
                out["images"].append({"file": name, "grid": p["image_grid_thw"][0].tolist(),
                                      "tokens": emb.shape[0], "embeddings": f"vision_{w}x{h}.f32",
                                      "window_index": wi.tolist(), "cu_window_seqlens": cu.tolist()})
                print(f"image {name}: grid {p['image_grid_thw'][0].tolist()}, {emb.shape[0]} tokens")

            pv = torch.cat([pix[i] for i in PROMPT_IMAGES])
            gthw = torch.cat([grids[i] for i in PROMPT_IMAGES])
            pair = model.model.visual(pv, grid_thw=gthw).pooler_output
            write_f32(os.path.join(args.out, "vision_pair.f32"), pair)

            text = PROMPT
            for i in PROMPT_IMAGES:
                n_tok = out["images"][i]["tokens"]
                text = text.replace("<|image_pad|>", "<|placeholder|>" * n_tok, 1)
            text = text.replace("<|placeholder|>", "<|image_pad|>")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids])
            mm = (x == model.config.image_token_id).int()
            pos, delta = model.model.get_rope_index(x, mm_token_type_ids=mm, image_grid_thw=gthw)
            model.model.rope_deltas = None
            o = model(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv,
                      image_grid_thw=gthw, mm_token_type_ids=mm, use_cache=True)
            logits = o.logits[0]
            write_f32(os.path.join(args.out, "prompt.last.f32"), logits[-1])
            model.model.rope_deltas = None
            g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), pixel_values=pv,
                               image_grid_thw=gthw, mm_token_type_ids=mm, do_sample=False,
                               max_new_tokens=DECODE_STEPS + 1, eos_token_id=None, pad_token_id=0,
                               repetition_penalty=1.0, temperature=None, top_p=None, top_k=None,
                               return_dict_in_generate=True, output_logits=True)
            # g.logits[0] is the prefill's last row; g.logits[k] follows greedy token k - 1
            greedy = g.sequences[0, len(ids):len(ids) + DECODE_STEPS].tolist()
            steps = [topk(lg[0]) for lg in g.logits[1:DECODE_STEPS + 1]]
            if int(torch.argmax(logits[-1])) != greedy[0]:
                sys.exit("generate() disagrees with the prefill's argmax")
            out["prompt"] = {
                "text": PROMPT, "images": PROMPT_IMAGES, "ids": ids,
                "grids": gthw.tolist(), "pair_embeddings": "vision_pair.f32",
                "positions": pos[:, 0, :].tolist(), "rope_delta": int(delta[0, 0]),
                "prefill_topk": [topk(logits[i]) for i in range(len(ids))],
                "last_row": "prompt.last.f32",
                "greedy": greedy, "decode_topk": steps,
            }
            print(f"prompt: {len(ids)} tokens, rope_delta {int(delta[0, 0])}, greedy {greedy}")
    with open(os.path.join(args.out, "goldens.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
