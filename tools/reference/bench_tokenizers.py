#!/usr/bin/env python3
"""Encode throughput of the Hugging Face tokenizers library, one thread, on the corpus that
`build/dg-bench tokenizer` writes (build/bench/tokenizer-corpus.txt), with the same
tokenizer as the goldens (make_tokenizer_goldens.build_tokenizer). MB = 1e6 bytes.

  encode_whole_mb_s   Tokenizer.encode of the whole corpus as one text (best of 3)
  encode_lines_mb_s   Tokenizer.encode_batch of its lines (each line one document)

    build/dg-bench tokenizer   # writes the corpus
    tools/reference/.venv/bin/python tools/reference/bench_tokenizers.py \
        [--corpus build/bench/tokenizer-corpus.txt] [--json build/bench/tokenizer_hf.json]

One thread: RAYON_NUM_THREADS=1 and TOKENIZERS_PARALLELISM=false are set before the
library loads. duogen's figures of the same corpus (--ours: the dg-bench report that wrote
it, newer than the corpus and of its size) give the ratios, printed and written as
duogen_over_tokenizers_*; a report of another corpus or an earlier one gives none, said so.
"""
import os

os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tokenizer_goldens import build_tokenizer  # noqa: E402


def best_of(n, fn):
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", default="tools/mkmodel/vocab/qwen2")
    ap.add_argument("--corpus", default="build/bench/tokenizer-corpus.txt")
    ap.add_argument("--json", default="build/bench/tokenizer_hf.json")
    ap.add_argument("--ours", default="build/bench/tokenizer.json")
    a = ap.parse_args()
    import tokenizers
    tok = build_tokenizer(a.vocab)
    with open(a.corpus, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    parts = text.split("\n")   # each line with its "\n", as dg-bench cuts them
    lines = [ln + "\n" for ln in parts[:-1]] + ([parts[-1]] if parts[-1] else [])

    n_tokens = len(tok.encode(text, add_special_tokens=False).ids)   # also warms the cache
    whole = best_of(3, lambda: tok.encode(text, add_special_tokens=False))
    by_lines = best_of(1, lambda: tok.encode_batch(lines, add_special_tokens=False))
    res = {
        "tokenizers_version": tokenizers.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "corpus_bytes": len(raw),
        "tokens": n_tokens,
        "encode_whole_mb_s": len(raw) / 1e6 / whole,
        "encode_lines_mb_s": len(raw) / 1e6 / by_lines,
        "env_OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
    }
    res["baseline"] = f"tokenizers {tokenizers.__version__} (Python {platform.python_version()}), one thread"
    print(f"tokenizers {tokenizers.__version__}, one thread, {len(raw)} bytes, {n_tokens} tokens")
    print(f"  encode_whole_mb_s {res['encode_whole_mb_s']:10.3f} MB/s")
    print(f"  encode_lines_mb_s {res['encode_lines_mb_s']:10.3f} MB/s")
    ours, why = None, None
    try:
        if os.path.getmtime(a.ours) < os.path.getmtime(a.corpus):
            why = f"{a.ours} is older than the corpus (an earlier run)"
        else:
            with open(a.ours) as f:
                ours = json.load(f)["tokenizer"]
            if ours.get("corpus_bytes") != len(raw):
                why, ours = f"{a.ours} timed a corpus of {ours.get('corpus_bytes')} bytes, this one is {len(raw)}", None
    except (OSError, KeyError, ValueError) as e:
        why = f"no duogen figures in {a.ours}: {e}"
    if ours:
        if ours.get("tokens") != n_tokens:
            print(f"  note: duogen counted {ours.get('tokens')} tokens")
        for k in ("encode_whole_mb_s", "encode_lines_mb_s"):
            r = ours[k] / res[k]
            res["duogen_over_tokenizers_" + k[:-len("_mb_s")]] = r
            print(f"  duogen {k} {ours[k]:10.3f} MB/s = {r:.2f} x tokenizers")
    else:
        res["duogen_missing"] = why
        print(f"  no ratio: {why}")
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
