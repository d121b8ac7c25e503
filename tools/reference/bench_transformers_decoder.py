#!/usr/bin/env python3
"""Baseline for dg-bench's decoder benchmark: transformers (PyTorch, eager CPU) on the same
small package (build/mkmodel --preset small --seed 1), same prompt length and decode steps,
1 and 2 threads. --dtype bf16 (the default: the weights as stored, compute in bf16, which is
what "equal precision" against llama.cpp's BF16 means) or f32 (the weights widened: twice
the bytes; kept for comparison, labelled). Writes build/bench/transformers_decoder.json
(bf16) or transformers_decoder_f32.json with the keys dg-bench uses (prefill_512_tok_s_t1,
decode_tok_s_t1, ...), for reading; dg-bench compares only its co-process (--serve).

The KV cache goes in by the name the model's forward takes (cache_kwarg): a name it does
not take would vanish into its **kwargs, each decode step a fresh one-token forward at
position 0; each decode checks that the cache grew by its tokens.

--serve (one --threads value): the baseline as dg-bench's co-process (`dg-bench
--transformers CMD decoder`), timed turn about with ours and llama.cpp in one run
(tools/dg-bench/bench.h bench_peer), with the commands of bench_llamacpp.py --serve:
  prefill      a new cache, the n-token prompt (512, or 64 with --quick) -> {"s": seconds, "argmax": id}
  decode N     the next N prompt ids one token at a time, after what is there -> {"s": seconds}
  quit

  tools/reference/.venv/bin/python tools/reference/bench_transformers_decoder.py [--dtype f32] [--quick]
  tools/reference/.venv/bin/python tools/reference/bench_transformers_decoder.py --serve --threads 2
"""
import argparse
import inspect
import json
import os
import resource
import time

import torch
from transformers import Qwen2_5_VLForConditionalGeneration


def prompt_ids(n, vocab):
    # the same linear congruential ids as tools/dg-bench/bench_decoder.c
    x, ids = 1, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        ids.append((x >> 33) % 151643 % vocab)
    return ids


def cache_kwarg(model):
    """`past_key_values` (transformers 4.x and the 5.x releases that kept it) or `cache`."""
    params = inspect.signature(model.forward).parameters
    for name in ("past_key_values", "cache"):
        if name in params:
            return name
    raise SystemExit(f"{type(model).__name__}.forward takes neither past_key_values nor cache")


def decode(model, ids, k, n, cache, kw):
    """n tokens after what the cache holds (ids from index k); checks that it grew by n."""
    before = cache.get_seq_length()
    for i in range(n):
        model(input_ids=torch.tensor([[ids[(k + i) % len(ids)]]]), use_cache=True, **{kw: cache})
    if cache.get_seq_length() != before + n:
        raise SystemExit(f"the KV cache went from {before} to {cache.get_seq_length()} tokens over {n} decode "
                         f"steps: the forward did not take it as {kw!r}")


def serve(model, ids, threads, baseline):
    """The co-process loop (module docstring): one JSON line per command."""
    from bench_peer import commands, say

    torch.set_num_threads(threads)
    cache, k, kw = None, 0, cache_kwarg(model)
    with torch.inference_mode():
        model.model.rope_deltas = None
        model(input_ids=torch.tensor([ids[:16]]), use_cache=True)   # warm-up
        say({"baseline": baseline, "threads": threads, "n_prompt": len(ids)})
        for cmd in commands():
            if cmd[0] == "prefill":
                model.model.rope_deltas = None
                t0 = time.perf_counter()
                o = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
                s = time.perf_counter() - t0
                cache, k = (o.cache if hasattr(o, "cache") else o.past_key_values), 0
                say({"s": s, "argmax": int(torch.argmax(o.logits[0, -1]))})
            elif cmd[0] == "decode" and len(cmd) == 2 and cmd[1].isdigit() and cache is not None:
                t0 = time.perf_counter()
                decode(model, ids, k, int(cmd[1]), cache, kw)
                s = time.perf_counter() - t0
                k += int(cmd[1])
                say({"s": s})
            else:
                say({"error": f"unknown command {' '.join(cmd)!r} (decode needs a prefill first)"})
    return 0


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(root, "build", "models", "small"))
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    if not args.out:
        name = "transformers_decoder.json" if args.dtype == "bf16" else "transformers_decoder_f32.json"
        args.out = os.path.join(root, "build", "bench", name)
    n_prompt, n_decode = (64, 8) if args.quick else (512, 64)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(args.model, "mllm"), dtype=dtype, attn_implementation="sdpa")
    model.eval()
    vocab = model.config.text_config.vocab_size
    ids = prompt_ids(n_prompt, vocab)
    import transformers
    res = {"baseline": f"transformers {transformers.__version__} (torch {torch.__version__}), {args.dtype}",
           "torch": torch.__version__, "dtype": args.dtype, "attn_implementation": "sdpa",
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    if args.serve:
        if len(args.threads) != 1:
            print(json.dumps({"error": "--serve takes one --threads value"}), flush=True)
            return 2
        return serve(model, ids, args.threads[0], res["baseline"])
    with torch.inference_mode():
        for t in args.threads:
            torch.set_num_threads(t)
            model.model.rope_deltas = None
            model(input_ids=torch.tensor([ids[:16]]), use_cache=True)   # warm-up
            model.model.rope_deltas = None
            t0 = time.perf_counter()
            o = model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            t1 = time.perf_counter()
            res["prefill_argmax"] = int(torch.argmax(o.logits[0, -1]))
            cache = o.cache if hasattr(o, "cache") else o.past_key_values
            decode(model, ids, 0, n_decode, cache, cache_kwarg(model))
            t2 = time.perf_counter()
            res[f"prefill_{n_prompt}_tok_s_t{t}"] = n_prompt / (t1 - t0)
            res[f"decode_tok_s_t{t}"] = n_decode / (t2 - t1)
            print(f"threads {t}: prefill {n_prompt / (t1 - t0):.2f} tok/s, decode {n_decode / (t2 - t1):.2f} tok/s")
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {res['peak_rss_mb']:.0f} MiB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
