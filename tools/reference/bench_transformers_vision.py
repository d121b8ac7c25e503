#!/usr/bin/env python3
"""Baseline for dg-bench's vision benchmark: the transformers vision tower (PyTorch,
float32, CPU) on the same small package (build/mkmodel --preset small --seed 1), the same
image sizes (448x448 and 1024x1024, preprocessed by the slow Pillow processor; not timed),
1 and 2 threads. Writes build/bench/transformers_vision.json with the keys dg-bench uses
(images_s_448_t1, ...), so that dg-bench prints the ratios. Attention: "sdpa" (the
transformers default) unless --attn eager. --dtype bf16: the tower in bfloat16 (the
package's own weights, unwidened), written to transformers_vision_bf16.json, the baseline
of `dg-bench --bf16-compute vision`.

--serve: the baseline as dg-bench's co-process (`dg-bench --transformers CMD vision`), so
that the two are timed turn about in one run rather than minutes apart (tools/dg-bench/
bench.h bench_peer). It loads the model, prints one JSON line {"baseline": ...}, then answers
each command on stdin with one JSON line:
  tower SIDE THREADS N   N runs of the tower on the SIDE x SIDE picture with THREADS threads
                         (the first for a SIDE and THREADS warms up first, untimed) -> {"s": seconds}
  quit
Errors are {"error": "..."}.

  tools/reference/.venv/bin/python tools/reference/bench_transformers_vision.py [--quick] [--dtype bf16]
  tools/reference/.venv/bin/python tools/reference/bench_transformers_vision.py --serve [--dtype bf16]
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration

try:   # transformers 5.x names the slow Pillow processor apart; 4.x has only that one
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
except ImportError:
    from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil


def draw(side):
    # the picture of tools/dg-bench/bench_vision.c (content does not change the work)
    y, x = np.mgrid[0:side, 0:side]
    img = np.stack([x * 255 // side, y * 255 // side,
                    np.where(((x // 37 + y // 29) & 1) == 1, 200, 40)], axis=-1)
    return Image.fromarray(img.astype(np.uint8), "RGB")


def serve(visual, proc, dtype, baseline):
    """The co-process loop (module docstring): one JSON line per command."""
    from bench_peer import commands, say

    inputs, warm = {}, set()
    say({"baseline": baseline})
    with torch.inference_mode():
        for cmd in commands():
            if cmd[0] != "tower" or len(cmd) != 4 or not all(c.isdigit() for c in cmd[1:]):
                say({"error": f"unknown command {' '.join(cmd)!r}"})
                continue
            side, threads, n = (int(c) for c in cmd[1:])
            if not 56 <= side <= 4096 or threads < 1 or n < 1:
                say({"error": f"tower {side} {threads} {n}: out of range"})
                continue
            torch.set_num_threads(threads)
            if side not in inputs:
                p = proc(images=[draw(side)], return_tensors="pt")
                inputs[side] = (p["pixel_values"].to(dtype), p["image_grid_thw"])
            pv, grid = inputs[side]
            if (side, threads) not in warm:
                visual(pv, grid_thw=grid)
                warm.add((side, threads))
            t0 = time.perf_counter()
            for _ in range(n):
                visual(pv, grid_thw=grid)
            say({"s": time.perf_counter() - t0})
    return 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(root, "build", "models", "small"))
    ap.add_argument("--out")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if not args.out:
        name = "transformers_vision_bf16.json" if args.dtype == "bf16" else "transformers_vision.json"
        args.out = os.path.join(root, "build", "bench", name)
    sides = [448] if args.quick else [448, 1024]
    path = os.path.join(args.model, "mllm")
    try:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=args.attn)
    except TypeError:   # transformers 4.x
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, torch_dtype=dtype, attn_implementation=args.attn)
    model.eval()
    visual = getattr(model.model, "visual", None) or model.visual
    proc = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)
    import transformers
    res = {"torch": torch.__version__, "transformers": transformers.__version__,
           "torch_threads_max": torch.get_num_threads(), "dtype": str(dtype).replace("torch.", ""),
           "attn_implementation": args.attn,
           "baseline": f"transformers {transformers.__version__} (torch {torch.__version__}), {str(dtype).replace('torch.', '')}, "
                       f"{args.attn}",
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    if args.serve:
        return serve(visual, proc, dtype, res["baseline"])
    with torch.inference_mode():
        for t in args.threads:
            torch.set_num_threads(t)
            for side in sides:
                p = proc(images=[draw(side)], return_tensors="pt")
                pv, grid = p["pixel_values"].to(dtype), p["image_grid_thw"]
                reps = 1 if args.quick else (4 if side <= 448 else 2)
                visual(pv, grid_thw=grid)   # warm-up
                t0 = time.perf_counter()
                for _ in range(reps):
                    visual(pv, grid_thw=grid)
                t1 = time.perf_counter()
                key = f"images_s_{side}_t{t}"
                res[key] = reps / (t1 - t0)
                print(f"{key}: {res[key]:.3f} img/s (grid {grid[0].tolist()})")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    raise SystemExit(main())
