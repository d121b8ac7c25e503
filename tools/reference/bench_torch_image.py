#!/usr/bin/env python3
"""Baseline for dg-bench's image figures on a GPU: diffusers (PyTorch, --dtype, SDPA attention,
eager) with the package's DiT and VAE shapes and random weights built on the device (no
weight file is read: DIR/dit/config.json and DIR/vae/config.json are all it needs, so a
seeded full package with no weights on disk will do). At --side S (latent S/8 x S/8, one frame):

  dit_step_ms_<S>                 one CosmosTransformer3DModel forward, batch 1: 16 latent
                                  channels + the condition-mask channel (zeros: text to image),
                                  the padding mask, a [1, 1, 1, 1, 1] timestep, a random
                                  [1, --ctx, text_embed_dim] context (as bench_diffusers.py)
  dit_step_ms_<S>_batch2          the same forward at batch 2 (conditional + unconditional)
  dit_s_per_image_<S>_<steps>_cfg the whole denoising loop with classifier-free guidance, the
                                  faster of the two ways below (dit_cfg_mode says which):
     ..._cfg_batch2               per step one batch-2 forward (context and zeros),
     ..._cfg_sequential           per step the conditional then the unconditional forward;
                                  then, as Cosmos2_5_PredictBasePipeline does, the guidance
                                  combine cond + g * (cond - uncond) in float32 and a
                                  UniPCMultistepScheduler step, configured as diffusers'
                                  scripts/convert_cosmos_to_diffusers.py saves it for
                                  Cosmos-Predict2.5 (karras + flow sigmas, flow_prediction,
                                  sigma_max 200, sigma_min 0.01); wall time of one loop
  dit_tflops, dit_tflops_batch2   dit_flops_per_forward (times the batch) / the step time
  vae_encode_ms_<S>               AutoencoderKLWan.encode of a [1, 3, 1, S, S] image (mode)
  vae_decode_ms_<S>               AutoencoderKLWan.decode of a [1, 16, 1, S/8, S/8] latent

Model FLOPs per forward (batch 1), from the DiT config; n = image tokens
T * (S/8/p_h) * (S/8/p_w), m = --ctx, D = heads * head_dim, F = mlp_ratio * D, E =
text_embed_dim, L = num_layers, p = p_t * p_h * p_w, C = in_channels + concat_padding_mask:

  2 * n * (C * p * D + p * out_channels * D)               patch embedding and output projection
  + L * (2 * n * (4 D^2 + 2 D^2 + 2 D F)                   self-attn q k v o, cross q o, MLP
         + 2 * m * 2 * E * D                               cross-attn k v on the context rows
         + 4 * n^2 * D + 4 * n * m * D)                    QK^T and PV, self and cross

The timestep MLP and the adaLN-LoRA modulations are left out: the model needs them once per
frame (under 0.01 % of the total). diffusers, given a 5-D timestep as the pipeline gives it,
expands the timestep embedding to every token first and so runs the adaLN-LoRA linears per
token (about 2 * n * L * 4 * 3 * D * R more, some 8 % at the 2B shapes): that is time it
spends, not model FLOPs. Times are the median of --reps (CUDA events on a GPU) after a warm-up
at each shape; the loops are one run each after a two-step warm-up loop. Every figure is
printed when measured and the JSON rewritten, so a timeout keeps what was done.

  python3 tools/reference/bench_torch_image.py --model DIR [--side 1024] [--steps 35] [--quick]
  CPU check: --device cpu --dtype float32 --model /tmp/tinypkg --side 64 --steps 2 --quick

--quick: 2 reps instead of 5 and at most 5 denoising steps (the keys name the steps run).
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

import torch


def flops_per_forward(cfg, side, ctx):
    """Model FLOPs of one batch-1 forward at one latent frame (formula in the docstring)."""
    p_t, p_h, p_w = cfg["patch_size"]
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    F = int(cfg.get("mlp_ratio", 4.0) * D)
    E, L = cfg["text_embed_dim"], cfg["num_layers"]
    C = cfg["in_channels"] + (1 if cfg.get("concat_padding_mask") else 0)
    p = p_t * p_h * p_w
    n = 1 * (side // 8 // p_h) * (side // 8 // p_w)   # one latent frame (p_t is 1)
    m = ctx
    io = 2 * n * (C * p * D + p * cfg["out_channels"] * D)
    block = 2 * n * (4 * D * D + 2 * D * D + 2 * D * F) + 2 * m * 2 * E * D + 4 * n * n * D + 4 * n * m * D
    return io + L * block, n


def linear_params_check(dit, cfg):
    """The token-path linear weights the formula counts, against the module's own: a config
    key the formula misses (a gate, a projection) shows here instead of in a wrong TFLOP/s."""
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    F = int(cfg.get("mlp_ratio", 4.0) * D)
    want = cfg["num_layers"] * (6 * D * D + 2 * D * F + 2 * cfg["text_embed_dim"] * D)
    have = sum(m.weight.numel() for name, m in dit.transformer_blocks.named_modules()
               if isinstance(m, torch.nn.Linear) and ".norm" not in "." + name)
    return want, have


class Timer:
    """Milliseconds of fn(): CUDA events around it on a GPU, the wall clock on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median_ms(self, fn, reps):
        fn()   # warm-up at this shape (cuBLAS, SDPA and cuDNN pick kernels per shape)
        self.sync()
        times = []
        for _ in range(reps):
            if self.cuda:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record(); fn(); e.record(); torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            else:
                t0 = time.perf_counter(); fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def wall_s(self, fn):
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def torchvision_shim():
    import diffusers.models.transformers.transformer_cosmos as tc
    if not hasattr(tc, "transforms"):   # no torchvision: the padding mask resize, nearest (as bench_diffusers.py)
        nearest = lambda x, size, interpolation=None: torch.nn.functional.interpolate(x, size=size, mode="nearest")
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=nearest),
                                              InterpolationMode=types.SimpleNamespace(NEAREST=0))


def build(cls, config_dir, device, dtype):
    """cls from DIR/config.json with PyTorch's random init, allocated on the device in dtype."""
    cfg = cls.load_config(config_dir)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    wrong = {p.dtype for p in model.parameters() if p.dtype != dtype}
    if wrong:
        sys.exit(f"bench_torch_image: {cls.__name__} has {wrong} parameters, not {dtype}")
    return model.eval(), cfg


def denoise(dit, sched, x0, ctx_pair, steps, guidance, batched):
    """One text-to-image loop as Cosmos2_5_PredictBasePipeline runs it (no condition frames):
    latents in float32, the DiT in its dtype, cond + g * (cond - uncond), a scheduler step."""
    dtype = next(dit.parameters()).dtype
    B, C, T, H, W = x0.shape
    cm = torch.zeros(1, 1, T, H, W, device=x0.device, dtype=dtype)
    pm = torch.zeros(1, 1, H, W, device=x0.device, dtype=dtype)
    ctx, unc = ctx_pair
    ctx2 = torch.cat([ctx, unc]) if batched else None
    sched.set_timesteps(steps, device=x0.device)
    latents = x0.clone()
    for i, t in enumerate(sched.timesteps):
        ts = sched.sigmas[i].to(device=x0.device, dtype=torch.float32).view(1, 1, 1, 1, 1).expand(1, 1, T, 1, 1)
        x = latents.to(dtype)
        if batched:
            out = dit(x.expand(2, -1, -1, -1, -1), ts.expand(2, -1, -1, -1, -1), ctx2,
                      condition_mask=cm.expand(2, -1, -1, -1, -1), padding_mask=pm, return_dict=False)[0]
            cond, uncond = out[:1].float(), out[1:].float()
        else:
            cond = dit(x, ts, ctx, condition_mask=cm, padding_mask=pm, return_dict=False)[0].float()
            uncond = dit(x, ts, unc, condition_mask=cm, padding_mask=pm, return_dict=False)[0].float()
        v = cond + guidance * (cond - uncond)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a duogen package (DIR/dit, DIR/vae)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--side", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=35)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--ctx", type=int, default=512, help="context rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(root, "build", "bench", "torch_image.json"))
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    S, reps = args.side, (2 if args.quick else 5)
    steps = min(args.steps, 5) if args.quick else args.steps
    if S % 16:
        sys.exit(f"bench_torch_image: --side {S} is not a multiple of 16 (VAE /8, patch /2)")
    torch.manual_seed(0)

    import diffusers
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, UniPCMultistepScheduler
    torchvision_shim()

    timer = Timer(device)
    res = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "dtype": args.dtype,
           "attention": "sdpa", "side": S, "steps": steps, "guidance": args.guidance, "ctx": args.ctx}
    if device.type == "cpu":
        res["threads"] = torch.get_num_threads()

    def record(key, value, unit):
        res[key] = value
        print(f"{key}: {value:.4g} {unit}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2, sort_keys=True)

    t0 = time.perf_counter()
    dit, dcfg = build(CosmosTransformer3DModel, os.path.join(args.model, "dit"), device, dtype)
    vae, _ = build(AutoencoderKLWan, os.path.join(args.model, "vae"), device, dtype)
    want, have = linear_params_check(dit, dcfg)
    res["dit_params"] = sum(p.numel() for p in dit.parameters())
    print(f"{res['device']}, torch {res['torch']}, diffusers {res['diffusers']}, {args.dtype}: "
          f"DiT {res['dit_params'] / 1e6:.1f} M parameters and VAE built on the device in {time.perf_counter() - t0:.1f} s",
          flush=True)
    if want != have:
        print(f"warning: the FLOP formula counts {want} token-path linear weights, the model has {have}", flush=True)
    flops, n = flops_per_forward(dcfg, S, args.ctx)
    res["dit_tokens"] = n
    res["dit_flops_per_forward"] = float(flops)
    res["dit_flops_formula"] = ("2*n*(C*p*D + p*C_out*D) + L*(2*n*(6*D^2 + 2*D*F) + 4*m*E*D + 4*n^2*D + 4*n*m*D); "
                                "n image tokens, m context rows, batch 1, adaLN and timestep MLP excluded")

    h = S // 8
    gen = torch.Generator(device=device).manual_seed(0)
    ctx = torch.randn(1, args.ctx, dcfg["text_embed_dim"], device=device, dtype=dtype, generator=gen)
    unc = torch.zeros_like(ctx)
    with torch.inference_mode():
        x = torch.randn(1, 16, 1, h, h, device=device, dtype=dtype, generator=gen)
        cm = torch.zeros(1, 1, 1, h, h, device=device, dtype=dtype)
        pm = torch.zeros(1, 1, h, h, device=device, dtype=dtype)
        ts = torch.full((1, 1, 1, 1, 1), 0.9, device=device)
        x2, cm2, ts2 = (t.expand(2, *t.shape[1:]) for t in (x, cm, ts))
        ctx2 = torch.cat([ctx, unc])   # the conditional and the unconditional row, as a batch-2 CFG step
        one = timer.median_ms(lambda: dit(x, ts, ctx, condition_mask=cm, padding_mask=pm, return_dict=False), reps)
        record(f"dit_step_ms_{S}", one, "ms")
        two = timer.median_ms(lambda: dit(x2, ts2, ctx2, condition_mask=cm2, padding_mask=pm, return_dict=False), reps)
        record(f"dit_step_ms_{S}_batch2", two, "ms")
        record("dit_tflops", flops / (one / 1e3) / 1e12, "TFLOP/s")
        record("dit_tflops_batch2", 2 * flops / (two / 1e3) / 1e12, "TFLOP/s")

        px = torch.rand(1, 3, 1, S, S, device=device, dtype=dtype, generator=gen) * 2 - 1
        record(f"vae_encode_ms_{S}", timer.median_ms(lambda: vae.encode(px).latent_dist.mode(), reps), "ms")
        z = torch.randn(1, 16, 1, h, h, device=device, dtype=dtype, generator=gen)
        record(f"vae_decode_ms_{S}", timer.median_ms(lambda: vae.decode(z).sample, reps), "ms")
        del px, z
        if device.type == "cuda":
            torch.cuda.empty_cache()

        sched = UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True,
                                        prediction_type="flow_prediction", sigma_max=200.0, sigma_min=0.01)
        res["scheduler"] = "UniPCMultistepScheduler(use_karras_sigmas, use_flow_sigmas, flow_prediction, sigma 0.01..200)"
        x0 = torch.randn(1, 16, 1, h, h, device=device, dtype=torch.float32, generator=gen)
        est = steps * (two + 2 * one) / 1e3
        print(f"denoising loops: {steps} steps with guidance, batch 2 and sequential, "
              f"about {est:.1f} s in all from the step times (after a two-step warm-up of each)", flush=True)
        base = f"dit_s_per_image_{S}_{steps}_cfg"
        for mode, batched in (("batch2", True), ("sequential", False)):
            denoise(dit, sched, x0, (ctx, unc), 2, args.guidance, batched)
            out = []
            s = timer.wall_s(lambda: out.append(denoise(dit, sched, x0, (ctx, unc), steps, args.guidance, batched)))
            record(f"{base}_{mode}", s, "s")
            res["dit_output_finite"] = bool(torch.isfinite(out[0]).all())
        best = min(("batch2", "sequential"), key=lambda m: res[f"{base}_{m}"])
        res["dit_cfg_mode"] = best
        record(base, res[f"{base}_{best}"], f"s ({best})")
    print("wrote", args.out, flush=True)


if __name__ == "__main__":
    main()
