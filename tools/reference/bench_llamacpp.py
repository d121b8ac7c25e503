#!/usr/bin/env python3
"""Baseline for dg-bench's decoder benchmark: llama.cpp (llama-cpp-python from PyPI) on a
GGUF of the same small package's text weights, 1 and 2 threads, same prompt length and
decode steps. --dtype bf16 (the default: the matrices in BF16 as the package stores them,
norms and biases in F32, as llama.cpp's own converter writes a BF16 model; equal precision
with duogen's bf16 weights) or f32 (every tensor widened: twice the bytes a token reads;
kept for comparison, labelled). Writes build/bench/llamacpp_decoder.json (bf16) or
llamacpp_decoder_f32.json with dg-bench's keys.

--serve (one --threads value): the baseline as dg-bench's co-process, so that the two are
timed turn about in one run rather than minutes apart (this host's memory bandwidth moves
between ~20 and ~65 GB/s for two threads from one minute to the next, and a decode figure
with it). It loads the model, prints one JSON line {"baseline": ...}, then answers each
command on stdin with one JSON line on stdout:
  prefill      reset, the n-token prompt (n = 512, or 64 with --quick) -> {"s": seconds, "argmax": id}
  decode N     the next N prompt ids one token at a time, after what is there -> {"s": seconds}
  generate MAX K STOPS NODRAFT ID...
               reset, the prompt ID... (timed apart), then greedy decoding of up to MAX new
               tokens, ending before a token of STOPS; with K > 0 drafts by prompt lookup as
               duogen's scheduler takes them (engine/sched_feed.c "Drafts": the latest earlier
               occurrence of the context's last 3, else 2, tokens; up to K of the tokens that
               followed it, none of NODRAFT; fed after the sampled token in one batch, each
               row's logits kept; taken while the argmax is the next drafted token; all
               refused: no drafts for 1, 3, 7, then 15 steps) -> {"prefill_s", "s" (the
               decode's seconds), "tokens", "steps", "drafted", "kept"}. STOPS and NODRAFT
               are ids joined by commas ("-": none).
  quit
Errors are {"error": "..."}; llama.cpp's own messages go to stderr.

The GGUF is written here with the `gguf` package: the qwen2 architecture keys, the Qwen2
BPE vocabulary (vocab.json + merges.txt + added tokens, padded to the embedding rows),
and every text tensor under llama.cpp's names. Qwen2.5-VL's M-RoPE
equals plain (NEOX, rotate-half) RoPE for text positions, so architecture qwen2 computes
the same function. No output.weight: tied embeddings (llama.cpp falls back to token_embd).

  tools/reference/.venv/bin/python tools/reference/bench_llamacpp.py [--quick]
  tools/reference/.venv/bin/python tools/reference/bench_llamacpp.py --serve --threads 2
"""
import argparse
import hashlib
import json
import os
import resource
import time

import numpy as np
from safetensors import safe_open

import gguf

NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(mdir, path, dtype):
    cfg = json.load(open(os.path.join(mdir, "config.json")))
    vocab = json.load(open(os.path.join(mdir, "vocab.json")))
    tcfg = json.load(open(os.path.join(mdir, "tokenizer_config.json")))
    merges = [l.rstrip("\n") for l in open(os.path.join(mdir, "merges.txt"), encoding="utf-8")
              if l.strip() and not l.startswith("#version")]
    n_vocab = cfg["vocab_size"]
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for t, i in vocab.items():
        tokens[i], types[i] = t, gguf.TokenType.NORMAL
    for i, a in tcfg.get("added_tokens_decoder", {}).items():
        tokens[int(i)] = a["content"]
        types[int(i)] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_name("duogen-small")
    w.add_context_length(4096)
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if dtype == "bf16" else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    with safe_open(os.path.join(mdir, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.startswith("visual."):
                continue
            t = f.get_tensor(name).float().numpy().astype(np.float32)
            if name == "model.embed_tokens.weight":
                out = "token_embd.weight"
            elif name == "model.norm.weight":
                out = "output_norm.weight"
            elif name == "lm_head.weight":
                out = "output.weight"
            else:
                layer, rest = name[len("model.layers."):].split(".", 1)
                out = f"blk.{layer}.{NAMES[rest]}"
            if dtype == "bf16" and t.ndim == 2:
                w.add_tensor(out, gguf.quants.quantize(t, gguf.GGMLQuantizationType.BF16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                w.add_tensor(out, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def prompt_ids(n, vocab):
    x, ids = 1, []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        ids.append((x >> 33) % 151643 % vocab)
    return ids


def load(gguf_path, threads):
    from llama_cpp import Llama
    return Llama(model_path=gguf_path, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=threads,
                 n_threads_batch=threads, use_mmap=True, verbose=False)


def draft_lookup(h, k, nodraft):
    """Up to k drafted tokens after the context h (engine/sched_feed.c draft_lookup)."""
    n = len(h)
    for g in (3, 2):
        if n <= g:
            continue
        suf = h[n - g:]
        for p in range(n - g - 1, -1, -1):
            if h[p] == suf[0] and h[p:p + g] == suf:
                d = []
                while len(d) < k and p + g + len(d) < n and h[p + g + len(d)] not in nodraft:
                    d.append(h[p + g + len(d)])
                if d:
                    return d
    return []


def generate(llm, prompt, max_new, k, stops, nodraft):
    """The "generate" command: greedy decoding with (k > 0) or without drafts, token for
    token as duogen's scheduler takes them (engine/sched.c take_drafted, take_token)."""
    n_vocab = llm.n_vocab()

    def rows(tokens, n_past, all_rows):
        """Feeds tokens at n_past: the argmax of the logits of each row (else the last)."""
        llm._batch.set_batch(batch=tokens, n_past=n_past, logits_all=all_rows)
        llm._ctx.decode(llm._batch)
        n = len(tokens) if all_rows else 1
        out = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n, n_vocab))
        return [int(i) for i in out.argmax(axis=1)]

    llm.reset()
    llm._ctx.kv_cache_seq_rm(-1, 0, -1)
    t0 = time.perf_counter()
    for i in range(0, len(prompt), llm.n_batch):
        last = rows(prompt[i:i + llm.n_batch], i, False)[-1]
    t1 = time.perf_counter()
    hist, out = list(prompt), []
    steps = drafted = kept = wait = skip = 0
    n_past = len(prompt)
    if last not in stops:
        out.append(last)
    while out and last not in stops and len(out) < max_new:
        d = []
        if k > 0:
            if skip:
                skip -= 1
            elif min(k, max_new - len(out) - 1) > 0:
                d = draft_lookup(hist + [last], min(k, max_new - len(out) - 1), nodraft)
        am = rows([last] + d, n_past, True)
        steps += 1
        drafted += len(d)
        hist.append(last)
        n_past += 1
        j, ended = 0, False
        while True:   # row j: its token taken; the next row while it is the next draft
            t = am[j]
            if t in stops:
                ended = True
                break
            out.append(t)
            if len(out) >= max_new:
                ended = True
                break
            if j == len(d) or t != d[j]:
                break
            hist.append(t)
            n_past += 1
            j += 1
        kept += j
        if ended:
            break
        if d:
            wait = 0 if j else min(wait * 2 + 1, 15)
            skip = wait
        last = t
        llm._ctx.kv_cache_seq_rm(-1, n_past, -1)
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "s": t2 - t1, "tokens": out, "steps": steps, "drafted": drafted, "kept": kept}


def ids_arg(word):
    return set() if word == "-" else {int(t) for t in word.split(",")}


def serve(args, n_prompt):
    """The co-process loop (module docstring): one JSON line per command."""
    import llama_cpp
    from bench_peer import commands, say

    if len(args.threads) != 1:
        say({"error": "--serve takes one --threads value"})
        return 2
    llm = load(args.gguf, args.threads[0])
    ids = prompt_ids(n_prompt, llm.n_vocab())
    llm.eval(ids[:16])          # warm-up: page the weights in
    llm.reset()
    say({"baseline": f"llama-cpp-python {llama_cpp.__version__}, {args.dtype.upper()} GGUF",
         "threads": args.threads[0], "n_prompt": n_prompt})
    k = 0
    for cmd in commands():
        if cmd[0] == "prefill":
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            s = time.perf_counter() - t0
            last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
            k = 0
            say({"s": s, "argmax": int(np.argmax(last))})
        elif cmd[0] == "decode" and len(cmd) == 2 and cmd[1].isdigit():
            n = int(cmd[1])
            if llm.n_tokens + n > 1024:
                say({"error": f"decode {n}: the context of 1024 is full at {llm.n_tokens}"})
                continue
            t0 = time.perf_counter()
            for _ in range(n):
                llm.eval([ids[k % n_prompt]])
                k += 1
            say({"s": time.perf_counter() - t0})
        elif cmd[0] == "generate" and len(cmd) > 5 and all(w.isdigit() for w in cmd[1:3] + cmd[5:]):
            prompt = [int(w) for w in cmd[5:]]
            if len(prompt) + int(cmd[1]) > 1024:
                say({"error": f"generate: {len(prompt)} + {cmd[1]} tokens exceed the context of 1024"})
                continue
            say(generate(llm, prompt, int(cmd[1]), int(cmd[2]), ids_arg(cmd[3]), ids_arg(cmd[4])))
            k = 0
        else:
            say({"error": f"unknown command {' '.join(cmd)!r}"})
    return 0


def gguf_path(root, model, dtype):
    """The GGUF made of `model`'s mllm, in build/models/, named by the package's folder and
    its files' sizes and times: a package written again, or another --model, gets its own
    (one name per dtype compared a stale GGUF with a regenerated package)."""
    mllm = os.path.join(model, "mllm")
    h = hashlib.sha256(os.path.realpath(mllm).encode())
    for name in sorted(os.listdir(mllm)):
        if name.endswith((".safetensors", ".json")):
            st = os.stat(os.path.join(mllm, name))
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    base = os.path.basename(os.path.normpath(model))
    return os.path.join(root, "build", "models", f"{base}-{h.hexdigest()[:12]}-{dtype}.gguf")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(here, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(root, "build", "models", "small"))
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    ap.add_argument("--gguf")
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--serve", action="store_true")
    args = ap.parse_args()
    args.gguf = args.gguf or gguf_path(root, args.model, args.dtype)
    if not args.out:
        name = "llamacpp_decoder.json" if args.dtype == "bf16" else "llamacpp_decoder_f32.json"
        args.out = os.path.join(root, "build", "bench", name)
    if not os.path.exists(args.gguf):
        write_gguf(os.path.join(args.model, "mllm"), args.gguf, args.dtype)
    n_prompt, n_decode = (64, 8) if args.quick else (512, 64)
    if args.serve:
        return serve(args, n_prompt)
    import llama_cpp
    res = {"baseline": f"llama-cpp-python {llama_cpp.__version__}, {args.dtype.upper()} GGUF",
           "llama_cpp_python": llama_cpp.__version__, "dtype": args.dtype,
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "")}
    for t in args.threads:
        llm = load(args.gguf, t)
        ids = prompt_ids(n_prompt, llm.n_vocab())
        llm.eval(ids[:16])          # warm-up: page the weights in
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        # eval() keeps no logits unless logits_all; the context holds the last row
        last = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        res["prefill_argmax"] = int(np.argmax(last))
        for i in range(n_decode):
            llm.eval([ids[i]])
        t2 = time.perf_counter()
        res[f"prefill_{n_prompt}_tok_s_t{t}"] = n_prompt / (t1 - t0)
        res[f"decode_tok_s_t{t}"] = n_decode / (t2 - t1)
        print(f"threads {t}: prefill {n_prompt / (t1 - t0):.2f} tok/s, decode {n_decode / (t2 - t1):.2f} tok/s")
        del llm
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {res['peak_rss_mb']:.0f} MiB")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    raise SystemExit(main())
