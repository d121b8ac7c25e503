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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_bytes(job_id):
    job = pb.Job(id=job_id)
    job.messages.add(role=pb.Message.USER).parts.add(text="")
    return job.SerializeToString()


def make_certs(d):
    """A CA and a certificate for localhost signed by it, in d (P-256 keys, as a TLS Redis
    would commonly be given); None where openssl is missing."""
    if not shutil.which("openssl"):
        return None

    def ssl(*args):
        subprocess.run(["openssl"] + list(args), cwd=d, check=True, capture_output=True)
    ssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
        "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=bench CA")
    ssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "redis.key",
        "-out", "redis.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "san.ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost\n")
    ssl("x509", "-req", "-in", "redis.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1",
        "-out", "redis.pem", "-extfile", "san.ext")
    return {k: os.path.join(d, f"{k}.pem") for k in ("ca", "redis")} | {"key": os.path.join(d, "redis.key")}


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
    certs = make_certs(tmp)
    tls = ["--tls-port", str(tls_port), "--tls-cert-file", certs["redis"], "--tls-key-file", certs["key"],
           "--tls-ca-cert-file", certs["ca"], "--tls-auth-clients", "no"] if certs else []
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
        if certs:
            cases.append(("duogend_tls", 1, f"rediss://localhost:{tls_port}/0", ["--tls-ca-file", certs["ca"]]))
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
        if certs:
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
        if certs:
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
