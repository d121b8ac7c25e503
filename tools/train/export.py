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
"""
import os
import shutil

import torch
from safetensors.torch import save_file

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
