"""Writes the trained shapes model as a duogen package (DESIGN §5), weights in bf16:

  duogen.json             format, components, <BOV>, condition layers (all decoder layers,
                          as Cosmos-Predict2.5), max_context, and the defaults the
                          evaluation used (greedy text; steps, guidance, shift)
  mllm/                   Qwen2.5-VL: config.json (tools/mkmodel's layout), model.safetensors
                          under the published checkpoint names (model.*, visual.*; lm_head
                          tied), the tokenizer files, preprocessor and generation configs
  vae/, dit/              diffusers layouts: config.json, diffusion_pytorch_model.safetensors
  connector.safetensors   crossattn_proj.0.weight [d_cond, L·D], crossattn_proj.0.bias

The VAE's 3x3x3 kernels were trained on single pictures, where only the last temporal tap
meets the frame; the other two taps are written as zeros (what they multiply for a
picture), so the file holds only what was trained.

read_package is the inverse, for train.py --from-package: a package's files back into a work
folder as the outputs of the stages up to dit2 or dit3 (--package-as), the weights in float32
holding the bf16 values.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import models

MLLM_FILES = ["config.json", "preprocessor_config.json", "generation_config.json", "vocab.json", "merges.txt",
              "tokenizer_config.json"]


def bf16(sd):
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in sd.items()}


def mllm_tensors(mllm):
    """transformers 5's module names -> the published Qwen2.5-VL checkpoint names."""
    out = {}
    for k, v in mllm.state_dict().items():
        if k == "lm_head.weight":
            continue                                  # tied to the embedding
        if k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        elif k.startswith("model.visual."):
            k = "visual." + k[len("model.visual."):]
        out[k] = v
    return bf16(out)


def vae_tensors(vae):
    out = {}
    for k, v in vae.state_dict().items():
        if v.dim() == 5 and v.shape[2] == 3:
            v = v.clone()
            v[:, :, :2] = 0
        out[k] = v
    return bf16(out)


def write_package(run, out, sampler):
    import train
    mllm, vae = train.load_mllm(run, train.MLLM_OF["export"]), train.load_vae(run)
    dit_cfg = models.dit_config(models.SIZES["dit"], vae.config.z_dim)
    dit = models.build_dit(dit_cfg)
    L, D = mllm.config.text_config.num_hidden_layers, mllm.config.text_config.hidden_size
    conn = models.Connector(L * D, dit_cfg["text_embed_dim"])
    w = torch.load(run.path(train.DIT_OF["export"], "weights.pt"), map_location="cpu")
    dit.load_state_dict(w["dit"])
    conn.load_state_dict(w["conn"])
    for sub in ("mllm", "vae", "dit"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    for f in MLLM_FILES:
        shutil.copy(run.path("mllm", f), os.path.join(out, "mllm", f))
    save_file(mllm_tensors(mllm), os.path.join(out, "mllm", "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(run.path("vae", "config.json"), os.path.join(out, "vae", "config.json"))
    save_file(vae_tensors(vae), os.path.join(out, "vae", "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    models.write_json(os.path.join(out, "dit", "config.json"), dit_cfg)
    save_file(bf16(dit.state_dict()), os.path.join(out, "dit", "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    save_file(bf16({"crossattn_proj.0.weight": conn.crossattn_proj[0].weight,
                    "crossattn_proj.0.bias": conn.crossattn_proj[0].bias}),
              os.path.join(out, "connector.safetensors"), metadata={"format": "pt"})
    models.write_json(os.path.join(out, "duogen.json"), {
        "format": "duogen-package-1", "name": "duogen-shapes",
        "components": {"mllm": "mllm", "dit": "dit", "vae": "vae", "connector": "connector.safetensors"},
        "bov_token": "<BOV>", "condition_layers": list(range(L)), "max_context": 1024,
        "defaults": {"max_new_tokens": 160, "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0,
                     "width": 96, "height": 96, "steps": sampler["steps"], "guidance_scale": sampler["guidance"],
                     "max_images": 4, "shift": sampler["shift"]}})
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    run.log(f"export: {out}, {size / 2 ** 20:.1f} MiB")


def read_package(run, pkg, as_stage="dit2"):
    """Unpacks the package `pkg` into run's work folder as stage outputs: mllm/ (config and
    tokenizer files), vae/ (config.json, weights.pt), the DiT and connector as the output of
    DiT stage `as_stage` (<as_stage>/weights.pt) and the MLLM as that of the stage it
    conditioned on (train.MLLM_OF: mllm2/weights.pt for dit2 and dit3). Every tensor is
    checked against the module it loads into (strict names and shapes)."""
    import train
    os.makedirs(run.path("mllm"), exist_ok=True)
    for f in MLLM_FILES:
        shutil.copy(os.path.join(pkg, "mllm", f), run.path("mllm", f))
    mllm = models.build_mllm(run.path("mllm"))
    sd = {}
    for k, v in load_file(os.path.join(pkg, "mllm", "model.safetensors")).items():
        k = "model.visual." + k[len("visual."):] if k.startswith("visual.") else "model.language_model." + k[len("model."):]
        sd[k] = v.float()
    sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]      # tied
    mllm.load_state_dict(sd)
    os.makedirs(run.path(train.MLLM_OF[as_stage]), exist_ok=True)
    torch.save(mllm.state_dict(), run.path(train.MLLM_OF[as_stage], "weights.pt"))
    os.makedirs(run.path("vae"), exist_ok=True)
    shutil.copy(os.path.join(pkg, "vae", "config.json"), run.path("vae", "config.json"))
    vae = models.build_vae(json.load(open(run.path("vae", "config.json"))))
    vae.load_state_dict({k: v.float() for k, v in
                         load_file(os.path.join(pkg, "vae", "diffusion_pytorch_model.safetensors")).items()})
    torch.save(vae.state_dict(), run.path("vae", "weights.pt"))
    dit_cfg = models.dit_config(models.SIZES["dit"], vae.config.z_dim)
    dit = models.build_dit(dit_cfg)
    dit.load_state_dict({k: v.float() for k, v in
                         load_file(os.path.join(pkg, "dit", "diffusion_pytorch_model.safetensors")).items()})
    L, D = mllm.config.text_config.num_hidden_layers, mllm.config.text_config.hidden_size
    conn = models.Connector(L * D, dit_cfg["text_embed_dim"])
    conn.load_state_dict({k: v.float() for k, v in load_file(os.path.join(pkg, "connector.safetensors")).items()})
    os.makedirs(run.path(as_stage), exist_ok=True)
    torch.save({"dit": dit.state_dict(), "conn": conn.state_dict()}, run.path(as_stage, "weights.pt"))
    run.log(f"from package {pkg}: {train.MLLM_OF[as_stage]}, vae and {as_stage} unpacked "
            f"(sha256 {package_digest(pkg)[:16]})")


def package_digest(pkg):
    """sha256 over a package's files but its card and montage, in path order (what dit3's
    record keeps of a run from a package)."""
    h = hashlib.sha256()
    for d, _, fs in sorted(os.walk(pkg)):
        for f in sorted(fs):
            if f.endswith((".md", ".png")):
                continue
            p = os.path.join(d, f)
            h.update(os.path.relpath(p, pkg).encode() + b"\0")
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()
