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

Run:  build/mkmodel --preset small --seed 1 --out build/models/small   (or let dg-bench do it)
      tools/reference/.venv/bin/python tools/reference/bench_diffusers.py [--threads 2] [--quick]
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="build/models/small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32")
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
                T, h = c + 1, s // 8
                x = torch.randn(1, 16, T, h, h).to(dtype)
                cm = torch.zeros(1, 1, T, h, h, dtype=dtype)
                cm[:, :, :c] = 1
                ts = torch.tensor([1e-4] * c + [0.9]).view(1, 1, T, 1, 1).to(dtype)
                pm = torch.zeros(1, 1, h, h, dtype=dtype)
                key = f"dit_step_ms_{s}_c{c}_t{t}"
                res[key] = best_ms(lambda: dit(x, ts, ctx, condition_mask=cm, padding_mask=pm).sample, args.reps)
                print(f"dit {s} px, {c} condition frames: {res[key]:.1f} ms", flush=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", args.json)


if __name__ == "__main__":
    sys.exit(main())
