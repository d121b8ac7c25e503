"""The co-process side of dg-bench's turn-about baselines (tools/dg-bench/bench.h
bench_peer): one JSON object a line on stdout, flushed at once, and the command lines read
from stdin, so that dg-bench times ours and the baseline in turn within one run. Used by
bench_llamacpp.py and bench_transformers_vision.py --serve."""
import json
import sys


def say(obj):
    """One reply: a JSON object on one line."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def commands():
    """Each command line's words, until "quit" or the end of stdin; blank lines skipped."""
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return
        yield words
