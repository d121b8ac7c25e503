#!/usr/bin/python3
"""make soak: many jobs through a few workers while workers are killed with SIGKILL and
Redis is restarted; at the end every job is accounted for.

  soak.py [--jobs 10000] [--workers 3] [--engine fake|real] [--draft-tokens N] [--kills 12] [--seed 1]
          [--tls] [--json build/bench/soak.json] [--keep]

In a temporary directory, on loopback:
  redis-server  appendonly yes, appendfsync always (below), its own port and data dir;
                with --tls a TLS port too, which the workers use (rediss://)
  workers       build/tests/duogend-fake: the test engine (words and gradient PNGs, paced
                by fake.step_ms); --engine real: build/duogend on a `tiny` package (1000 jobs
                by default, only their status, finish and image count checked: the words of
                random weights are noise)
  producer      enqueues a planned mix of jobs whose outcomes are known in advance (text,
                a max_new_tokens cut, drawn images, input images, the high stream, bad jobs
                that must be dead-lettered, poison jobs that crash their worker, retryable
                failures, expired and cancelled jobs), keeping at most --backlog unfinished
  collector     follows duogen:done and checks each job as it ends, before its keys expire:
                result hash and protobuf, job hash, event stream, image keys
  supervisor    restarts a worker that failed, as systemd/duogend@.service would
                (Restart=on-failure, RestartPreventExitStatus=78; after 0.5 s, not 10), with
                the same worker id, so that the new process takes its own pending entries
                back; kills a random worker with SIGKILL --kills times, spread over the run,
                restarting it after 0.2 to 8 s (past claim_idle_ms, 5 s, another worker
                takes its jobs over first); restarts Redis twice, keeping its data dir: at a
                third of the jobs with SIGTERM (a SHUTDOWN), at two thirds with SIGKILL
  sampler       every 2 s: each worker's VmRSS (/proc), Redis used_memory and key count

Redis runs with appendfsync always: it writes and fsyncs the AOF before it sends the
replies of an event-loop turn, so every write a client saw acknowledged survives the
SIGKILL restart (and would survive a power cut). A command in flight when Redis dies may
or may not have been applied; the daemon must cope with both, and that is what the
SIGKILL restart tests. The SIGTERM restart is a SHUTDOWN, which writes and fsyncs the AOF
under any policy. With the deployment's everysec (deploy/redis/redis.conf, --appendfsync
everysec here) the AOF is still written before the reply, so SIGKILL of the process loses
nothing the page cache holds, except when a slow background fsync makes Redis postpone
that write (up to 2 s): those acknowledged writes would be lost, and this soak would count
lost or doubled jobs that are not the daemon's doing.

Results expire after --result-ttl-s, and every stream is trimmed or capped, so that Redis
memory levels off once the first results expire; the collector checks each job as it ends.

"Doubled" is a job that ended twice visibly: two done entries, two final events, two dead
letters. A job taken over from a live worker (its lease lost while Redis was away longer
than claim_idle_ms allows) runs twice but ends once; the second run's progress events may
follow the first's final event: counted apart ("late"), with the runs per job from the
started events. --wrap runs the workers under a tool (valgrind) for a leak check.

Prints a table; writes JSON with --json. Needs redis-server and Debian's python3-redis and
python3-protobuf; `make` first."""
import argparse
import collections
import heapq
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

import redis

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.path.join(ROOT, "build")
sys.path.insert(0, os.path.join(BUILD, "gen", "python"))
import duogen_pb2 as pb  # noqa: E402  (generated at build time from proto/duogen.proto)
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
import certs  # noqa: E402  (tools/bench/certs.py: --tls)

PREFIX = "duogen"
VOCAB = os.path.join(ROOT, "tools", "mkmodel", "vocab", "qwen2")
BOV = 151665   # <BOV> in mkmodel's packages (tests/integration/test_real_engine.py)
WORDS = ("salt pepper onion garlic butter flour sugar egg milk cream lemon basil thyme rice "
         "bean leek carrot celery tomato potato stock wine vinegar honey").split()
FINAL_EVENTS = (b"done", b"failed", b"cancelled")


def key(*parts):
    return ":".join([PREFIX] + [str(p) for p in parts])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(w, h, seed):
    raw = b"".join(b"\0" + bytes(((x * 7 + y * 3 + seed) % 256) for x in range(w) for _ in range(3))
                   for y in range(h))

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


# ---- the plan: every job and what must become of it ---------------------------------------------

class Spec:
    """One planned job: what is enqueued, and the outcome the collector checks."""

    def __init__(self, jid, kind, stream="jobs"):
        self.id, self.kind, self.stream = jid, kind, stream
        self.raw = b""
        self.status = "done"      # result status
        self.code = ""            # error_code of a failed job
        self.error = ""           # a phrase of its error
        self.dead = False         # must be in duogen:dead
        self.text = None          # the exact result text (fake engine), or None
        self.whole_text = None    # the answer uncut, of which the result text is a prefix (cancelled)
        self.finish = None        # finish_reason, or None: not checked
        self.images = 0           # images drawn; -1: at most max_images (real engine)
        self.max_images = 0
        self.size = (0, 0)        # each drawn image's width and height
        self.cancel = None        # "before": cancel key set before enqueueing; "running": after


def expected_markdown(jid, words, n_images, limit=None):
    """The fake engine's answer: "Echo:" and the prompt's words, one per step, an image
    after each of the first n_images words (daemon/run.c writes the links)."""
    out = ""
    for i, w in enumerate((["Echo:"] + words)[:limit]):
        out += (" " if i else "") + w
        if i < n_images:
            out += f"\n\n![image {i + 1}]({key('image', jid, i + 1)})\n\n"
    return out


def new_job(spec, text, images=(), seed=0):
    job = pb.Job(id=spec.id, seed=seed)
    m = job.messages.add(role=pb.Message.USER)
    for im in images:
        m.parts.add(image=pb.Image(data=im))
    m.parts.add(text=text)
    return job


def fake_spec(jid, kind, rng, step_ms, inputs):
    """A job for the test engine, steered by its metadata (tests/engine_fake/engine_fake.c)."""
    s = Spec(jid, kind, "jobs:high" if kind == "high" else "jobs")
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 24))]
    meta = {"fake.step_ms": rng.randint(0, 2 * step_ms)}
    job = None
    n_img = 0
    if kind in ("text", "high"):
        pass
    elif kind == "length":
        s.finish = "length"
        limit = rng.randint(1, len(words))
        job = new_job(s, " ".join(words))
        job.text.max_new_tokens = limit
        s.text = expected_markdown(jid, words, 0, limit)
    elif kind == "images":
        n_img = rng.randint(1, 3)
        s.size = (16 * rng.randint(2, 6), 16 * rng.randint(2, 6))
        job = new_job(s, " ".join(words), seed=rng.randint(1, 1 << 30))
        job.image.width, job.image.height = s.size
        job.image.steps = rng.randint(2, 6)
        meta["fake.images"] = n_img
    elif kind == "input_images":
        job = new_job(s, " ".join(words), images=rng.sample(inputs, rng.randint(1, 2)))
    elif kind == "bad_protobuf":
        s.raw = b"\xff\xfe soak: not a protobuf " + jid.encode()
        s.status, s.code, s.error, s.dead = "failed", "BAD_REQUEST", "not a duogen.v1.Job protobuf", True
        return s
    elif kind == "bad_image":
        job = new_job(s, "look", images=[b"GIF89a soak: no PNG"])
        s.status, s.code, s.error, s.dead = "failed", "BAD_IMAGE", "not a PNG or JPEG", True
    elif kind == "engine_error":
        meta.update({"fake.fail": "error", "fake.fail_step": 2})
        s.status, s.code, s.error, s.dead = "failed", "BAD_REQUEST", "failing as the job asked", True
    elif kind == "retry":
        meta["fake.fail"] = "retry"
        s.status, s.code, s.error, s.dead = "failed", "EXHAUSTED", "asked to fail this attempt as retryable", True
    elif kind == "poison":
        meta["fake.fail"] = "crash"
        s.status, s.code, s.error, s.dead = "failed", "EXHAUSTED", "ended without a result", True
    elif kind == "expired":
        s.status, s.finish, s.text = "expired", "deadline", ""
    elif kind == "cancel_before":
        s.status, s.finish, s.text, s.cancel = "cancelled", "cancelled", "", "before"
    elif kind == "cancel_running":
        # 400 steps of 20 ms: it cannot end before the cancel key, set 0.2 to 1 s after it is
        # enqueued and once it has started, is seen, even across a Redis outage (the worker
        # steps on while Redis is away)
        words = [rng.choice(WORDS) for _ in range(400)]
        meta["fake.step_ms"] = 20
        s.status, s.finish, s.cancel = "cancelled", "cancelled", "running"
        s.whole_text = expected_markdown(jid, words, 0)
    if job is None:
        job = new_job(s, " ".join(words))
    if kind in ("retry", "poison"):
        job.max_attempts = 2
    if kind == "expired":
        job.deadline_unix_ms = int(time.time() * 1000) - 1000
    for k, v in meta.items():
        job.metadata[k] = str(v)
    if s.status == "done":
        s.finish = s.finish or "stop"
        s.images = n_img
        if s.text is None:
            s.text = expected_markdown(jid, words, n_img)
    s.raw = job.SerializeToString()
    return s


def real_spec(jid, kind, rng, inputs):
    """A job for the real engine on the tiny package: its words are noise, so only the
    status, the finish reason's kind and the number of images are checked."""
    s = Spec(jid, kind, "jobs:high" if kind == "high" else "jobs")
    if kind == "bad_protobuf":
        return fake_spec(jid, kind, rng, 0, inputs)
    images = rng.sample(inputs, 1) if kind in ("input_images", "bad_image") else ()
    if kind == "bad_image":
        images = [b"GIF89a soak: no PNG"]
    job = new_job(s, "What goes into a good " + rng.choice(WORDS) + " soup?", images, seed=rng.randint(1, 1 << 30))
    job.text.max_new_tokens = rng.randint(4, 12)
    job.image.max_images = 0
    if kind == "images":
        job.text.logit_bias[BOV] = 6.0
        job.image.max_images, job.image.width, job.image.height, job.image.steps = 1, 32, 32, 2
        s.images, s.max_images = -1, 1
    if kind == "bad_image":
        s.status, s.code, s.error, s.dead = "failed", "BAD_IMAGE", "image 1", True
    elif kind == "expired":
        job.deadline_unix_ms = int(time.time() * 1000) - 1000
        s.status, s.finish, s.text = "expired", "deadline", ""
    elif kind == "cancel_before":
        s.status, s.finish, s.text, s.cancel = "cancelled", "cancelled", "", "before"
    s.raw = job.SerializeToString()
    return s


def plan_jobs(n, engine, rng, step_ms, poison):
    """The job mix, shuffled: a few of each rare kind, the rest by share."""
    few = lambda per: max(1, n // per)   # noqa: E731
    if engine == "fake":
        counts = {"bad_protobuf": few(500), "bad_image": few(500), "engine_error": few(500),
                  "retry": few(2000), "poison": poison, "expired": few(500),
                  "cancel_before": few(200), "cancel_running": few(200), "high": few(20),
                  "images": n * 15 // 100, "input_images": n // 10, "length": n * 8 // 100}
    else:
        counts = {"bad_protobuf": few(50), "bad_image": few(50), "expired": few(50),
                  "cancel_before": few(40), "high": few(10), "images": n // 4, "input_images": n // 5}
    counts["text"] = n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(kinds)
    inputs = [png(rng.randint(16, 64), rng.randint(16, 64), i) for i in range(8)]
    specs = []
    for i, kind in enumerate(kinds):
        jid = f"soak-{i:05d}-{kind}"
        specs.append(fake_spec(jid, kind, rng, step_ms, inputs) if engine == "fake"
                     else real_spec(jid, kind, rng, inputs))
    return specs


# ---- the processes --------------------------------------------------------------------------------

def retry(fn, stop=None):
    """fn() again until Redis answers (it is away during a restart)."""
    while True:
        try:
            return fn()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError):
            if stop is not None and stop.is_set():
                raise
            time.sleep(0.05)


class RedisServer:
    """redis-server with AOF on its own port and data dir, restartable; with tls, a TLS port
    too, which the workers use (the producer and collector stay on the plain one)."""

    def __init__(self, tmp, fsync, tls=False):
        self.port, self.dir, self.fsync = free_port(), os.path.join(tmp, "redis"), fsync
        os.makedirs(self.dir)
        self.tls_port = free_port() if tls else None
        self.tls, self.ca = certs.redis_tls_args(self.dir, self.tls_port) if tls else ([], None)
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--save", "",
             "--appendonly", "yes", "--appendfsync", self.fsync, "--daemonize", "no",
             "--logfile", os.path.join(self.dir, "redis.log")] + self.tls,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        c = self.client()
        retry(c.ping)

    def stop(self, how):
        self.proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
        self.proc.wait(60)

    def client(self):
        return redis.Redis(port=self.port, socket_timeout=10, socket_connect_timeout=2)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def worker_args(self):
        """The workers' way to Redis: over TLS where it has a TLS port."""
        if self.tls_port:
            return ["--redis", f"rediss://localhost:{self.tls_port}/0", "--tls-ca-file", self.ca]
        return ["--redis", self.url]


def no_core():
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))   # a poison job's abort() leaves no core file


class WorkerSlot:
    """One worker, as one systemd unit instance: the same id across restarts."""

    def __init__(self, i, cmd, log_path):
        self.id = f"soak-w{i}"
        self.cmd = cmd + ["--worker-id", self.id]
        self.log_path = log_path
        self.proc = None
        self.restart_at = None    # monotonic time of the supervisor's restart, once dead
        self.start()

    def start(self):
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=no_core)
        self.restart_at = None

    def alive(self):
        return self.proc.poll() is None

    def pid(self):
        return self.proc.pid if self.alive() else None


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- the run --------------------------------------------------------------------------------------

class Soak:
    def __init__(self, a, tmp):
        self.a, self.tmp = a, tmp
        self.rng = random.Random(a.seed)
        self.specs = plan_jobs(a.jobs, a.engine, self.rng, a.step_ms, a.poison)
        self.by_id = {s.id: s for s in self.specs}
        self.lock = threading.Lock()
        self.seen = {}                         # job id -> what the collector found
        self.done_entries = collections.Counter()
        self.stop = threading.Event()          # the end: threads leave their loops
        self.faults = []                       # what the supervisor did, in order
        self.samples = []                      # the sampler's rows
        self.enqueued = 0
        self.enqueue_resent = 0                # XADDs sent again after a broken connection
        self.t0 = time.monotonic()

    def now(self):
        return round(time.monotonic() - self.t0, 1)

    def n_seen(self):
        with self.lock:
            return len(self.seen)

    # ---- set-up ----

    def start(self):
        a = self.a
        self.redis = RedisServer(self.tmp, a.appendfsync, a.tls)
        model = os.path.join(self.tmp, "model")
        if a.engine == "real":
            subprocess.run([os.path.join(BUILD, "mkmodel"), "--preset", "tiny", "--seed", "5", "--out", model,
                            "--vocab", VOCAB], check=True, capture_output=True, timeout=600)
            binary = [os.path.join(BUILD, "duogend"), "--threads", "1", "--draft-tokens", str(a.draft_tokens)]
        else:
            os.makedirs(model)
            binary = [os.path.join(BUILD, "tests", "duogend-fake")]
        cmd = shlex.split(a.wrap) + binary + self.redis.worker_args() + ["--model", model, "--prefix", PREFIX,
                        "--max-inflight", str(a.inflight), "--block-ms", "1000",
                        "--claim-idle-ms", str(a.claim_idle_ms), "--reaper-ms", "1000", "--heartbeat-ms", "1000",
                        "--trim-ms", "5000", "--jobs-retain-s", str(a.result_ttl_s // 3),
                        "--result-ttl-s", str(a.result_ttl_s), "--done-maxlen", "5000",
                        "--max-attempts", str(a.max_attempts), "--drain-ms", "5000", "--log-level", "info"]
        self.workers = [WorkerSlot(i + 1, cmd, os.path.join(self.tmp, f"w{i + 1}.log")) for i in range(a.workers)]
        r = self.redis.client()
        deadline = time.monotonic() + (600 if a.engine == "real" else 30)
        while not all(r.exists(key("worker", w.id)) for w in self.workers):
            if time.monotonic() > deadline:
                raise SystemExit("soak: the workers did not start; see " + self.tmp)
            time.sleep(0.1)
        self.sample("idle")

    # ---- producer ----

    def produce(self):
        r = self.redis.client()
        last_ms, seq = 0, 0
        cancels = []   # (due, job id): cancel keys of jobs cancelled while running
        for spec in self.specs:
            while self.enqueued - self.n_seen() >= self.a.backlog and not self.stop.is_set():
                self.cancel_due(r, cancels)
                time.sleep(0.005)
            if self.stop.is_set():
                return
            self.cancel_due(r, cancels)
            if spec.cancel == "before":
                retry(lambda: r.set(key("cancel", spec.id), 1, ex=3600), self.stop)
            # the producer names the entry, so that an XADD sent again after a broken
            # connection is refused when the first one landed: no job is enqueued twice
            last_ms = max(last_ms, int(time.time() * 1000))
            seq += 1
            entry = f"{last_ms}-{seq}"
            self.xadd(r, key(spec.stream), entry, {"id": spec.id, "job": spec.raw})
            self.enqueued += 1
            if spec.cancel == "running":
                heapq.heappush(cancels, (time.monotonic() + self.rng.uniform(0.2, 1.0), spec.id))   # after its start
        while cancels and not self.stop.is_set():
            self.cancel_due(r, cancels)
            time.sleep(0.01)

    def xadd(self, r, stream, entry, fields):
        first = True
        while True:
            try:
                return r.xadd(stream, fields, id=entry)
            except redis.exceptions.ResponseError as e:
                if not first and "equal or smaller" in str(e):
                    return entry   # the earlier send landed
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                first = False
                self.enqueue_resent += 1
                time.sleep(0.05)

    def cancel_due(self, r, cancels):
        """Sets the cancel keys that are due, of jobs a worker has started (their event
        stream exists); a job still queued is looked at again 0.1 s later, so that the
        cancel lands while it runs (with a backlog, jobs wait seconds in the queue)."""
        later = []
        while cancels and cancels[0][0] <= time.monotonic():
            _, jid = heapq.heappop(cancels)
            if retry(lambda: r.exists(key("events", jid)), self.stop):
                retry(lambda: r.set(key("cancel", jid), 1, ex=3600), self.stop)
            else:
                later.append((time.monotonic() + 0.1, jid))
        for item in later:
            heapq.heappush(cancels, item)

    # ---- collector ----

    def collect(self):
        r = self.redis.client()
        last = "0-0"
        while not self.stop.is_set():
            try:
                rep = r.xread({key("done"): last}, count=200, block=500)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                    redis.exceptions.BusyLoadingError):
                time.sleep(0.05)
                continue
            if not rep:
                continue
            entries = rep[0][1]
            last = entries[-1][0]
            ids = [f[b"id"].decode() for _, f in entries]
            fresh = []
            with self.lock:
                for jid in ids:
                    self.done_entries[jid] += 1
                    if self.done_entries[jid] == 1:
                        fresh.append(jid)
            found = retry(lambda: self.fetch(r, fresh), self.stop)
            with self.lock:
                self.seen.update(found)

    def fetch(self, r, ids):
        """What Redis holds about each ended job, and what is wrong with it."""
        def image_keys(spec):   # the first 24 bytes of each PNG it may have drawn: up to IHDR's size
            return max(spec.images, spec.max_images) if spec else 0
        p = r.pipeline(transaction=False)
        for jid in ids:
            p.hgetall(key("result", jid))
            p.hgetall(key("job", jid))
            p.xrange(key("events", jid))
            for i in range(image_keys(self.by_id.get(jid))):
                p.getrange(key("image", jid, i + 1), 0, 23)
        replies = iter(p.execute())
        out = {}
        for jid in ids:
            spec = self.by_id.get(jid)
            res, jobh, events = next(replies), next(replies), next(replies)
            imgs = [next(replies) for _ in range(image_keys(spec))]
            out[jid] = check_job(spec, jid, res, jobh, events, imgs)
        return out

    # ---- supervisor ----

    def supervise(self):
        n = self.a.jobs
        plan = [(f, "kill") for f in sorted(self.rng.uniform(0.05, 0.95) for _ in range(self.a.kills))]
        plan += [(1 / 3, "redis-term"), (2 / 3, "redis-kill")]
        plan.sort()
        while not self.stop.is_set():
            while plan and self.n_seen() >= plan[0][0] * n:
                self.fault(plan.pop(0)[1])
            for w in self.workers:
                self.restart_if_due(w)
            time.sleep(0.05)

    def fault(self, what):
        if what == "kill":
            live = [w for w in self.workers if w.alive()]
            if not live:
                return
            w = self.rng.choice(live)
            h = retry(lambda: self.redis.client().hget(key("worker", w.id), "job"), self.stop)
            pid = w.proc.pid
            w.proc.kill()
            w.proc.wait()
            delay = self.rng.uniform(0.2, 8.0)
            w.restart_at = time.monotonic() + delay
            self.faults.append({"t": self.now(), "jobs_ended": self.n_seen(), "fault": "worker SIGKILL",
                                "worker": w.id, "pid": pid, "running": (h or b"").decode().split(),
                                "restart_after_s": round(delay, 1)})
            return
        how = "kill" if what == "redis-kill" else "term"
        before = retry(lambda: self.redis.client().info("memory")["used_memory"], self.stop)
        t = time.monotonic()
        self.redis.stop(how)
        down = self.rng.uniform(2.0, 4.0)
        time.sleep(down)
        self.redis.start()
        after = retry(lambda: self.redis.client().info("memory")["used_memory"], self.stop)
        self.faults.append({"t": self.now(), "jobs_ended": self.n_seen(),
                            "fault": "Redis " + ("SIGKILL" if how == "kill" else "SIGTERM (SHUTDOWN)"),
                            "down_s": round(time.monotonic() - t, 1), "used_memory_before": before,
                            "used_memory_after": after})

    def restart_if_due(self, w):
        """As systemd/duogend@.service would (Restart=on-failure, RestartPreventExitStatus=78),
        but after 0.5 s, not RestartSec's 10 s."""
        if w.alive() or w.restart_at == float("inf"):
            return
        if w.restart_at is None:   # it ended by itself: a poison job's abort(), or an exit status
            code = w.proc.returncode
            self.faults.append({"t": self.now(), "jobs_ended": self.n_seen(), "fault": "worker exited",
                                "worker": w.id, "pid": w.proc.pid, "status": code})
            w.restart_at = float("inf") if code in (0, 78) else time.monotonic() + 0.5
        if time.monotonic() >= w.restart_at:
            w.start()

    # ---- sampler ----

    def sample(self, label=None):
        r = self.redis.client()
        try:
            mem = r.info("memory")
            row = {"t": self.now(), "jobs_ended": self.n_seen(), "label": label,
                   "redis_used_memory": mem["used_memory"], "redis_rss": mem["used_memory_rss"],
                   "redis_keys": r.dbsize(), "workers": {}}
            for w in self.workers:
                pid = w.pid()
                if not pid:
                    continue
                h = r.hmget(key("worker", w.id), "pid", "jobs_done", "jobs_failed", "jobs_cancelled", "jobs_expired")
                ended = sum(int(x or 0) for x in h[1:]) if h[0] and int(h[0]) == pid else None
                row["workers"][w.id] = {"pid": pid, "rss_kb": rss_kb(pid), "jobs": ended}
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError):
            return
        self.samples.append(row)

    def sampler(self):
        while not self.stop.wait(2.0):
            self.sample()

    # ---- the whole ----

    def run(self):
        self.start()
        threads = [threading.Thread(target=f, daemon=True) for f in (self.collect, self.supervise, self.sampler)]
        for t in threads:
            t.start()
        self.t_first = time.monotonic()
        producer = threading.Thread(target=self.produce, daemon=True)
        producer.start()
        last_n, last_change = -1, time.monotonic()
        while self.n_seen() < len(self.specs):
            n = self.n_seen()
            if n != last_n:
                last_n, last_change = n, time.monotonic()
                if self.a.progress and n % 1000 < 20:
                    print(f"  {self.now():7.1f} s  {n} jobs ended", flush=True)
            if time.monotonic() - last_change > self.a.stall_s:
                print(f"soak: no job ended for {self.a.stall_s} s; stopping", flush=True)
                break
            time.sleep(0.2)
        self.t_last = time.monotonic()
        # late doubles: a job run again after its result would show on the done stream
        time.sleep(max(3.0, 2 * self.a.claim_idle_ms / 1000))
        self.sample("end")
        self.stop.set()
        for t in threads + [producer]:
            t.join(30)
        return self.finish()

    def finish(self):
        r = self.redis.client()
        dead = [(e, {k.decode(): v for k, v in f.items()}) for e, f in r.xrange(key("dead"))]
        pending = {s: r.xpending(key(s), PREFIX)["pending"] for s in ("jobs", "jobs:high")}
        done_info = r.xinfo_stream(key("done"))
        streams = {key(s) for s in ("jobs", "jobs:high", "done", "dead")}   # trimmed or capped instead
        no_ttl = [k.decode() for k in r.scan_iter(count=1000) if r.ttl(k) == -1 and k.decode() not in streams]
        stops = []
        for w in self.workers:
            if w.alive():
                w.proc.terminate()
                stops.append((w.id, w.proc.wait(30)))
        self.redis.stop("term")
        return report_of(self, dead, pending, done_info, no_ttl, stops)


# ---- checks ---------------------------------------------------------------------------------------

def check_job(spec, jid, res, jobh, events, imgs):
    """What the collector keeps of one ended job: its status, deliveries, runs, and problems."""
    res = {k.decode(): v for k, v in res.items()}
    jobh = {k.decode(): v for k, v in jobh.items()}
    out = {"problems": [], "runs": 0, "attempt": None, "queue_ms": None, "status": None, "images": 0}
    bad = out["problems"].append
    if spec is None:
        bad("not a planned job id")
        return out
    if not res:
        bad("done entry but no result hash")
        return out
    status = res.get("status", b"").decode()
    out["status"] = status
    out["attempt"] = int(res.get("attempt", b"0") or 0)
    result = pb.Result.FromString(res["pb"]) if res.get("pb") else None
    if result is None:
        bad("result hash without pb")
    else:
        out["queue_ms"] = result.timings.queue_ms
        if result.attempt != out["attempt"] or result.worker_id.encode() != res.get("worker"):
            bad(f"result pb says attempt {result.attempt} on {result.worker_id}, the hash "
                f"{out['attempt']} on {res.get('worker')}")
    if status != spec.status:
        bad(f"status {status}, expected {spec.status} ({res.get('error', b'').decode()[:120]})")
    if spec.code and res.get("error_code", b"").decode() != spec.code:
        bad(f"error_code {res.get('error_code')}, expected {spec.code}")
    error = res.get("error", b"").decode()
    # a retried job whose last attempt was cut by a SIGKILL gives up on that attempt:
    # EXHAUSTED all the same, naming the death instead of the job's own failure
    killed = spec.kind == "retry" and "ended without a result" in error
    if spec.error and spec.error not in error and not killed:
        bad(f"error {res.get('error', b'')[:120]!r} lacks {spec.error!r}")
    if spec.finish and res.get("finish_reason", b"").decode() != spec.finish:
        bad(f"finish_reason {res.get('finish_reason')}, expected {spec.finish}")
    text = res.get("text", b"").decode("utf-8", "replace")
    if spec.text is not None and text != spec.text:
        bad(f"text {text[:80]!r}, expected {spec.text[:80]!r}")
    if spec.whole_text is not None and not spec.whole_text.startswith(text):
        bad(f"text {text[:80]!r} is not a prefix of the answer")
    n_img = out["images"] = int(res.get("images", b"0") or 0)
    if spec.images >= 0 and n_img != spec.images:
        bad(f"{n_img} images, expected {spec.images}")
    if spec.images < 0 and n_img > spec.max_images:
        bad(f"{n_img} images, over max_images {spec.max_images}")
    for i, head in enumerate(imgs[:n_img]):
        if head[:8] != b"\x89PNG\r\n\x1a\n":
            bad(f"image {i + 1}: no PNG under its key")
        elif spec.size != (0, 0) and struct.unpack(">II", head[16:24]) != spec.size:
            bad(f"image {i + 1}: {struct.unpack('>II', head[16:24])}, expected {spec.size}")
    if jobh.get("state", b"").decode() != status:
        bad(f"job hash state {jobh.get('state')}, result {status}")
    types = [f.get(b"type") for _, f in events]
    finals = [i for i, t in enumerate(types) if t in FINAL_EVENTS]
    runs = [(f.get(b"worker"), f.get(b"attempt")) for _, f in events if f.get(b"type") == b"started"]
    out["runs"] = len(runs)
    if len(finals) != 1:
        bad(f"{len(finals)} final events")
    elif finals[0] != len(types) - 1:
        # a second run of a job taken over from a live worker (its lease lost while Redis was
        # away) writes progress until its commit finds the result: late, not doubled
        out["late_events"] = len(types) - 1 - finals[0]
        if len(runs) < 2 or b"started" in types[finals[0]:]:
            bad("events after the final event: " + " ".join(t.decode() for t in types[finals[0] + 1:][:8]))
    # a job whose cancel key is set when it is taken (again, after its first worker died)
    # ends cancelled at once, without a started event of its own
    if runs and (res.get("worker"), res.get("attempt")) not in runs and status != "cancelled":
        bad(f"result by {res.get('worker')} attempt {res.get('attempt')}, which has no started event")
    return out


def at(samples, pred):
    return next((s for s in samples if pred(s)), None)


def memory_points(soak):
    """Samples for the table: idle (before any job), start (after warm-up: the first
    results have expired), middle, end (every job ended)."""
    rows = [s for s in soak.samples if s["label"] is None]
    warm_t = soak.t_first - soak.t0 + soak.a.result_ttl_s + 30
    end = soak.samples[-1]
    start = at(rows, lambda s: s["t"] >= warm_t) or (rows[0] if rows else end)
    middle = at(rows, lambda s: s["t"] >= (start["t"] + end["t"]) / 2) or end
    return {"idle": soak.samples[0], "start": start, "middle": middle, "end": end}


def rss_growth(samples, warm_jobs=300):
    """Per worker process that ended enough jobs: its RSS once it had ended warm_jobs, halfway
    from there to its last sample, and at its last; the slope of the second half in KiB per
    1000 jobs (a leak keeps its slope, warm-up does not)."""
    by_pid = collections.defaultdict(list)
    for s in samples:
        for wid, w in s["workers"].items():
            if w["rss_kb"] and w["jobs"] is not None:
                by_pid[(wid, w["pid"])].append((w["jobs"], w["rss_kb"]))
    out = []
    for (wid, pid), pts in by_pid.items():
        warm = [p for p in pts if p[0] >= warm_jobs]
        if len(warm) < 3 or warm[-1][0] - warm[0][0] < 500:
            continue
        (j0, r0), (j2, r2) = warm[0], warm[-1]
        j1, r1 = next(p for p in warm if p[0] >= (j0 + j2) / 2)
        out.append({"worker": wid, "pid": pid, "jobs": [j0, j1, j2], "rss_kb": [r0, r1, r2],
                    "kb_per_1000_jobs_second_half": round((r2 - r1) * 1000 / max(1, j2 - j1), 1)})
    return sorted(out, key=lambda x: x["jobs"][0] - x["jobs"][2])


def report_of(soak, dead, pending, done_info, no_ttl, stops):
    specs = soak.specs
    lost = [s.id for s in specs if s.id not in soak.seen]
    doubled = sorted(j for j, c in soak.done_entries.items() if c > 1)
    dead_count = collections.Counter(f["id"].decode() for _, f in dead)
    doubled += sorted(j for j, c in dead_count.items() if c > 1 and j not in doubled)
    problems = {j: v["problems"] for j, v in soak.seen.items() if v["problems"]}
    doubled += sorted(j for j, p in problems.items() if any("final events" in x for x in p) and j not in doubled)
    want_dead = {s.id for s in specs if s.dead}
    extra_dead = {j: f for _, f in dead for j in [f["id"].decode()] if j not in want_dead}
    missing_dead = sorted(want_dead - set(dead_count))
    statuses = collections.Counter(v["status"] for v in soak.seen.values())
    kinds = collections.Counter(s.kind for s in specs)
    attempts = collections.Counter(v["attempt"] for v in soak.seen.values())
    runs = collections.Counter(v["runs"] for v in soak.seen.values())
    q = collections.defaultdict(list)
    for s in specs:
        v = soak.seen.get(s.id)
        if v and v["queue_ms"] is not None and s.status == "done" and v["attempt"] == 1:
            q[s.stream].append(v["queue_ms"])
    points = memory_points(soak)
    rep = {
        "engine": soak.a.engine, "jobs": len(specs), "workers": soak.a.workers, "max_inflight": soak.a.inflight,
        "tls": soak.a.tls,
        "appendfsync": soak.a.appendfsync, "claim_idle_ms": soak.a.claim_idle_ms,
        "max_attempts": soak.a.max_attempts, "result_ttl_s": soak.a.result_ttl_s, "seed": soak.a.seed,
        "duration_s": round(soak.t_last - soak.t_first, 1),
        "jobs_per_s": round(len(soak.seen) / max(1e-9, soak.t_last - soak.t_first), 1),
        "kinds": dict(kinds), "statuses": dict(statuses),
        "images_drawn": sum(v["images"] for v in soak.seen.values()),
        "cancelled_while_running": sum(1 for s in specs if s.cancel == "running" and soak.seen.get(s.id, {}).get("runs")),
        "lost": lost, "doubled": doubled, "wrong": problems,
        "dead": {"expected": len(want_dead), "found": len(dead_count), "missing": missing_dead,
                 "unexpected": {j: {"code": f["code"].decode(), "deliveries": int(f["deliveries"]),
                                    "error": f["error"].decode()[:200]} for j, f in extra_dead.items()}},
        "late_events": {j: v["late_events"] for j, v in soak.seen.items() if v.get("late_events")},
        "attempts": {str(k): v for k, v in sorted(attempts.items(), key=lambda x: x[0] or 0)},
        "runs_per_job": {str(k): v for k, v in sorted(runs.items())},
        "queue_ms_p50": {s: sorted(v)[len(v) // 2] for s, v in q.items() if v},
        "pending_at_end": pending,
        "done_stream": {"entries_added": done_info.get("entries-added"), "read": sum(soak.done_entries.values())},
        "keys_without_ttl": no_ttl,
        "enqueue_resent": soak.enqueue_resent,
        "faults": soak.faults,
        # a poison job's abort() is expected; any other exit is not (78: systemd gives up on it)
        "unexpected_exits": [f for f in soak.faults if f["fault"] == "worker exited" and f["status"] != -signal.SIGABRT],
        "worker_exit_status_on_sigterm": dict(stops),
        "memory": {k: v for k, v in points.items()},
        "rss_growth": rss_growth(soak.samples),
        "samples": soak.samples,
    }
    return rep


def mb(x):
    return f"{x / 1048576:7.1f}" if x is not None else "      -"


def print_report(rep):
    kills = [f for f in rep["faults"] if f["fault"] == "worker SIGKILL"]
    exits = [f for f in rep["faults"] if f["fault"] == "worker exited"]
    restarts = [f for f in rep["faults"] if f["fault"].startswith("Redis")]
    print(f"soak: {rep['jobs']} jobs ({rep['engine']} engine), {rep['workers']} workers x max_inflight "
          f"{rep['max_inflight']}, {rep['duration_s']:.0f} s ({rep['jobs_per_s']} jobs/s)")
    print(f"  accounted {rep['jobs'] - len(rep['lost'])}   lost {len(rep['lost'])}   doubled {len(rep['doubled'])}"
          f"   wrong {len(rep['wrong'])}")
    print("  outcomes  " + "  ".join(f"{k} {v}" for k, v in sorted(rep["statuses"].items(), key=str))
          + f"   ({rep['images_drawn']} images drawn, {rep['cancelled_while_running']} cancelled while running)")
    d = rep["dead"]
    print(f"  dead      {d['found']} (expected {d['expected']}: the bad, poison and retried jobs; "
          f"missing {len(d['missing'])}, unexpected {len(d['unexpected'])})")
    print("  attempt   " + "  ".join(f"{k}: {v}" for k, v in rep["attempts"].items())
          + "     runs per job  " + "  ".join(f"{k}: {v}" for k, v in rep["runs_per_job"].items()))
    if rep["late_events"]:
        print(f"  late      {len(rep['late_events'])} jobs with progress events after their final event, "
              f"{sum(rep['late_events'].values())} events (a second run: a lease lost while Redis was away)")
    if rep["queue_ms_p50"]:
        print("  queue p50 " + "  ".join(f"{s} {v:.0f} ms" for s, v in rep["queue_ms_p50"].items()))
    print(f"  faults    {len(kills)} worker SIGKILL, {len(exits) - len(rep['unexpected_exits'])} worker "
          f"SIGABRT (poison jobs), {len(rep['unexpected_exits'])} other exits, "
          + ", ".join(f"Redis {f['fault'].split()[1]} at {f['jobs_ended']} jobs (down {f['down_s']} s)"
                      for f in restarts))
    print(f"  at end    pending {rep['pending_at_end']}, done stream {rep['done_stream']}, "
          f"other keys without TTL {len(rep['keys_without_ttl'])}, XADD resent {rep['enqueue_resent']}")
    pts = rep["memory"]
    print("  memory (MiB)       " + "".join(f"{k:>11s}" for k in pts))
    print("    s / jobs ended   " + "".join(f"{p['t']:.0f}/{p['jobs_ended']}".rjust(11) for p in pts.values()))
    print("    Redis used_memory" + "".join(f"    {mb(p['redis_used_memory'])}" for p in pts.values()))
    print("    Redis keys       " + "".join(f"{p['redis_keys']:11d}" for p in pts.values()))
    for wid in sorted({w for p in pts.values() for w in p["workers"]}):
        ws = [p["workers"].get(wid) for p in pts.values()]
        rss = "".join(f"    {mb(w['rss_kb'] * 1024) if w and w['rss_kb'] else mb(None)}" for w in ws)
        who = ", ".join(f"{w['pid']}/{'?' if w['jobs'] is None else w['jobs']}" if w else "-" for w in ws)
        print(f"    {wid} RSS     {rss}   (pid/jobs it ended: {who})")
    for g in rep["rss_growth"][:3]:
        print(f"    {g['worker']} pid {g['pid']}: RSS {' -> '.join(map(str, g['rss_kb']))} KiB after "
              f"{', '.join(map(str, g['jobs']))} jobs ({g['kb_per_1000_jobs_second_half']:+} KiB per 1000 jobs "
              f"in the second half)")
    for j in rep["lost"][:10]:
        print(f"  LOST {j}")
    for j in rep["doubled"][:10]:
        print(f"  DOUBLED {j}")
    for j, p in list(rep["wrong"].items())[:10]:
        print(f"  WRONG {j}: {'; '.join(p)}")
    for f in rep["unexpected_exits"]:
        print(f"  EXIT {f['worker']} pid {f['pid']} status {f['status']} at {f['t']} s")
    for j, f in list(rep["dead"]["unexpected"].items())[:10]:
        print(f"  DEAD {j}: {f['code']} after {f['deliveries']} deliveries: {f['error']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--engine", choices=("fake", "real"), default="fake")
    ap.add_argument("--inflight", type=int, default=4, help="max_inflight of each worker")
    ap.add_argument("--draft-tokens", type=int, default=0,
                    help="--engine real: the workers' draft_tokens (0: the engine's default, -1: off)")
    ap.add_argument("--kills", type=int, help="worker SIGKILLs over the run")
    ap.add_argument("--poison", type=int, default=3, help="jobs that abort() their worker (max_attempts 2)")
    ap.add_argument("--step-ms", type=int, default=4, help="mean fake.step_ms of a job (the test engine's pace)")
    ap.add_argument("--backlog", type=int, default=200, help="unfinished jobs the producer keeps at most")
    ap.add_argument("--claim-idle-ms", type=int, default=5000)
    ap.add_argument("--max-attempts", type=int, default=10,
                    help="the workers' default (jobs may set their own); above what kills can use up")
    ap.add_argument("--result-ttl-s", type=int, default=60)
    ap.add_argument("--appendfsync", choices=("always", "everysec"), default="always")
    ap.add_argument("--stall-s", type=int, default=120, help="give up when no job ends for this long")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--tls", action="store_true", help="the workers reach Redis over TLS (rediss://; certificates "
                    "made with openssl): every SIGKILL and Redis restart goes through daemon/tls.c's relays")
    ap.add_argument("--json")
    ap.add_argument("--wrap", default="", help="a command the workers run under, e.g. \"valgrind "
                    "--leak-check=full --log-file=/tmp/vg-%%p.log\" (its report comes at SIGTERM)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, AOF)")
    ap.add_argument("--progress", action="store_true")
    a = ap.parse_args()
    a.jobs = a.jobs or (10000 if a.engine == "fake" else 1000)
    a.kills = a.kills if a.kills is not None else (12 if a.engine == "fake" else 4)
    if a.engine == "real":
        a.inflight = min(a.inflight, 2)
    tmp = tempfile.mkdtemp(prefix="duogen-soak-")
    soak = Soak(a, tmp)
    try:
        rep = soak.run()
    finally:
        soak.stop.set()
        for w in getattr(soak, "workers", []):
            if w.alive():
                w.proc.kill()
        if getattr(soak, "redis", None) and soak.redis.proc.poll() is None:
            soak.redis.proc.kill()
    print_report(rep)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=1)
    ok = not (rep["lost"] or rep["doubled"] or rep["wrong"] or rep["dead"]["missing"] or rep["dead"]["unexpected"]
              or rep["keys_without_ttl"] or any(rep["pending_at_end"].values()) or rep["unexpected_exits"])
    if a.keep or not ok:
        print(f"soak: logs and AOF kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
