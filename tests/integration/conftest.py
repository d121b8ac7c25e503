"""Fixtures for the integration tests: a real redis-server on a free loopback port, real
duogend processes (over the deterministic test engine), and a Python producer that speaks
the protobuf protocol of proto/duogen.proto."""
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

import pytest
import redis

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
# DG_BUILD: another build of the same tree (a sanitized one: `make sanitize`)
BUILD = os.path.abspath(os.environ.get("DG_BUILD") or os.path.join(ROOT, "build"))
SANITIZER = os.environ.get("DG_SANITIZER")   # asan or tsan: BUILD is instrumented (tools/sanitize.sh)
sys.path.insert(0, os.path.join(BUILD, "gen", "python"))
import duogen_pb2 as pb  # noqa: E402  (generated at build time from proto/duogen.proto)

WORKER_BIN = os.path.join(BUILD, "tests", "duogend-fake")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ipv6_missing():
    """Why an IPv6 test cannot run here, or None: the loopback ::1 must take a socket."""
    if not socket.has_ipv6:
        return "this Python has no IPv6"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError as e:
        return f"no IPv6 loopback here (::1: {e})"
    return None


def wait_until(pred, timeout=10.0, every=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RedisServer:
    """A redis-server of our own; restartable on the same port and data directory."""

    def __init__(self, tmp, appendonly=False, extra=()):
        self.port = free_port()
        self.dir = tmp
        self.appendonly = appendonly
        self.extra = list(extra)
        self.proc = None
        self.start()

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self.appendonly else "no",
                "--appendfsync", "always" if self.appendonly else "everysec",
                "--logfile", os.path.join(self.dir, "redis.log")] + self.extra
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._ping, 10, what="redis-server to start")

    def _ping(self):
        try:
            return redis.Redis(port=self.port, socket_timeout=0.5).ping()
        except redis.exceptions.RedisError:
            return False

    def stop(self, hard=False):
        if self.proc and self.proc.poll() is None:
            if hard:
                self.proc.kill()
            else:
                self.proc.terminate()
            self.proc.wait(10)

    def client(self, **kw):
        return redis.Redis(port=self.port, socket_timeout=30, **kw)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


class Worker:
    """One duogend process with its own log file."""

    def __init__(self, tmp, redis_url, worker_id, model_dir, env=None, args=()):
        self.id = worker_id
        self.log_path = os.path.join(tmp, f"{worker_id}.log")
        self.cmd = [WORKER_BIN, "--redis", redis_url, "--model", model_dir,
                    "--worker-id", worker_id, "--block-ms", "200", "--claim-idle-ms", "1500",
                    "--reaper-ms", "300", "--heartbeat-ms", "200", "--log-level", "debug"] + list(args)
        if SANITIZER == "tsan":   # the engine's OpenMP teams (libgomp is not instrumented): one thread
            self.cmd += ["--threads", "1"]
        self.env = dict(os.environ, **(env or {}))
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.update(env or {})
        self.proc = None
        self.start()

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def term(self, timeout=30):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")


class Cluster:
    """A Redis server, workers, and a producer's helpers."""

    def __init__(self, tmp, appendonly=False, prefix="duogen", extra=()):
        self.tmp = tmp
        self.prefix = prefix
        self.server = RedisServer(tmp, appendonly=appendonly, extra=extra)
        self.r = self.server.client()
        self.model = os.path.join(tmp, "model")
        os.makedirs(self.model, exist_ok=True)
        self.workers = []

    def worker(self, worker_id=None, env=None, args=(), redis_url=None):
        wid = worker_id or f"w{len(self.workers) + 1}"
        w = Worker(self.tmp, redis_url or self.server.url, wid, self.model, env=env,
                   args=["--prefix", self.prefix] + list(args))
        self.workers.append(w)
        return w

    def wait_groups(self):
        def ok():
            try:
                return all(self.r.xinfo_groups(self.key(s)) for s in ("jobs", "jobs:high"))
            except redis.exceptions.ResponseError:
                return False
        wait_until(ok, what="consumer groups")

    def wait_heartbeat(self, worker_id, state=None):
        def ok():
            h = self.r.hgetall(self.key("worker", worker_id))
            return h and (state is None or h.get(b"state") == state.encode())
        return wait_until(ok, what=f"heartbeat of {worker_id}")

    def key(self, *parts):
        return ":".join([self.prefix] + [str(p) for p in parts])

    def enqueue(self, job_id, text="hello world", meta=None, stream="jobs", raw=None, fields=None, **kw):
        if raw is None:
            job = make_job(job_id, text, meta=meta, **kw)
            raw = job.SerializeToString()
        entry = {"id": job_id, "job": raw} if fields is None else fields
        return self.r.xadd(self.key(stream), entry)

    def result(self, job_id):
        h = self.r.hgetall(self.key("result", job_id))
        return {k.decode(): v for k, v in h.items()}

    def wait_result(self, job_id, timeout=20):
        return wait_until(lambda: self.result(job_id) or None, timeout, what=f"result of {job_id}")

    def events(self, job_id):
        out = []
        for _id, fields in self.r.xrange(self.key("events", job_id)):
            out.append({k.decode(): v for k, v in fields.items()})
        return out

    def close(self):
        for w in self.workers:
            w.kill()
        self.server.stop(hard=True)


def png_bytes(w, h, row):
    """An 8-bit RGB PNG, w x h, whose row y holds the w*3 bytes row(y)."""
    raw = b"".join(b"\0" + bytes(row(y)) for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def varint(n):
    """n as a protobuf varint."""
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def ld(field, payload):
    """A length-delimited protobuf field on the wire: for jobs the Python library will not
    build (millions of parts, strings that are not UTF-8)."""
    return varint((field << 3) | 2) + varint(len(payload)) + payload


def make_job(job_id, text="hello world", meta=None, images=(), system=None, **kw):
    job = pb.Job(id=job_id)
    if system:
        m = job.messages.add(role=pb.Message.SYSTEM)
        m.parts.add(text=system)
    m = job.messages.add(role=pb.Message.USER)
    for im in images:
        m.parts.add(image=pb.Image(data=im))
    m.parts.add(text=text)
    for k, v in (meta or {}).items():
        job.metadata[k] = str(v)
    for k, v in kw.items():
        if k in ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty"):
            setattr(job.text, k, v)   # a field with presence is present once set, 0 included
        elif k in ("width", "height", "steps", "max_images", "guidance_scale", "shift", "schedule"):
            setattr(job.image, k, v)
        else:
            setattr(job, k, v)
    return job


@pytest.fixture
def tmpdir_path():
    d = tempfile.mkdtemp(prefix="duogen-it-")
    yield d
    if not os.environ.get("DG_KEEP_TMP"):   # DG_KEEP_TMP=1: the workers' logs and Redis's data stay
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def cluster(tmpdir_path):
    c = Cluster(tmpdir_path)
    yield c
    c.close()


@pytest.fixture
def aof_cluster(tmpdir_path):
    c = Cluster(tmpdir_path, appendonly=True)
    yield c
    c.close()


def exposition(text):
    """The samples of a scrape, by name with labels, after checking what the text format
    asks of families: each one's HELP and TYPE once, then all its samples together (a
    summary's _sum and _count are its own), label values escaped. The cache families were
    interleaved (four HELP/TYPE pairs, then their samples mixed): Prometheus took it, a
    strict parser does not."""
    values, seen, family = {}, set(), None
    label = r'[a-zA-Z_]\w*="(?:[^"\\\n]|\\[\\"n])*"'
    sample = re.compile(r'^([a-zA-Z_:][\w:]*)(\{%s(?:,%s)*\})? (\S+)$' % (label, label))
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in seen, f"family {name} twice"
            seen.add(name)
            family = name
            continue
        if line.startswith("# TYPE "):
            assert line.split(" ")[2] == family, f"TYPE of {line.split(' ')[2]} not after its HELP"
            kind = line.split(" ")[3]
            continue
        m = sample.match(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        owner = re.sub(r"_(sum|count)$", "", name) if kind == "summary" else name
        assert owner == family, f"{name} among the samples of {family}"
        values[name + (m.group(2) or "")] = float(m.group(3))
    return values


def scrape_metrics(port, timeout=5):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.read().decode()
    except OSError:
        return None
