#!/usr/bin/env python3
"""Golden outputs of the Qwen2.5-VL text decoder for tests/test_qwen2.c.

Builds the tiny package with build/mkmodel (same preset, seed and vocabulary as the test),
loads it with transformers' Qwen2_5_VLForConditionalGeneration in float32 with eager
attention, and writes tests/golden/qwen2/:

  goldens.json        package recipe and checksum; per prompt: token ids, the top-16
                      (id, logit) of every prefill position, 32 greedy tokens and the
                      top-16 of each decode step
  prompt<N>.last.f32  the full last-position prefill logits row (little-endian float32)
                      for the prompts listed in "full_rows"

Run:  tools/setup-venv.sh tools/reference
      tools/reference/.venv/bin/python tools/reference/make_qwen2_goldens.py
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import transformers
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

SEED = 1
PRESET = "tiny"
TOPK = 16
DECODE_STEPS = 32
PROMPTS = [
    "Hello world",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "Describe a cat in one sentence.<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. " * 6
    + "Numbers 1234567890 and symbols !@#$%^&*() are split too; ünïcödé and 汉字 as well.",
    "A",
]
FULL_ROWS = [0, 2]


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


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--mkmodel", default=os.path.join(root, "build", "mkmodel"))
    ap.add_argument("--vocab", default=os.path.join(root, "tools", "mkmodel", "vocab", "qwen2"))
    ap.add_argument("--out", default=os.path.join(root, "tests", "golden", "qwen2"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
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
        tok = AutoTokenizer.from_pretrained(mdir)
        checksum = fnv1a64(os.path.join(mdir, "model.safetensors"))
        out = {
            "generator": "tools/reference/make_qwen2_goldens.py",
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "dtype": "float32",
            "attn_implementation": "eager",
            "package": {"preset": PRESET, "seed": SEED, "vocab": "tools/mkmodel/vocab/qwen2",
                        "weights_fnv1a64": f"{checksum:016x}"},
            "topk": TOPK,
            "prompts": [],
        }
        os.makedirs(args.out, exist_ok=True)
        with torch.no_grad():
            for n, text in enumerate(PROMPTS):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                # generate() leaves the M-RoPE rope_deltas of its last call on the model; a
                # later prefill with a fresh cache must not reuse them
                model.model.rope_deltas = None
                x = torch.tensor([ids])
                o = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True)
                logits = o.logits[0]
                entry = {"text": text, "ids": ids,
                         "prefill_topk": [topk(logits[i]) for i in range(len(ids))]}
                if n in FULL_ROWS:
                    name = f"prompt{n}.last.f32"
                    logits[-1].numpy().astype("<f4").tofile(os.path.join(args.out, name))
                    entry["last_row"] = name
                # greedy decode with the HF KV cache, one token at a time
                past = o.past_key_values if hasattr(o, "past_key_values") else o.cache
                mask = torch.ones_like(x)
                nxt = int(torch.argmax(logits[-1]))
                tokens, steps = [], []
                for _ in range(DECODE_STEPS):
                    tokens.append(nxt)
                    mask = torch.cat([mask, torch.ones((1, 1), dtype=mask.dtype)], dim=1)
                    o = model(input_ids=torch.tensor([[nxt]]), attention_mask=mask,
                              cache=past, use_cache=True)
                    row = o.logits[0, -1]
                    steps.append(topk(row))
                    nxt = int(torch.argmax(row))
                # cross-check the manual loop against generate()
                g = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                   max_new_tokens=DECODE_STEPS, eos_token_id=None, pad_token_id=0,
                                   repetition_penalty=1.0, temperature=None, top_p=None, top_k=None)
                gen = g[0, len(ids):].tolist()
                if gen != tokens:
                    sys.exit(f"prompt {n}: generate() {gen} != manual loop {tokens}")
                entry["greedy"] = tokens
                entry["decode_topk"] = steps
                out["prompts"].append(entry)
                print(f"prompt {n}: {len(ids)} tokens, greedy {tokens[:8]}...")
    with open(os.path.join(args.out, "goldens.json"), "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
