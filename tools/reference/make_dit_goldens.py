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
                        "--out", tmp], check=True, stdout=subprocess.DEVNULL)
        g["package"] = {"preset": PRESET, "seed": SEED}
        g["checksums"] = {c: "%016x" % fnv1a64(os.path.join(tmp, c, "diffusion_pytorch_model.safetensors"))
                          for c in ("vae",) if os.path.exists(os.path.join(tmp, c))}
        import diffusers
        g["versions"] = {"diffusers": diffusers.__version__, "torch": torch.__version__}
        for part in args.only.split(","):
            {"vae": vae_goldens, "flow": flow_goldens}[part](tmp, out, g)
    with open(gpath, "w") as f:
        json.dump(g, f, indent=1)
    print("wrote", gpath)


if __name__ == "__main__":
    sys.exit(main())
