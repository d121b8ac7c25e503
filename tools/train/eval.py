#!/usr/bin/env python3
"""Evaluates a shapes package through the C engine, the way a user reaches it: a private
redis-server, build/duogend on the package, and one build/duogenctl job per held-out
conversation (conversations.py, split "eval": held-out request wordings, and about half
the pictures asking for held-out colour-shape-place triples). Each answer (its text and
PNGs) is scored by score.py; the table of measures goes to stdout (Markdown) and, with
--json, to a file. Each job has its own fixed seed, so the run is repeatable.

Needs only Python 3, numpy and Pillow beside the built programs and redis-server.

    /usr/bin/python3 tools/train/eval.py [--model tools/train/shapes] [--per-kind 40]
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversations  # noqa: E402
import score  # noqa: E402
import world  # noqa: E402
from PIL import Image  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# measure: (what it counts, goal)
MEASURES = [
    ("decision", "draws when asked, never when not", 0.95),
    ("count", "as many pictures as asked", None),
    ("present", "every requested shape present with the right colour and place", 0.90),
    ("kind", "right shape kind (of the requested shapes found)", 0.80),
    ("size", "right size (of the requested shapes found whose size the user said)", None),
    ("clean", "draw and step pictures: the asked shapes and nothing else", None),
    ("kept", "earlier shapes kept in later pictures of the same answer", 0.90),
    ("describe", "description names every shape, colour and place right", 0.85),
    ("describe_size", "... and every size", None),
    ("edit", "edits: the asked change made, nothing else changed", 0.80),
]


class Worker:
    """redis-server and duogend on the package, in a scratch directory; closed on exit."""

    def __init__(self, model, work, threads, params=()):
        self.params = list(params)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", work, "--logfile", os.path.join(work, "redis.log"),
                        "--daemonize", "yes"], check=True)
        self.log = os.path.join(work, "duogend.log")
        self.proc = subprocess.Popen([os.path.join(ROOT, "build", "duogend"), "--redis", self.url, "--model", model,
                                      "--worker-id", "eval", "--block-ms", "200", "--threads", str(threads)],
                                     stderr=open(self.log, "w"))
        for _ in range(600):
            if ": ready" in open(self.log).read():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError("duogend did not start:\n" + open(self.log).read())

    def ask(self, job_id, seed, text, images, out):
        cmd = [os.path.join(ROOT, "build", "duogenctl"), "--redis", self.url, "enqueue", "--id", job_id,
               "--param", f"seed={seed}"]
        for p in self.params:
            cmd += ["--param", p]
        for p in images:
            cmd += ["--image", p]
        cmd += ["--out", out, text]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        md = open(os.path.join(out, "answer.md")).read()
        pictures = []
        for n in range(1, 64):
            p = os.path.join(out, f"image-{n}.png")
            if not os.path.exists(p):
                break
            pictures.append(Image.open(p).convert("RGB"))
        return re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", md).strip(), pictures

    def close(self):
        self.proc.terminate()
        self.proc.wait()
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown", "nosave"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def table(total, by_kind):
    lines = ["| measure | result | goal |", "| --- | --- | --- |"]
    for key, what, goal in MEASURES:
        if key not in total:
            continue
        a, b = total[key]
        lines.append(f"| {what} | {100.0 * a / max(b, 1):.1f}% ({a}/{b}) | {'≥ %d%%' % (goal * 100) if goal else '-'} |")
    lines += ["", "| kind | " + " | ".join(k for k, _, _ in MEASURES) + " |",
              "| --- |" + " --- |" * len(MEASURES)]
    for kind, t in by_kind.items():
        cells = [f"{t[k][0]}/{t[k][1]}" if k in t else "" for k, _, _ in MEASURES]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def montage(work, path, rows=4):
    """A figure of the first `rows` answers of the step and edit kinds, one answer a row
    (an edit's input picture first, then every picture drawn), pictures at 2x; returns
    the requests, one a row."""
    lines, requests = [], []
    for kind in ("step", "edit"):
        for i in range(rows):
            d = os.path.join(work, f"{kind}-{i}")
            names = sorted(f for f in os.listdir(d) if f.startswith("input-")) + \
                sorted((f for f in os.listdir(d) if f.startswith("image-")), key=lambda f: int(f[6:-4]))
            lines.append([Image.open(os.path.join(d, f)).convert("RGB") for f in names])
            requests.append(f"{kind}-{i}: " + json.load(open(os.path.join(d, "score.json")))["request"])
    side, gap = 2 * world.SIDE, 6
    fig = Image.new("RGB", (gap + max(len(r) for r in lines) * (side + gap), gap + len(lines) * (side + gap)),
                    (128, 128, 128))
    for y, row in enumerate(lines):
        for x, pic in enumerate(row):
            fig.paste(pic.resize((side, side), Image.NEAREST), (gap + x * (side + gap), gap + y * (side + gap)))
    fig.save(path)
    return requests


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(HERE, "shapes"))
    ap.add_argument("--per-kind", type=int, default=40, help="conversations of each of the five kinds")
    ap.add_argument("--seed", type=int, default=2026, help="the evaluation stream's seed")
    ap.add_argument("--work", default=os.path.join(ROOT, "build", "train", "eval"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--montage", help="a PNG of the first step and edit answers (montage())")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="a duogenctl --param for every job (e.g. shift=2, guidance=6): scores sampler "
                         "settings other than the package's defaults; repeatable")
    args = ap.parse_args()
    if any(p.split("=", 1)[0] == "seed" for p in args.param):
        ap.error("--param seed=...: each conversation has its own seed")
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    w = Worker(os.path.abspath(args.model), args.work, args.threads, args.param)
    total, by_kind, held = {}, {}, {}
    t0 = time.time()
    try:
        for kind in conversations.KINDS:
            for i in range(args.per_kind):
                conv = conversations.make(args.seed, i, "eval", kind)
                job = f"{kind}-{i}"
                out = os.path.join(args.work, job)
                os.makedirs(out)
                images, text = [], ""
                for n, (k, v) in enumerate(conv["user"]):
                    if k == "image":
                        p = os.path.join(out, f"input-{n}.png")
                        world.render(v).save(p)
                        images.append(p)
                    else:
                        text = v
                answer, pictures = w.ask(job, 1000 * (conversations.KINDS.index(kind) + 1) + i, text, images, out)
                r = score.score_answer(conv, answer, pictures)
                score.add_up(total, r)
                score.add_up(by_kind.setdefault(kind, {}), r)
                asks_held = any(s.triple() in world.HELD_OUT for s in sum(conv["new"], conv.get("shapes", [])))
                score.add_up(held.setdefault("held-out triple" if asks_held else "seen triples", {}), r)
                with open(os.path.join(out, "score.json"), "w") as f:
                    json.dump({"request": text, "answer": answer, "score": r}, f, indent=1)
    finally:
        w.close()
    n = len(conversations.KINDS) * args.per_kind
    print(f"{n} held-out conversations through duogend in {time.time() - t0:.0f} s"
          + (f" (every job with {' '.join(args.param)})" if args.param else "") + "\n")
    print(table(total, {**by_kind, **held}))
    if args.montage:
        print("\nfigure " + args.montage + ", one answer a row:\n" + "\n".join(montage(args.work, args.montage)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"total": total, "by_kind": by_kind, "by_triple": held, "conversations": n,
                       "params": args.param}, f, indent=1)


if __name__ == "__main__":
    main()
