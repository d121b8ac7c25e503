#!/usr/bin/python3
"""Redis memory per job, for capacity planning (deploy/CAPACITY.md): bytes per queued job
entry (by prompt size, with and without an inline input image) and per finished job
(result hash, event stream, job hash; generated PNGs are counted separately since their
size is the image's). Uses a private redis-server and the test engine worker.

  redis_memory.py [--json FILE]"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import redis

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "build", "gen", "python"))
import duogen_pb2 as pb  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(jid, text, image=None, words_meta=None):
    j = pb.Job(id=jid)
    m = j.messages.add(role=pb.Message.USER)
    if image:
        m.parts.add(image=pb.Image(data=image))
    m.parts.add(text=text)
    for k, v in (words_meta or {}).items():
        j.metadata[k] = v
    return j.SerializeToString()


def used(r):
    return r.info("memory")["used_memory"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--n", type=int, default=2000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="duogen-mem-")
    port = free_port()
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--dir", tmp], stdout=subprocess.DEVNULL)
    w = None
    out = {}
    try:
        r = redis.Redis(port=port)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        r.xgroup_create("duogen:jobs", "duogen", id="0", mkstream=True)
        cases = {"queued_job_100B_prompt": ("x" * 100, None), "queued_job_2KB_prompt": ("x" * 2000, None),
                 "queued_job_2KB_prompt_200KB_image": ("x" * 2000, os.urandom(200_000))}
        for name, (text, image) in cases.items():
            n = a.n if image is None else 200
            before = used(r)
            pipe = r.pipeline(transaction=False)
            for i in range(n):
                pipe.xadd("duogen:jobs", {"id": f"{name}-{i}", "job": job(f"{name}-{i}", text, image)})
            pipe.execute()
            out[name] = (used(r) - before) / n
            r.delete("duogen:jobs")
            r.xgroup_create("duogen:jobs", "duogen", id="0", mkstream=True)
        # finished jobs: 100 generated words, no images (PNG sizes are the images' own)
        os.makedirs(os.path.join(tmp, "model"))
        w = subprocess.Popen([os.path.join(ROOT, "build", "tests", "duogend-fake"), "--redis",
                              f"redis://127.0.0.1:{port}/0", "--model", os.path.join(tmp, "model"),
                              "--log-level", "warning", "--jobs-retain-s", "0", "--trim-ms", "100"],
                             stderr=subprocess.DEVNULL)
        n = 300
        words = " ".join(["word"] * 100)
        time.sleep(0.5)
        before = used(r)
        pipe = r.pipeline(transaction=False)
        for i in range(n):
            pipe.xadd("duogen:jobs", {"id": f"done-{i}", "job": job(f"done-{i}", words)})
        pipe.execute()
        while r.xlen("duogen:done") < n:
            time.sleep(0.05)
        time.sleep(1.0)   # let the keeper trim the acknowledged entries
        out["finished_job_100_tokens"] = (used(r) - before) / n
        out["note"] = ("bytes of Redis used_memory per job; finished jobs keep result, events (one entry per "
                       "token and step, capped by events_maxlen), the job hash and a done entry until "
                       "result_ttl_s; add each generated PNG's size")
        for k, v in out.items():
            print(f"{k:40s} {v if isinstance(v, str) else f'{v:10.0f} bytes'}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)
    finally:
        if w:
            w.kill()
        srv.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
