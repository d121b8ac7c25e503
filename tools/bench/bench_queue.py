#!/usr/bin/python3
"""bench-queue: jobs/s and dispatch latency of no-op jobs through one duogend (over the
test engine, which answers a one-word prompt in one step), beside the plainest hiredis
consumer (tools/queue-baseline: XREADGROUP, then XADD done + XACK) on the same Redis.

  throughput  N jobs enqueued in one pipeline; time from the first XADD to the last
              entry on the done stream
  latency     one job at a time; time from XADD to its done entry (XREAD BLOCK on the
              done stream), p50 and p99
  overhead    duogend's p50 latency minus the baseline's: the worker's own cost per job
  tls         the same duogend reaching Redis over TLS (rediss://, daemon/tls.c: the
              session relayed to hiredis through a socketpair), certificates made here with
              openssl; the producer's side stays plain: what TLS costs the worker per job

Writes JSON with --json FILE. Needs redis-server and Debian's python3-redis/protobuf."""
import argparse
import json
import os
import platform
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
import certs  # noqa: E402  (tools/bench/certs.py, beside this file)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_bytes(job_id):
    job = pb.Job(id=job_id)
    job.messages.add(role=pb.Message.USER).parts.add(text="")
    return job.SerializeToString()


def run_case(r, prefix, n_tput, n_lat):
    jobs, done = f"{prefix}:jobs", f"{prefix}:done"
    # warm-up
    for i in range(20):
        r.xadd(jobs, {"id": f"warm-{i}", "job": job_bytes(f"warm-{i}")})
    deadline = time.monotonic() + 30
    while r.xlen(done) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    start_len = r.xlen(done)

    payloads = [(f"t-{i}", job_bytes(f"t-{i}")) for i in range(n_tput)]
    pipe = r.pipeline(transaction=False)
    for jid, b in payloads:
        pipe.xadd(jobs, {"id": jid, "job": b})
    t0 = time.perf_counter()
    pipe.execute()
    while r.xlen(done) < start_len + n_tput:
        time.sleep(0.002)
    tput = n_tput / (time.perf_counter() - t0)

    lats = []
    last = r.xinfo_stream(done)["last-generated-id"]
    for i in range(n_lat):
        jid = f"l-{i}"
        b = job_bytes(jid)
        t0 = time.perf_counter()
        r.xadd(jobs, {"id": jid, "job": b})
        while True:
            rep = r.xread({done: last}, count=1, block=5000)
            if not rep:
                raise RuntimeError("no done entry within 5 s")
            last = rep[0][1][-1][0]
            if rep[0][1][-1][1][b"id"] == jid.encode():
                break
        lats.append((time.perf_counter() - t0) * 1e3)
    lats.sort()
    return {
        "jobs_per_s": tput,
        "latency_p50_ms": statistics.median(lats),
        "latency_p99_ms": lats[min(len(lats) - 1, int(len(lats) * 0.99))],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--jobs", type=int, default=3000)
    ap.add_argument("--latency-jobs", type=int, default=500)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="duogen-bench-")
    port, tls_port = free_port(), free_port()
    tls, ca = certs.redis_tls_args(tmp, tls_port) if certs.have_openssl() else ([], None)
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                            "--appendonly", "no", "--dir", tmp] + tls, stdout=subprocess.DEVNULL)
    procs = []
    try:
        r = redis.Redis(port=port, socket_timeout=30)
        for _ in range(100):
            try:
                r.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        os.makedirs(os.path.join(tmp, "model"))
        results = {}
        cases = [("duogend", 1, f"redis://127.0.0.1:{port}/0", []),
                 ("duogend_inflight4", 4, f"redis://127.0.0.1:{port}/0", [])]
        if ca:
            cases.append(("duogend_tls", 1, f"rediss://localhost:{tls_port}/0", ["--tls-ca-file", ca]))
        else:
            results["duogend_tls_missing"] = "openssl is not installed: no certificates for a TLS Redis"
        for name, inflight, url, extra in cases:
            w = subprocess.Popen([os.path.join(BUILD, "tests", "duogend-fake"), "--redis", url,
                                  "--model", os.path.join(tmp, "model"), "--prefix", name, "--worker-id", "bench",
                                  "--log-level", "warning", "--max-inflight", str(inflight)] + extra,
                                 stderr=subprocess.DEVNULL)
            procs.append(w)
            results[name] = run_case(r, name, a.jobs, a.latency_jobs)
            w.terminate()
            w.wait(30)
        base = subprocess.Popen([os.path.join(BUILD, "queue-baseline"), "127.0.0.1", str(port), "pl:jobs",
                                 "g", "c", "pl:done"])
        procs.append(base)
        results["plain_hiredis"] = run_case(r, "pl", a.jobs, a.latency_jobs)
        base.terminate()
        base.wait(30)
        d, p = results["duogend"], results["plain_hiredis"]
        results["throughput_ratio"] = d["jobs_per_s"] / p["jobs_per_s"]
        results["throughput_ratio_inflight4"] = results["duogend_inflight4"]["jobs_per_s"] / p["jobs_per_s"]
        results["overhead_per_job_ms_p50"] = d["latency_p50_ms"] - p["latency_p50_ms"]
        results["overhead_per_job_ms_throughput"] = 1e3 / d["jobs_per_s"] - 1e3 / p["jobs_per_s"]
        if ca:
            t = results["duogend_tls"]
            results["tls_throughput_ratio"] = t["jobs_per_s"] / d["jobs_per_s"]
            results["tls_overhead_per_job_ms_p50"] = t["latency_p50_ms"] - d["latency_p50_ms"]
            results["tls_overhead_per_job_ms_throughput"] = 1e3 / t["jobs_per_s"] - 1e3 / d["jobs_per_s"]
            results["tls"] = subprocess.run(["openssl", "version"], capture_output=True, text=True).stdout.strip() + \
                ", P-256 certificate, the worker's side only"
        results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                              "redis": subprocess.run(["redis-server", "--version"], capture_output=True,
                                                      text=True).stdout.strip()}
        for name in ("duogend", "duogend_inflight4", "duogend_tls", "plain_hiredis"):
            if name not in results:
                continue
            x = results[name]
            print(f"{name:18s} {x['jobs_per_s']:9.0f} jobs/s   p50 {x['latency_p50_ms']:.3f} ms   "
                  f"p99 {x['latency_p99_ms']:.3f} ms")
        print(f"throughput ratio duogend/plain: {results['throughput_ratio']:.2f} (max_inflight 1), "
              f"{results['throughput_ratio_inflight4']:.2f} (max_inflight 4)")
        print(f"worker overhead per job: {results['overhead_per_job_ms_p50']:.3f} ms (latency p50), "
              f"{results['overhead_per_job_ms_throughput']:.3f} ms (throughput)")
        if ca:
            print(f"TLS (rediss://, {results['tls']}): throughput {results['tls_throughput_ratio']:.2f}x of "
                  f"plain TCP, {results['tls_overhead_per_job_ms_p50']:.3f} ms more per job (latency p50), "
                  f"{results['tls_overhead_per_job_ms_throughput']:.3f} ms (throughput)")
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        srv.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
