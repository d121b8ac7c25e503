#!/usr/bin/python3
"""bench-e2e: whole interleaved jobs through a real duogend on the CPU, for the tiny and
small presets: jobs per hour and the time per phase (queue, prefill, decode, vision,
diffusion, VAE) from each Result's timings; and the prefill time of a long repeated
prefix without and with the prefix KV cache.

  bench_e2e.py [--presets tiny,small] [--jobs N] [--json FILE]

Each job: one input image and a question, a logit bias that makes <BOV> likely (random
weights never choose it), max_images 1 at the preset's default size; steps as below."""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import redis

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.join(ROOT, "build")
sys.path.insert(0, os.path.join(BUILD, "gen", "python"))
import duogen_pb2 as pb  # noqa: E402

SETTINGS = {   # per preset: image side, denoising steps, new tokens
    "tiny": (64, 6, 32),
    "small": (128, 4, 16),
}
LONG_SYSTEM = ("You are a patient chef who explains every step of a recipe: the ingredients, their "
               "quantities, the tools, the heat, the timing, and what can go wrong. ") * 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bov_id(pkg):
    out = subprocess.run([os.path.join(BUILD, "dg-tokenize"), "--model", pkg, "--raw"], input=b"<BOV>",
                         capture_output=True, check=True).stdout
    return int(out.split()[0])


def run_preset(preset, n_jobs, tmp, r, url):
    pkg = os.path.join(tmp, preset)
    t0 = time.time()
    subprocess.run([os.path.join(BUILD, "mkmodel"), "--preset", preset, "--seed", "1", "--out", pkg],
                   check=True, capture_output=True)
    mk_s = time.time() - t0
    prefix = f"b{preset}"
    log = open(os.path.join(tmp, f"{preset}.log"), "w")
    w = subprocess.Popen([os.path.join(BUILD, "duogend"), "--redis", url, "--model", pkg, "--prefix", prefix,
                          "--worker-id", f"bench-{preset}", "--block-ms", "200", "--log-level", "warning"],
                         stderr=log)
    side, steps, tokens = SETTINGS[preset]
    bov = bov_id(pkg)
    image = open(os.path.join(ROOT, "examples", "soup.png"), "rb").read()
    try:
        def job(jid, text, system, images=(image,), max_images=1, max_new=tokens, bias=True):
            j = pb.Job(id=jid, seed=1)
            j.messages.add(role=pb.Message.SYSTEM).parts.add(text=system)
            m = j.messages.add(role=pb.Message.USER)
            for im in images:
                m.parts.add(image=pb.Image(data=im))
            m.parts.add(text=text)
            j.text.max_new_tokens = max_new
            if bias:
                j.text.logit_bias[bov] = 4.0
            j.image.width = j.image.height = side
            j.image.steps = steps
            j.image.max_images = max_images
            return j.SerializeToString()

        def wait(jid, timeout=3600):
            deadline = time.time() + timeout
            while time.time() < deadline:
                h = r.hget(f"{prefix}:result:{jid}", "pb")
                if h:
                    return pb.Result.FromString(h)
                time.sleep(0.05)
            raise RuntimeError(f"no result for {jid}")

        # warm-up: the first job pays for page faults of the mapped weights
        r.xadd(f"{prefix}:jobs", {"id": "warm", "job": job("warm", "hello", "You are a cook.")})
        wait("warm")
        t0 = time.time()
        for i in range(n_jobs):   # different questions: the vision and latent caches hit, the text differs
            r.xadd(f"{prefix}:jobs", {"id": f"j{i}", "job": job(f"j{i}", f"Question {i}: how do I make this soup?",
                                                                "You are a cook.")})
        results = [wait(f"j{i}") for i in range(n_jobs)]
        wall = time.time() - t0
        bad = [x for x in results if x.status != pb.Result.DONE]
        if bad:
            raise RuntimeError(f"{len(bad)} jobs failed: {bad[0].error.message}")
        phases = {k: statistics.mean(getattr(x.timings, k + "_ms") for x in results)
                  for k in ("queue", "prefill", "decode", "vision", "diffusion", "vae", "total")}
        # a long shared system prompt: cold once, then three times from the prefix cache
        # (the median of those: the first warm run also pays for fresh KV pages)
        runs = []
        for k in range(4):
            jid = f"prefix{k}"
            r.xadd(f"{prefix}:jobs", {"id": jid, "job": job(jid, "Hi.", LONG_SYSTEM, images=(), max_images=0,
                                                            max_new=1, bias=False)})
            runs.append(wait(jid))
        cold = runs[0]
        wait_prefill = sorted(runs[1:], key=lambda x: x.timings.prefill_ms)[1]
        out = {
            "mkmodel_s": mk_s,
            "jobs": n_jobs,
            "image": f"{side}x{side}",
            "steps": steps,
            "max_new_tokens": tokens,
            "jobs_per_hour": n_jobs / wall * 3600,
            "mean_ms": phases,
            "mean_generated_tokens": statistics.mean(x.usage.generated_tokens for x in results),
            "mean_images": statistics.mean(x.usage.images for x in results),
            "prefix_tokens": cold.usage.prompt_tokens,
            "prefill_ms_cold": cold.timings.prefill_ms,
            "prefill_ms_cached": wait_prefill.timings.prefill_ms,
            "cached_prompt_tokens": wait_prefill.usage.cached_prompt_tokens,
            "prefix_cache_speedup": cold.timings.prefill_ms / max(wait_prefill.timings.prefill_ms, 1e-3),
        }
        print(f"{preset}: {out['jobs_per_hour']:.0f} jobs/hour ({n_jobs} jobs of {side}x{side}, {steps} steps, "
              f"{out['mean_images']:.1f} images, {out['mean_generated_tokens']:.0f} tokens)")
        print("  mean ms per job: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
        print(f"  prefill of a {out['prefix_tokens']}-token prompt: {out['prefill_ms_cold']:.1f} ms cold, "
              f"{out['prefill_ms_cached']:.1f} ms with {out['cached_prompt_tokens']} tokens from the prefix cache "
              f"({out['prefix_cache_speedup']:.1f}x)")
        return out
    finally:
        w.terminate()
        w.wait(60)
        log.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--json")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="duogen-e2e-")
    port = free_port()
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", tmp],
                           stdout=subprocess.DEVNULL)
    try:
        r = redis.Redis(port=port, socket_timeout=60)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        report = {"threads": os.cpu_count(), "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "unset")}
        for p in a.presets.split(","):
            report[p] = run_preset(p, a.jobs if p == "tiny" else max(1, a.jobs // 2), tmp, r,
                                   f"redis://127.0.0.1:{port}/0")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2)
    finally:
        srv.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
