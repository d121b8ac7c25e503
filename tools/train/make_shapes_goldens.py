#!/usr/bin/env python3
"""Golden answers of the shipped shapes model for tests/test_shapes_model.c.

Loads tools/train/shapes/ with the reference classes in float32 (transformers
Qwen2_5_VLForConditionalGeneration, diffusers AutoencoderKLWan and
CosmosTransformer3DModel, the connector as Cosmos' crossattn_proj) and answers a few
conversations the way the engine does (pipeline.py: greedy text; on <BOV> the picture from
the engine's noise stream, UniPC, guidance and the duogen.json defaults, fed back through
the vision tower). Writes tests/golden/shapes/:

  goldens.json      the package's checksums, the versions, the sampler settings; per case:
                    the request (text, input picture), the job seed, the greedy token ids
                    (<BOV> included), the answer's text and its pictures
  <case>_in.png     the input picture of a case that has one
  <case>_<k>.png    the k-th picture of a case's answer (8-bit RGB, as the engine sends it)

Before writing, it checks that the packed DiT forward of pipeline.py equals diffusers'
own CosmosTransformer3DModel.forward on a two-frame video (condition + target), and that
the golden text tokenizes back to the golden ids (so equal text means equal tokens).

Run:  tools/train/.venv/bin/python tools/train/make_shapes_goldens.py
"""
import json
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversations  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import pipeline  # noqa: E402
import world  # noqa: E402
from world import Shape  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# (name, seed, user text, input picture or None): a draw, a two-step scene, an edit of a
# given picture, a description, a question
CASES = [
    ("draw", 5, "Draw a large red circle in the top left.", None),
    ("step", 6, "Show me step by step how to draw a blue square in the center and a small yellow triangle "
                "in the bottom right.", None),
    ("edit", 7, "Move the green triangle to the top right.",
     [Shape("triangle", "green", "large", 6), Shape("circle", "purple", "small", 4)]),
    ("describe", 8, "What is in this picture?",
     [Shape("square", "orange", "large", 0), Shape("circle", "blue", "small", 5), Shape("triangle", "red", "large", 7)]),
    ("talk", 9, "What colours can you use?", None),
]


def fnv1a64(path):
    h = 0xCBF29CE484222325
    with open(path, "rb") as f:
        for b in f.read():
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def load(pkg):
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
    mllm, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(pkg, "mllm"), dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    if any(v for k, v in info.items() if k != "error_msgs") or info.get("error_msgs"):
        sys.exit(f"mllm: loading was not clean: {info}")
    vae = AutoencoderKLWan.from_pretrained(os.path.join(pkg, "vae"), torch_dtype=torch.float32)
    dit = CosmosTransformer3DModel.from_pretrained(os.path.join(pkg, "dit"), torch_dtype=torch.float32)
    sd = load_file(os.path.join(pkg, "connector.safetensors"))
    w = sd["crossattn_proj.0.weight"].float()
    conn = models.Connector(w.shape[1], w.shape[0])
    conn.crossattn_proj[0].weight.data.copy_(w)
    conn.crossattn_proj[0].bias.data.copy_(sd["crossattn_proj.0.bias"].float())
    codec = data.Codec(AutoTokenizer.from_pretrained(os.path.join(pkg, "mllm")))
    return mllm.eval(), vae.eval(), dit.eval(), conn.eval(), codec


def check_dit(dit):
    """pipeline's packed forward against diffusers' video forward: frame 0 a condition at
    1e-4, frame 1 the target."""
    import diffusers.models.transformers.transformer_cosmos as tc
    if not hasattr(tc, "transforms"):   # the padding mask is zeros at the latent size: nearest will do
        nearest = lambda x, size, interpolation=None: torch.nn.functional.interpolate(x, size=size)  # noqa: E731
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=nearest),
                                              InterpolationMode=types.SimpleNamespace(NEAREST=0))
    g = torch.Generator().manual_seed(0)
    z, s = dit.config.out_channels, models.LATENT_SIDE
    lat = torch.randn(1, 2, z, s, s, generator=g)
    ctx = torch.randn(1, 9, dit.config.text_embed_dim, generator=g)
    ts = torch.tensor([[1e-4, 0.6]])
    with torch.no_grad():
        ours = models.dit_forward(dit, lat, torch.tensor([[True, False]]), ts, torch.ones(1, 2, dtype=torch.bool),
                                  ctx, torch.ones(1, 9, dtype=torch.bool))
        cm = torch.zeros(1, 1, 2, s, s)
        cm[:, :, 0] = 1
        ref = dit(lat.permute(0, 2, 1, 3, 4), ts.view(1, 1, 2, 1, 1), ctx, condition_mask=cm,
                  padding_mask=torch.zeros(1, 1, s, s)).sample.permute(0, 2, 1, 3, 4)
    err = float((ours - ref).abs().max())
    assert err < 1e-4, f"packed DiT forward differs from diffusers' by {err}"
    return err


def main():
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--package", default=os.path.join(HERE, "shapes"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "shapes"))
    args = ap.parse_args()
    pkg, out = args.package, args.out
    os.makedirs(out, exist_ok=True)
    torch.set_num_threads(1)
    models.use_single_frame_convs()   # exact for one-frame pictures (checked in models.py's docstring)
    mllm, vae, dit, conn, codec = load(pkg)
    cfg = json.load(open(os.path.join(pkg, "duogen.json")))
    d = cfg["defaults"]
    layers = cfg["condition_layers"]
    pixels = data.Pixels(models.image_processor())
    g = {"generator": "tools/train/make_shapes_goldens.py",
         "checksums": {f: fnv1a64(os.path.join(pkg, f)) for f in
                       ("mllm/model.safetensors", "dit/diffusion_pytorch_model.safetensors",
                        "vae/diffusion_pytorch_model.safetensors", "connector.safetensors")},
         "sampler": {"steps": d["steps"], "guidance_scale": d["guidance_scale"], "shift": d["shift"],
                     "width": d["width"], "height": d["height"]},
         "dit_packed_vs_diffusers": check_dit(dit), "cases": []}
    import diffusers
    import transformers
    g["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                     "diffusers": diffusers.__version__}
    for name, seed, text, picture in CASES:
        user = ([("image", picture)] if picture else []) + [("text", text)]
        conv = {"kind": name, "user": user, "assistant": []}

        def paint_fn(ids, pics, vision_end, k):
            n_neg = vision_end[-1] + 1 if vision_end else 1
            pos, neg = pipeline.context(mllm, codec, pixels, conn, layers, ids, pics, n_neg)
            conds = [world.render(p) if isinstance(p, list) else p for p in pics]
            pic, _ = pipeline.paint(dit, vae, pos, neg, conds, seed, k, d["steps"], d["guidance_scale"], d["shift"])
            return pic

        gen, answer, drawn = pipeline.answer(mllm, codec, pixels, conv, paint_fn, max_tokens=d["max_new_tokens"])
        case = {"name": name, "seed": seed, "text": text, "ids": gen, "answer": answer, "pictures": []}
        if picture:
            case["input"] = f"{name}_in.png"
            world.render(picture).save(os.path.join(out, case["input"]))
        for k, p in enumerate(drawn):
            fn = f"{name}_{k + 1}.png"
            p.save(os.path.join(out, fn))
            case["pictures"].append(fn)
        text_ids = [t for t in gen if t != codec.bov and t != codec.im_end]
        if codec.text(answer) != text_ids:
            print(f"note: {name}: the answer's text does not tokenize back to its ids")
        g["cases"].append(case)
        print(f"{name}: {answer!r}, {len(drawn)} picture(s)")
    with open(os.path.join(out, "goldens.json"), "w") as f:
        json.dump(g, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
