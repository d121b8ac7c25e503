"""The systemd notification protocol, heard on our own NOTIFY_SOCKET."""
import os
import re
import socket
import threading
import time

from conftest import Worker, wait_until


class NotifySocket:
    """Reads every datagram as it arrives, as the service manager does."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.05)
        self.messages = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            try:
                m = self.sock.recv(4096).decode()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.messages.append(m)

    def drain(self):
        with self.lock:
            return list(self.messages)

    def has(self, prefix):
        return any(line.startswith(prefix) for line in self.lines())

    def lines(self):
        return [line for m in self.drain() for line in m.split("\n")]


def test_ready_status_watchdog_extend_stopping(cluster):
    ns = NotifySocket(os.path.join(cluster.tmp, "notify.sock"))
    env = {"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "400000", "DG_FAKE_LOAD_MS": "700"}
    w = Worker(cluster.tmp, cluster.server.url, "sd1", cluster.model, env=env,
               args=["--drain-ms", "3000"])
    cluster.workers.append(w)
    # during the load: progress in STATUS= and EXTEND_TIMEOUT_USEC=, and no READY yet
    wait_until(lambda: ns.has("EXTEND_TIMEOUT_USEC="), what="EXTEND_TIMEOUT_USEC during load")
    assert any(l.startswith("STATUS=loading model") for l in ns.lines())
    assert not ns.has("READY=1")
    wait_until(lambda: ns.has("READY=1"), what="READY=1")
    lines = ns.lines()
    assert lines.index("READY=1") > max(i for i, l in enumerate(lines) if l.startswith("EXTEND_TIMEOUT_USEC="))
    # watchdog pings from the main loop, a quarter of WATCHDOG_USEC apart at most
    n0 = ns.lines().count("WATCHDOG=1")
    time.sleep(1.0)
    assert ns.lines().count("WATCHDOG=1") - n0 >= 3
    wait_until(lambda: "STATUS=idle" in ns.lines(), what="STATUS=idle")
    # a job shows in STATUS=
    cluster.enqueue("sdjob", " ".join(["w"] * 20), meta={"fake.step_ms": 60})
    wait_until(lambda: any(l.startswith("STATUS=job sdjob") for l in ns.lines()), what="job status")
    # SIGTERM: STOPPING=1, EXTEND_TIMEOUT_USEC while draining, exit 0
    assert w.term() == 0
    lines = ns.lines()
    stop = lines.index("STOPPING=1")
    assert any(l.startswith("EXTEND_TIMEOUT_USEC=") for l in lines[stop:])
    assert cluster.result("sdjob")["status"] == b"done"


def test_status_line_follows_the_phase(cluster):
    """STATUS= names the step while a picture is drawn and the words otherwise: after the
    picture the line kept "decode step 4/4" to the job's end."""
    ns = NotifySocket(os.path.join(cluster.tmp, "notify-phase.sock"))
    w = Worker(cluster.tmp, cluster.server.url, "sd3", cluster.model, env={"NOTIFY_SOCKET": ns.path})
    cluster.workers.append(w)
    wait_until(lambda: ns.has("READY=1"), what="READY=1")
    cluster.enqueue("phased", " ".join(["w"] * 12), meta={"fake.images": 1, "fake.step_ms": 100})
    assert cluster.wait_result("phased")["status"] == b"done"
    lines = [l for l in ns.lines() if l.startswith("STATUS=job phased")]
    drawing = [i for i, l in enumerate(lines) if " diffusion step " in l]
    assert drawing, lines
    after = lines[drawing[-1] + 1:]
    assert any(re.fullmatch(r"STATUS=job phased decode \d+ tokens \(1 running\)", l) for l in after), lines
    assert not any(" step " in l for l in after), lines
    assert w.term() == 0


def test_no_watchdog_without_watchdog_usec(cluster):
    ns = NotifySocket(os.path.join(cluster.tmp, "notify2.sock"))
    w = Worker(cluster.tmp, cluster.server.url, "sd2", cluster.model, env={"NOTIFY_SOCKET": ns.path})
    cluster.workers.append(w)
    wait_until(lambda: ns.has("READY=1"), what="READY=1")
    time.sleep(0.5)
    assert "WATCHDOG=1" not in ns.lines()
    assert w.term() == 0
    assert "STOPPING=1" in ns.lines()


def test_bad_configuration_exits_78(cluster):
    w = Worker(cluster.tmp, cluster.server.url, "bad", os.path.join(cluster.tmp, "no-such-model"))
    assert w.proc.wait(10) == 78
    assert "cannot open the model" in w.logs()
    w2 = Worker(cluster.tmp, "redis://127.0.0.1:notaport", "bad2", cluster.model)
    assert w2.proc.wait(10) == 78
    assert 'redis_url "redis://127.0.0.1:notaport": a port that is not 1..65535' in w2.logs()


def test_fatal_engine_error_exits_75_and_job_is_retried(cluster):
    w = cluster.worker("f1")
    cluster.wait_groups()
    cluster.enqueue("devicefault", "x", meta={"fake.fail": "fatal"}, max_attempts=1)
    assert w.proc.wait(20) == 75
    assert "engine failure" in w.logs()
    # restarted (as systemd would), the same consumer takes its own pending entry back,
    # sees the delivery count past max_attempts, and dead-letters it
    w.start()
    res = cluster.wait_result("devicefault")
    assert res["error_code"] == b"EXHAUSTED"
    # and says what ended the attempt (it said "ended without a result")
    assert "last error: worker \"f1\": engine failure: fake engine: device lost" in res["error"].decode(), res


def test_an_engine_failure_at_submit_notes_every_run(cluster):
    """An engine failure found when a job is submitted ends the worker (exit 75) as one found
    in a step does, and the job hashes of the worker's other runs say what ended them (so
    that the attempt that gives up can tell), as well as the submitted job's."""
    w = cluster.worker("f2", args=["--max-inflight", "2"])
    cluster.wait_groups()
    cluster.enqueue("bystander", " ".join(["w"] * 40), meta={"fake.step_ms": 100})
    wait_until(lambda: int(cluster.r.hget("duogen:job:bystander", "tokens") or 0) >= 2, what="the bystander running")
    cluster.enqueue("submitfault", "x", meta={"fake.fail": "submit_fatal"})
    assert w.proc.wait(20) == 75
    said = 'worker "f2": engine failure: fake engine: device lost at submit (asked by the job)'
    assert "engine failure" in w.logs()
    for job in ("bystander", "submitfault"):
        h = cluster.r.hgetall(f"duogen:job:{job}")
        assert h[b"state"] == b"retrying" and said in h[b"error"].decode(), (job, h)
    assert not cluster.r.exists("duogen:result:bystander")


def test_warmup_before_ready_and_a_failed_one_exits_75(cluster):
    """READY=1 only after the warm-up; a warm-up that fails (the device) exits 75 without
    READY, naming it, and `warmup = 0` skips it."""
    ns = NotifySocket(os.path.join(cluster.tmp, "notify3.sock"))
    w = Worker(cluster.tmp, cluster.server.url, "warm1", cluster.model,
               env={"NOTIFY_SOCKET": ns.path, "DG_FAKE_WARMUP": "400"})
    cluster.workers.append(w)
    wait_until(lambda: ns.has("READY=1"), what="READY=1")
    lines = ns.lines()
    assert lines.index("STATUS=warming up") < lines.index("READY=1")
    assert "warm-up: 1 prompt tokens, 1 generated, 0 picture(s) in" in w.logs()
    assert w.term() == 0

    ns2 = NotifySocket(os.path.join(cluster.tmp, "notify4.sock"))
    bad = Worker(cluster.tmp, cluster.server.url, "warm2", cluster.model,
                 env={"NOTIFY_SOCKET": ns2.path, "DG_FAKE_WARMUP": "fail"})
    assert bad.proc.wait(20) == 75
    assert "warm-up: the fake device failed" in bad.logs()
    # the datagram was sent before the exit; the reader thread takes it within its poll
    wait_until(lambda: "STATUS=failed: warm-up: the fake device failed" in ns2.lines(), timeout=5,
               what="the failed status")
    assert not ns2.has("READY=1")

    off = Worker(cluster.tmp, cluster.server.url, "warm3", cluster.model,
                 env={"DG_FAKE_WARMUP": "fail"}, args=["--warmup", "0"])
    cluster.workers.append(off)
    wait_until(lambda: "ready" in off.logs(), what="a worker without warm-up ready")
    assert "warm-up" not in off.logs()
    assert off.term() == 0
