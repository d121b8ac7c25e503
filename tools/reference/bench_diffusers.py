#!/usr/bin/env python3
"""diffusers baseline for `dg-bench image` (tools/dg-bench/bench_dit.c): the same figures
under the same keys, on the same small package, machine and thread count.

  dit_step_ms_<side>_c<n>_t<threads>   one CosmosTransformer3DModel forward (float32) on a
                                       video of n condition frames + the target (the packed
                                       path of equal frames is this video path), 512-row context
  vae_encode_ms_<side>_t<threads>      AutoencoderKLWan.encode of one image (float32)
  vae_decode_ms_<side>_t<threads>      AutoencoderKLWan.decode of its latent

Times are the best of --reps runs after a warm-up. Writes build/bench/diffusers_dit.json,
which dg-bench reads to print ours / diffusers. --dtype bf16: the DiT alone in bfloat16 (the
package's own weights; the VAE's are float32), to diffusers_dit_bf16.json, the baseline of
`dg-bench --bf16-compute image`.

--serve: the baseline as dg-bench's co-process (`dg-bench --diffusers CMD image`), so that
the two are timed turn about in one run rather than minutes apart (tools/dg-bench/bench.h
bench_peer). It loads the models, prints one JSON line {"baseline": ...}, then answers each
command on stdin with one JSON line:
  dit SIDE COND N   N DiT forwards at SIDE px with COND condition frames (the first for a
                    SIDE and COND warms up first, untimed) -> {"s": seconds}
  vae SIDE N encode|decode
                    N encodes of one SIDE x SIDE image, or N decodes of its latent (float32
                    only; warmed up likewise) -> {"s": seconds}
  quit
Errors are {"error": "..."}.

Run:  build/mkmodel --preset small --seed 1 --out build/models/small   (or let dg-bench do it)
      tools/reference/.venv/bin/python tools/reference/bench_diffusers.py [--threads 2] [--quick]
      tools/reference/.venv/bin/python tools/reference/bench_diffusers.py --serve --threads 2 [--dtype bf16]
"""
import argparse
import json
import os
import sys
import time
import types

import torch


def best_ms(fn, reps):
    fn()   # warm-up
    best = 1e30
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def dit_step(dit, ctx, dtype, s, c):
    """One forward of the DiT at s px with c condition frames, as a closure."""
    T, h = c + 1, s // 8
    x = torch.randn(1, 16, T, h, h).to(dtype)
    cm = torch.zeros(1, 1, T, h, h, dtype=dtype)
    cm[:, :, :c] = 1
    ts = torch.tensor([1e-4] * c + [0.9]).view(1, 1, T, 1, 1).to(dtype)
    pm = torch.zeros(1, 1, h, h, dtype=dtype)
    return lambda: dit(x, ts, ctx, condition_mask=cm, padding_mask=pm).sample


def serve(dit, ctx, vae, dtype, baseline):
    """The co-process loop (module docstring): one JSON line per command."""
    from bench_peer import commands, say

    steps, images = {}, {}
    say({"baseline": baseline})
    with torch.no_grad():
        for cmd in commands():
            args = [int(c) for c in cmd[1:] if c.isdigit()]
            if cmd[0] == "dit" and len(cmd) == 4 and len(args) == 3 and 64 <= args[0] <= 2048 and args[1] <= 7 and args[2] >= 1:
                side, c, n = args
                if (side, c) not in steps:
                    steps[side, c] = dit_step(dit, ctx, dtype, side, c)
                    steps[side, c]()   # warm-up
                t0 = time.perf_counter()
                for _ in range(n):
                    steps[side, c]()
                say({"s": time.perf_counter() - t0})
            elif (cmd[0] == "vae" and len(cmd) == 4 and len(args) == 2 and 64 <= args[0] <= 2048 and args[1] >= 1
                  and cmd[3] in ("encode", "decode")):
                if vae is None:
                    say({"error": "vae: no VAE figures in bf16 (its weights are float32)"})
                    continue
                side, n = args
                if side not in images:
                    px = torch.rand(1, 3, 1, side, side) * 2 - 1
                    images[side] = (px, vae.encode(px).latent_dist.mode())
                    vae.decode(images[side][1])   # warm-up
                px, z = images[side]
                t0 = time.perf_counter()
                for _ in range(n):
                    if cmd[3] == "encode":
                        vae.encode(px).latent_dist.mode()
                    else:
                        vae.decode(z).sample
                say({"s": time.perf_counter() - t0})
            else:
                say({"error": f"unknown command {' '.join(cmd)!r}"})
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if not args.json:
        args.json = "build/bench/diffusers_dit_bf16.json" if args.dtype == "bf16" else "build/bench/diffusers_dit.json"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel

    if not hasattr(tc, "transforms"):   # torchvision is not in the venv (see make_dit_goldens.py)
        nearest = lambda x, size, interpolation=None: torch.nn.functional.interpolate(x, size=size, mode="nearest")
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=nearest),
                                              InterpolationMode=types.SimpleNamespace(NEAREST=0))
    sides = [256] if args.quick else [256, 512]
    conds = [0, 1] if args.quick else [0, 1, 3]
    t = args.threads
    import diffusers
    res = {"threads": t, "torch": torch.__version__, "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
           "dtype": str(dtype).replace("torch.", ""),
           "baseline": f"diffusers {diffusers.__version__} (torch {torch.__version__}), {str(dtype).replace('torch.', '')}"}

    vae = None if args.dtype == "bf16" else AutoencoderKLWan.from_pretrained(os.path.join(args.model, "vae"), torch_dtype=torch.float32).eval()
    if args.serve:
        dit = CosmosTransformer3DModel.from_pretrained(os.path.join(args.model, "dit"), torch_dtype=dtype).eval()
        ctx = torch.randn(1, 512, dit.config.text_embed_dim).to(dtype)
        return serve(dit, ctx, vae, dtype, res["baseline"])
    with torch.no_grad():
        for s in sides if vae is not None else []:
            px = torch.rand(1, 3, 1, s, s) * 2 - 1
            z = vae.encode(px).latent_dist.mode()
            res[f"vae_encode_ms_{s}_t{t}"] = best_ms(lambda: vae.encode(px).latent_dist.mode(), args.reps)
            res[f"vae_decode_ms_{s}_t{t}"] = best_ms(lambda: vae.decode(z).sample, args.reps)
            print(f"vae {s}: encode {res[f'vae_encode_ms_{s}_t{t}']:.1f} ms, decode {res[f'vae_decode_ms_{s}_t{t}']:.1f} ms",
                  flush=True)
    del vae

    dit = CosmosTransformer3DModel.from_pretrained(os.path.join(args.model, "dit"), torch_dtype=dtype).eval()
    ctx = torch.randn(1, 512, dit.config.text_embed_dim).to(dtype)
    with torch.no_grad():
        for s in sides:
            for c in conds:
                key = f"dit_step_ms_{s}_c{c}_t{t}"
                res[key] = best_ms(dit_step(dit, ctx, dtype, s, c), args.reps)
                print(f"dit {s} px, {c} condition frames: {res[key]:.1f} ms", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    sys.exit(main())
