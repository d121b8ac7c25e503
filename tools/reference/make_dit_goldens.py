#!/usr/bin/env python3
"""Golden outputs of the image-generation side (VAE, flow sampler, DiT, connector) for
tests/test_vae.c, tests/test_flow.c, tests/test_dit.c and tests/test_connector.c.

Builds the tiny package with build/mkmodel (preset tiny, seed 1), loads its vae/ and dit/
with diffusers (AutoencoderKLWan, CosmosTransformer3DModel) in float32 and its schedulers
(UniPCMultistepScheduler, FlowMatchEulerDiscreteScheduler), and writes tests/golden/dit/:

  goldens.json   package recipe, checksums, cases (shapes, parameters), largest values
  *.f32          little-endian float32 arrays named in goldens.json

Inputs are not stored: every input is a closed-form sequence (see `wave`) that the C tests
compute the same way, so only outputs are committed.

Run:  tools/reference/.venv/bin/python tools/reference/make_dit_goldens.py [--only vae,flow,dit]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

SEED = 1
PRESET = "tiny"


def fnv1a64(path):
    h = 0xCBF29CE484222325
    data = np.fromfile(path, dtype=np.uint8)
    for b in data.tobytes():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def wave(n, a, b, c):
    """x[i] = a * sin(b * i + c), computed in float64 and rounded to float32 (the C tests
    compute the same)."""
    i = np.arange(n, dtype=np.float64)
    return (a * np.sin(b * i + c)).astype(np.float32)


def save(out, name, arr):
    a = np.ascontiguousarray(arr.detach().cpu().numpy() if torch.is_tensor(arr) else arr, dtype=np.float32)
    a.tofile(os.path.join(out, name))
    return {"file": name, "shape": list(a.shape), "max_abs": float(np.abs(a).max())}


# ---- VAE ----------------------------------------------------------------------------------

def vae_goldens(pkg, out, g):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(os.path.join(pkg, "vae"), torch_dtype=torch.float32).eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    cases = []
    # (name, frames, H, W): one image and a short clip (5 frames -> 2 latent frames)
    for name, T, H, W in [("image", 1, 32, 48), ("clip", 5, 16, 24)]:
        n = T * 3 * H * W
        # [T, 3, H, W] frame-major, as the C API takes it
        px = torch.from_numpy(wave(n, 0.9, 0.37, 0.1).reshape(T, 3, H, W))
        with torch.no_grad():
            mu = vae.encode(px.permute(1, 0, 2, 3).unsqueeze(0)).latent_dist.mode()
            z = ((mu - mean) / std)[0].permute(1, 0, 2, 3)            # [T_lat, 16, h, w]
            Tl, h, w = z.shape[0], H // 8, W // 8
            zin = torch.from_numpy(wave(Tl * 16 * h * w, 1.5, 0.61, 0.3).reshape(Tl, 16, h, w))
            zz = zin.permute(1, 0, 2, 3).unsqueeze(0) * std + mean
            dec = vae.decode(zz).sample[0].permute(1, 0, 2, 3)         # [T, 3, H, W]
        cases.append({
            "name": name, "frames": T, "height": H, "width": W,
            "encode": save(out, f"vae_{name}_encode.f32", z),
            "decode": save(out, f"vae_{name}_decode.f32", dec),
            "decode_clamped_fraction": float((dec.abs() >= 1.0).float().mean()),
        })
    g["vae"] = {"cases": cases, "inputs": {"pixels": [0.9, 0.37, 0.1], "latent": [1.5, 0.61, 0.3]}}


# ---- flow sampler -------------------------------------------------------------------------

FLOW_N = 64


def synthetic_velocity(x, sigma):
    """v[k] = 0.8·x[k] − 0.3·sin(3σ + 0.05k) in float32 (test_flow.c computes the same)."""
    k = torch.arange(x.numel(), dtype=torch.float32).view(x.shape)
    return 0.8 * x - 0.3 * torch.sin(torch.tensor(3.0, dtype=torch.float32) * torch.tensor(sigma, dtype=torch.float32) + 0.05 * k)


def run_scheduler(sched, x):
    for t in sched.timesteps:
        sigma = float(sched.sigmas[sched.step_index if sched.step_index is not None else 0])
        v = synthetic_velocity(x, sigma)
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


def flow_goldens(pkg, out, g):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    cases = []
    x0 = torch.from_numpy(wave(FLOW_N, 1.0, 0.7, 0.2)).view(1, 4, 4, 4)   # UniPC wants [B, C, ...]
    for steps in (36, 6):
        sched = UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
                                        sigma_max=200.0, sigma_min=0.01, solver_order=2, solver_type="bh2",
                                        lower_order_final=True, final_sigmas_type="zero")
        sched.set_timesteps(steps)
        x = run_scheduler(sched, x0.clone())
        cases.append({"name": f"unipc_karras_{steps}", "solver": "unipc", "schedule": "karras", "steps": steps,
                      "sigmas": [float(s) for s in sched.sigmas], "x": save(out, f"flow_unipc_karras_{steps}.f32", x)})
    for steps in (10,):
        sched = FlowMatchEulerDiscreteScheduler(shift=5.0)
        sched.set_timesteps(steps)
        x = run_scheduler(sched, x0.clone())
        cases.append({"name": f"euler_shift5_{steps}", "solver": "euler", "schedule": "shifted", "shift": 5.0,
                      # set_timesteps spaces u linearly from 1 to the already shifted sigma_min
                      # (shift(1/1000)) and shifts again
                      "u_first": 1.0, "u_last": 5.0 * 0.001 / (1 + 4.0 * 0.001), "steps": steps,
                      "sigmas": [float(s) for s in sched.sigmas], "x": save(out, f"flow_euler_shift5_{steps}.f32", x)})
    g["flow"] = {"n": FLOW_N, "x_init": [1.0, 0.7, 0.2], "cases": cases}


# ---- DiT ----------------------------------------------------------------------------------

COND_T = 1e-4          # post-trained Cosmos-Predict2.5: condition frames' timestep (spec §4)
N_CTX = 12


def packed_forward(model, frames, cond, timesteps, ctx):
    """DuoGen's packed forward built from diffusers' own modules: each frame (latent
    [16, h, w]) is patch-embedded with its mask channels, gets RoPE rows for temporal index
    f and its own grid, and its timestep embedding; the tokens of all frames are
    concatenated and run through the blocks with per-token modulation. Returns the
    velocity of every frame ([16, h, w] each)."""
    toks, cos, sin, temb, emb = [], [], [], [], []
    D = model.config.num_attention_heads * model.config.attention_head_dim
    for f, (lat, c, t) in enumerate(zip(frames, cond, timesteps)):
        h, w = lat.shape[-2:]
        x = torch.cat([lat, torch.full((1, h, w), float(c)), torch.zeros(1, h, w)])[None, :, None]
        tok = model.patch_embed(x).flatten(1, 3)                         # [1, n_f, D]
        n = tok.shape[1]
        # RoPE rows of temporal index f: the last frame of an (f+1)-frame video of this size
        c_all, s_all = model.rope(torch.zeros(1, 18, f + 1, h, w))
        cos.append(c_all[-n:])
        sin.append(s_all[-n:])
        te, em = model.time_embed(tok, torch.tensor([t], dtype=torch.float32))
        temb.append(te[:, None].expand(1, n, 3 * D))
        emb.append(em[:, None].expand(1, n, D))
        toks.append(tok)
    hs, temb, emb = torch.cat(toks, 1), torch.cat(temb, 1), torch.cat(emb, 1)
    rot = (torch.cat(cos), torch.cat(sin))
    for block in model.transformer_blocks:
        hs = block(hs, ctx, emb, temb, rot, None, None, None)
    hs = model.proj_out(model.norm_out(hs, emb, temb))[0]                 # [N, 4*16]
    outs, t0 = [], 0
    for lat in frames:
        h, w = lat.shape[-2:]
        n = (h // 2) * (w // 2)
        o = hs[t0:t0 + n].view(h // 2, w // 2, 2, 2, 16).permute(4, 0, 2, 1, 3).reshape(16, h, w)
        outs.append(o)
        t0 += n
    return outs


def dit_goldens(pkg, out, g):
    import types

    import diffusers.models.transformers.transformer_cosmos as tc
    from diffusers import CosmosTransformer3DModel, UniPCMultistepScheduler

    # diffusers resizes the padding mask with torchvision, which the venv does not carry;
    # the mask is zeros at the latent size, so nearest interpolation stands in for it
    if not hasattr(tc, "transforms"):
        nearest = lambda x, size, interpolation=None: torch.nn.functional.interpolate(x, size=size, mode="nearest")
        tc.transforms = types.SimpleNamespace(functional=types.SimpleNamespace(resize=nearest),
                                              InterpolationMode=types.SimpleNamespace(NEAREST=0))

    model = CosmosTransformer3DModel.from_pretrained(os.path.join(pkg, "dit"), torch_dtype=torch.float32).eval()
    text = model.config.text_embed_dim
    ctx = torch.from_numpy(wave(N_CTX * text, 1.0, 0.23, 0.5).reshape(1, N_CTX, text))
    res = {"n_ctx": N_CTX, "ctx": [1.0, 0.23, 0.5], "cond_timestep": COND_T, "cases": []}
    with torch.no_grad():
        # (a) the plain video path: 3 frames of 8x8 latents, the first two conditions
        T, H, W = 3, 8, 8
        lat = torch.from_numpy(wave(T * 16 * H * W, 1.0, 0.11, 0.7).reshape(T, 16, H, W))
        tsteps = [COND_T, COND_T, 0.7]
        cm = torch.zeros(1, 1, T, H, W)
        cm[:, :, :2] = 1
        v = model(lat.permute(1, 0, 2, 3)[None], torch.tensor(tsteps).view(1, 1, T, 1, 1), ctx,
                  condition_mask=cm, padding_mask=torch.zeros(1, 1, H, W)).sample[0].permute(1, 0, 2, 3)
        ref = packed_forward(model, list(lat), [1, 1, 0], tsteps, ctx)
        err = max(float((a - b).abs().max()) for a, b in zip(ref, v))
        assert err < 1e-4, f"packed reference differs from the video forward by {err}"
        res["cases"].append({"name": "video", "h": [H] * 3, "w": [W] * 3, "cond": [1, 1, 0], "timesteps": tsteps,
                             "latent": [1.0, 0.11, 0.7], "velocity": save(out, "dit_video.f32", v),
                             "packed_vs_video_max_diff": err})
        # (b) packed frames at their own resolutions: conditions 8x12 and 6x8, target 8x8
        hs, ws = [8, 6, 8], [12, 8, 8]
        n_lat = sum(16 * h * w for h, w in zip(hs, ws))
        flat = torch.from_numpy(wave(n_lat, 1.0, 0.13, 0.9))
        frames, o = [], 0
        for h, w in zip(hs, ws):
            frames.append(flat[o:o + 16 * h * w].view(16, h, w))
            o += 16 * h * w
        tsteps = [COND_T, COND_T, 0.55]
        v = torch.cat([x.flatten() for x in packed_forward(model, frames, [1, 1, 0], tsteps, ctx)])
        res["cases"].append({"name": "packed", "h": hs, "w": ws, "cond": [1, 1, 0], "timesteps": tsteps,
                             "latent": [1.0, 0.13, 0.9], "velocity": save(out, "dit_packed.f32", v)})

        # (b') as the painter packs earlier images at their own sizes: a condition larger
        # than the target and of another aspect (12x8), a small wide one (4x10), a third
        # (10x6), then the 6x8 target; each frame's spatial RoPE from its own grid
        hs_n, ws_n = [12, 4, 10, 6], [8, 10, 6, 8]
        n_lat = sum(16 * h * w for h, w in zip(hs_n, ws_n))
        flat_n = torch.from_numpy(wave(n_lat, 0.8, 0.17, 0.3))
        frames_n, o = [], 0
        for h, w in zip(hs_n, ws_n):
            frames_n.append(flat_n[o:o + 16 * h * w].view(16, h, w))
            o += 16 * h * w
        tsteps = [COND_T, COND_T, COND_T, 0.8]
        v = torch.cat([x.flatten() for x in packed_forward(model, frames_n, [1, 1, 1, 0], tsteps, ctx)])
        res["cases"].append({"name": "native", "h": hs_n, "w": ws_n, "cond": [1, 1, 1, 0], "timesteps": tsteps,
                             "latent": [0.8, 0.17, 0.3], "velocity": save(out, "dit_native.f32", v)})

        # (c) a complete 6-step UniPC run with guidance 7 on the packed frames of (b): the
        # target starts from the C noise stream (seed 7), the negative context drops the
        # last text segment (its last 4 rows)
        steps, scale, seed, drop = 6, 7.0, 7, 4
        sched = UniPCMultistepScheduler(use_karras_sigmas=True, use_flow_sigmas=True, prediction_type="flow_prediction",
                                        sigma_max=200.0, sigma_min=0.01, solver_order=2, solver_type="bh2",
                                        lower_order_final=True, final_sigmas_type="zero")
        sched.set_timesteps(steps)
        x = torch.from_numpy(flow_noise(16 * 8 * 8, seed)).view(1, 16, 8, 8)
        for i, t in enumerate(sched.timesteps):
            sigma = float(sched.sigmas[i])
            ts = [COND_T, COND_T, sigma]
            vc = packed_forward(model, frames[:2] + [x[0]], [1, 1, 0], ts, ctx)[2]
            vu = packed_forward(model, frames[:2] + [x[0]], [1, 1, 0], ts, ctx[:, :N_CTX - drop])[2]
            x = sched.step((vc + scale * (vc - vu))[None], t, x, return_dict=False)[0]
        res["sampling"] = {"steps": steps, "guidance": scale, "seed": seed, "drop_last_rows": drop,
                           "x": save(out, "dit_sampling.f32", x[0])}
    g["dit"] = res


def flow_noise(n, seed):
    """engine/flow.c dg_flow_noise: splitmix64 counter hash + Box-Muller, in numpy."""
    M = (1 << 64) - 1

    def sm(z):
        z = (z + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    key = sm(seed ^ 0x6A09E667F3BCC909)
    out = np.empty(n, dtype=np.float32)
    for k in range(n):
        r = sm((key + (k >> 1) * 0x9E3779B97F4A7C15) & M)
        u1 = ((r >> 32) + 1.0) / 4294967296.0
        u2 = (r & 0xFFFFFFFF) / 4294967296.0
        rad = np.sqrt(-2.0 * np.log(u1))
        out[k] = rad * (np.sin(2 * np.pi * u2) if k & 1 else np.cos(2 * np.pi * u2))
    return out


# ---- connector ----------------------------------------------------------------------------

def connector_goldens(pkg, out, g):
    """Cosmos' recipe on the full concatenation: per layer (h − mean)/(std_unbiased + 1e-8),
    concatenated in layer order, Linear + GELU (erf)."""
    from safetensors.torch import load_file

    cfg = json.load(open(os.path.join(pkg, "mllm", "config.json")))
    L, D = cfg["num_hidden_layers"], cfg["hidden_size"]
    sd = load_file(os.path.join(pkg, "connector.safetensors"))
    W, b = sd["crossattn_proj.0.weight"].float(), sd["crossattn_proj.0.bias"].float()
    P, drop = 10, 3
    amps = [3.0 * (1 + 15 * l) for l in range(L)]           # layers of very different scales
    hs = [torch.from_numpy(wave(P * D, amps[l], 0.37 + 0.01 * l, 0.2 * l).reshape(P, D)) + 0.5 * l for l in range(L)]
    normed = [(h - h.mean(-1, keepdim=True)) / (h.std(-1, keepdim=True) + 1e-8) for h in hs]
    ctx = torch.nn.functional.gelu(torch.cat(normed, -1) @ W.T + b)
    g["connector"] = {"layers": L, "hidden": D, "positions": P, "drop_last": drop,
                      "hidden_waves": [[amps[l], 0.37 + 0.01 * l, 0.2 * l, 0.5 * l] for l in range(L)],
                      "ctx": save(out, "connector_ctx.f32", ctx)}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="vae")
    args = ap.parse_args()
    out = os.path.join(root, "tests", "golden", "dit")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(2)
    gpath = os.path.join(out, "goldens.json")
    g = json.load(open(gpath)) if os.path.exists(gpath) else {}
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([os.path.join(root, "build", "mkmodel"), "--preset", PRESET, "--seed", str(SEED),
                        "--vocab", "own", "--out", tmp], check=True, stdout=subprocess.DEVNULL)
        g["package"] = {"preset": PRESET, "seed": SEED}
        g["checksums"] = {c: "%016x" % fnv1a64(os.path.join(tmp, c, "diffusion_pytorch_model.safetensors"))
                          for c in ("vae", "dit") if os.path.exists(os.path.join(tmp, c))}
        g["checksums"]["connector"] = "%016x" % fnv1a64(os.path.join(tmp, "connector.safetensors"))
        import diffusers
        g["versions"] = {"diffusers": diffusers.__version__, "torch": torch.__version__}
        for part in args.only.split(","):
            {"vae": vae_goldens, "flow": flow_goldens, "dit": dit_goldens, "connector": connector_goldens}[part](tmp, out, g)
    with open(gpath, "w") as f:
        json.dump(g, f, indent=1)
    print("wrote", gpath)


if __name__ == "__main__":
    sys.exit(main())
