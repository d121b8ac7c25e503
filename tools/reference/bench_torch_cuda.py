#!/usr/bin/env python3
"""Baseline for dg-bench's cuda benchmark: transformers (PyTorch, bf16, sdpa attention,
eager, DynamicCache) on the same GPU, with the Qwen2.5-VL-7B text decoder's shapes and
random weights: prefill tok/s at 512 and 2048 tokens, decode tok/s at batch 1 over 128
steps after the 512-token prompt (fixed token ids; the last logits row copied to the host
every step, as dg-bench does). Also the two ceilings of the card as PyTorch reaches them:
device-to-device copy bandwidth (read + write bytes) and an 8192^3 bf16 matmul on random
data. Writes JSON (default build/bench/torch_cuda.json).

  python3 tools/reference/bench_torch_cuda.py [--quick] [--out FILE]

The text decoder of Qwen2.5-VL is Qwen2 with M-RoPE; for text-only positions M-RoPE equals
plain RoPE, so Qwen2ForCausalLM with the same sizes is the same computation and cost.
"""
import argparse
import json
import os
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def prompt_ids(n):
    # the same linear congruential ids as tools/dg-bench/bench_cuda.c
    x, ids = 1, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        ids.append((x >> 33) % 151643)
    return ids


def sync_ms():
    torch.cuda.synchronize()
    return time.perf_counter() * 1e3


def ceilings():
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    best = 1e9
    for i in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); torch.cuda.synchronize()
        if i >= 2:
            best = min(best, s.elapsed_time(e))
    copy_gb_s = 2 * n / (best / 1e3) / 1e9
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    y = torch.randn(m, m, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        x @ y
    e.record(); torch.cuda.synchronize()
    tflops = 2 * m ** 3 * 10 / (s.elapsed_time(e) / 1e3) / 1e12
    return copy_gb_s, tflops


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(root, "build", "bench", "torch_cuda.json"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n_prompt, n_long, n_decode = (64, 128, 16) if args.quick else (512, 2048, 128)
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "dtype": "bfloat16",
           "attn_implementation": "sdpa"}
    res["copy_gb_s"], res["bf16_matmul_tflops"] = ceilings()
    print(f"device {res['device']}: copy {res['copy_gb_s']:.0f} GB/s, bf16 matmul {res['bf16_matmul_tflops']:.0f} TFLOP/s", flush=True)

    cfg = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                      max_position_embeddings=128000, rope_theta=1000000.0, rms_norm_eps=1e-6,
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.eval()
    print(f"model built on the device in {time.perf_counter() - t0:.1f} s", flush=True)
    ids = prompt_ids(n_long + n_decode)
    with torch.inference_mode():
        # warm-up at every measured shape (cuBLAS and SDPA pick kernels per shape)
        for n in (n_prompt, n_long):
            out = model(input_ids=torch.tensor([ids[:n]], device="cuda"), use_cache=True)
            for i in range(4):
                out = model(input_ids=torch.tensor([[ids[i]]], device="cuda"),
                            past_key_values=out.past_key_values, use_cache=True)
            del out
        t0 = sync_ms()
        out = model(input_ids=torch.tensor([ids[:n_prompt]], device="cuda"), use_cache=True)
        out.logits[:, -1].float().cpu()
        t1 = sync_ms()
        past = out.past_key_values
        for i in range(n_decode):
            out = model(input_ids=torch.tensor([[ids[n_prompt + i]]], device="cuda"),
                        past_key_values=past, use_cache=True)
            past = out.past_key_values
            out.logits[:, -1].float().cpu()
        t2 = sync_ms()
        del out, past
        t3 = sync_ms()
        out = model(input_ids=torch.tensor([ids[:n_long]], device="cuda"), use_cache=True)
        out.logits[:, -1].float().cpu()
        t4 = sync_ms()
    res[f"prefill_{n_prompt}_tok_s"] = n_prompt / ((t1 - t0) / 1e3)
    res[f"prefill_{n_long}_tok_s"] = n_long / ((t4 - t3) / 1e3)
    res["decode_tok_s"] = n_decode / ((t2 - t1) / 1e3)
    res["decode_ms_per_token"] = (t2 - t1) / n_decode
    for k, v in res.items():
        print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()
