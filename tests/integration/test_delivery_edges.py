"""Delivery edge cases found by review, each failing before its fix: the same job id twice
in one commit batch, Redis refusing writes (full, or a key of the wrong type) at commit, an
entry whose job already has a result, a read whose reply was lost with the connection, and
an attempt whose job another worker finished meanwhile (images as files)."""
import os
import signal
import socket
import threading
import time
import redis

from conftest import make_job, pb, wait_until


def twice_in_one_read(cluster, job_id, raw):
    """The same job id in two entries, added together while the worker is busy with another
    job, so that one read takes both and they end in the same step: the case of a producer's
    XADD retried after a lost reply. Returns once both entries are acknowledged."""
    cluster.worker("w1", args=["--max-inflight", "3"])
    cluster.wait_groups()
    cluster.enqueue("busy", " ".join(["w"] * 20), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:busy", "state") == b"running", what="busy running")
    pipe = cluster.r.pipeline(transaction=False)
    for _ in range(2):
        pipe.xadd(cluster.key("jobs"), {"id": job_id, "job": raw})
    pipe.execute()
    cluster.wait_result(job_id)
    wait_until(lambda: cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0, timeout=20, what="acks")


def test_same_id_twice_in_one_batch_is_written_once(cluster):
    """The second entry is only acknowledged (commit.h); both used to be written, the two
    results in one transaction."""
    twice_in_one_read(cluster, "dup", make_job("dup", "a b c").SerializeToString())
    done = [f[b"id"] for _, f in cluster.r.xrange("duogen:done")]
    types = [e["type"] for e in cluster.events("dup")]
    assert done.count(b"dup") == 1, f"result of 'dup' written {done.count(b'dup')} times"
    assert types.count(b"done") == 1, types


def test_bad_job_same_id_twice_is_dead_lettered_once(cluster):
    twice_in_one_read(cluster, "baddup", b"\xff\xff garbage")
    dead = [f[b"id"] for _, f in cluster.r.xrange("duogen:dead")]
    assert dead.count(b"baddup") == 1, dead


def test_redis_oom_at_commit_is_not_a_config_error(cluster):
    """Redis at maxmemory (noeviction) refuses HSET/XADD with -OOM: a passing condition.
    The worker must keep the result and write it when memory frees, not exit 78
    (RestartPreventExitStatus=78: systemd would never restart it). While it is full, the
    tries back off (100 ms doubled up to 5 s) and the log says the first refusal: the reads
    after each reconnect went through and set the wait back to 100 ms, so the worker
    reconnected and warned ten times a second for as long as Redis stayed full (found in
    use)."""
    w = cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("oom", " ".join(["w"] * 15), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:oom", "state") == b"running", what="running")
    said_before = w.logs().count("the server is not ready: OOM")
    cluster.r.config_set("maxmemory-policy", "noeviction")
    connects = cluster.r.info("stats")["total_connections_received"]
    cluster.r.config_set("maxmemory", "1")
    time.sleep(3)
    cluster.r.config_set("maxmemory", "0")
    connects = cluster.r.info("stats")["total_connections_received"] - connects
    rc = w.proc.poll()
    print("worker rc:", rc)
    print(w.logs()[-1500:])
    assert rc is None, f"worker exited {rc} on a full Redis"
    assert cluster.wait_result("oom")["status"] == b"done"
    # two connections refused (the main loop's, the keeper's), each waiting 100, 200, 400,
    # 800, 1600 ms between tries: at most 5 reconnects each in 3 s, however fast the machine
    # (with the wait reset: ~30 each); the test's own INFO connection is one more
    assert connects <= 12, connects
    # (the keeper's one line saying the leases are not renewed quotes the reason too)
    said = [l for l in w.logs().splitlines() if "the server is not ready: OOM" in l and "the keeper cannot" not in l]
    assert len(said) - said_before <= 2, w.logs()[-3000:]


def test_redelivered_job_with_result_keeps_its_job_hash(cluster):
    """An entry whose job already has a result is 'acknowledged without running': its job
    hash must keep what the result's attempt wrote (error, tokens, progress, attempt)."""
    cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("f1", "x y", meta={"fake.fail": "error"})
    res = cluster.wait_result("f1")
    assert res["status"] == b"failed"
    wait_until(lambda: cluster.r.hget("duogen:job:f1", "state") == b"failed", what="job hash failed")
    before = cluster.r.hgetall("duogen:job:f1")
    cluster.enqueue("f1", "x y", meta={"fake.fail": "error"})      # the same id again
    wait_until(lambda: cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0 and
               cluster.r.xlen(cluster.key("jobs")) == 2, what="second entry acked")
    time.sleep(0.3)
    after = cluster.r.hgetall("duogen:job:f1")
    print("before:", before)
    print("after: ", after)
    for k in (b"error", b"progress", b"attempt", b"tokens"):
        assert after.get(k) == before.get(k), (k, before.get(k), after.get(k))


class WireProxy:
    """TCP proxy to redis; a subclass's pass_on() sees each chunk and says whether to forward
    it (False closes both sides); conn is a dict of the connection's own, both directions'."""

    def __init__(self, port):
        self.port_to = port
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(16)
        self.port = self.ls.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def pass_on(self, data, from_server, conn):
        return True

    def accept(self):
        while True:
            c, _ = self.ls.accept()
            try:
                s = socket.create_connection(("127.0.0.1", self.port_to))
            except OSError:   # the server away (restarting): the client retries
                c.close()
                continue
            conn = {}
            threading.Thread(target=self.pump, args=(c, s, False, conn), daemon=True).start()
            threading.Thread(target=self.pump, args=(s, c, True, conn), daemon=True).start()

    def pump(self, a, b, from_server, conn):
        try:
            while True:
                d = a.recv(65536)
                if not d or not self.pass_on(d, from_server, conn):
                    break
                b.sendall(d)
        except OSError:
            pass
        for x in (a, b):
            try:
                x.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            x.close()


class DropReplyProxy(WireProxy):
    """Once, forwards a server reply containing `marker` to nobody: it closes both sides
    instead (the reply of an executed command lost on the wire)."""

    def __init__(self, port, marker):
        self.marker = marker
        self.fired = threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        if from_server and not self.fired.is_set() and self.marker in data:
            self.fired.set()
            return False
        return True


def test_lost_xreadgroup_reply_is_taken_back_at_once(cluster):
    """XREADGROUP executed, its reply lost with the connection: the entry is in this
    consumer's pending list, held by no run. A new connection makes the worker look at its
    own pending entries at once; it used to wait for its reaper's XAUTOCLAIM after
    claim_idle_ms (here a minute: longer than the test waits). That delivery never ran, so
    the claim does not count another: a job with max_attempts 1 runs, as its first attempt
    (it used to be counted twice and given up as exhausted)."""
    proxy = DropReplyProxy(cluster.server.port, b"lostreply")
    url = f"redis://127.0.0.1:{proxy.port}/0"
    from conftest import Worker
    w = Worker(cluster.tmp, url, "wp", cluster.model,
               args=["--prefix", "duogen", "--claim-idle-ms", "60000", "--reaper-ms", "300"])
    cluster.workers.append(w)
    cluster.wait_groups()
    wait_until(lambda: "ready" in w.logs(), what="the worker ready")
    time.sleep(0.5)   # in its idle read: the job's entry comes as that read's reply
    cluster.enqueue("lostreply", "hello", max_attempts=1)
    res = cluster.wait_result("lostreply", timeout=30)
    assert proxy.fired.is_set()
    assert res["status"] == b"done", res
    assert pb.Result.FromString(res["pb"]).attempt == 1
    assert "re-taking 1 of our own pending entries" in w.logs()


def test_a_stale_attempt_leaves_the_visible_results_files(cluster, tmpdir_path):
    """Worker A pauses (SIGSTOP: a VM or GC pause) past claim_idle_ms; B takes the job over and
    writes its result naming 1..3.png. A resumes after the deadline, its run ends expired
    with one image, and dg_run_end() prunes files over 1 before A's commit learns the result
    is not its own: the visible result names files that are gone."""
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    a = cluster.worker("wa", args=["--output-root", root])
    cluster.wait_groups()
    job = make_job("pr", "draw two things", meta={"fake.images": 3, "fake.step_ms": 200},
                   width=32, height=32, steps=2, deadline_unix_ms=int(time.time() * 1000) + 16000)
    cluster.r.xadd(cluster.key("jobs"), {"id": "pr", "job": job.SerializeToString()})
    wait_until(lambda: any(e["type"] == b"image" for e in cluster.events("pr")), timeout=10, what="first image")
    a.proc.send_signal(signal.SIGSTOP)
    cluster.worker("wb", args=["--output-root", root])
    res = cluster.wait_result("pr", timeout=20)
    assert res["worker"] == b"wb" and res["status"] == b"done", res
    paths = [p.image.path for p in pb.Result.FromString(res["pb"]).output if p.WhichOneof("kind") == "image"]
    assert all(os.path.exists(p) for p in paths), paths
    wait_until(lambda: time.time() * 1000 > job.deadline_unix_ms + 500, timeout=20, what="deadline")
    a.proc.send_signal(signal.SIGCONT)
    time.sleep(2)
    print(a.logs()[-800:])
    print("result names:", paths, "on disk:", sorted(os.listdir(os.path.join(root, "pr"))))
    assert cluster.result("pr")["worker"] == b"wb"
    assert all(os.path.exists(p) for p in paths), "files of the visible result removed"


def test_a_job_key_of_the_wrong_type_does_not_stop_the_worker(cluster):
    w = cluster.worker("w1")
    cluster.wait_groups()
    cluster.r.set("duogen:job:wt", "queued")          # a producer's SET instead of HSETNX
    cluster.enqueue("wt", "hi")
    res = cluster.wait_result("wt")
    time.sleep(1)
    print("rc:", w.proc.poll(), "pending:", cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"], res.get("status"))
    assert w.proc.poll() is None, f"worker exited {w.proc.poll()} over one job's key"


def pending_entry(cluster, stream="jobs"):
    """The one pending entry of the group on a stream: {message_id, consumer, ...} or None."""
    rows = cluster.r.xpending_range(cluster.key(stream), "duogen", "-", "+", 10)
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def test_an_attempt_that_lost_its_lease_stops_writing(cluster):
    """Another worker's reaper took the entry of a running job (this worker was paused past
    claim_idle_ms): the stale attempt must stop writing the job's events, progress and
    result, which now belong to the attempt holding the entry. It used to go on streaming
    into the same event stream (two attempts' text interleaved) and commit its result."""
    w = cluster.worker("w1")   # claim_idle 1500 ms: renewals every 500 ms
    cluster.wait_groups()
    cluster.enqueue("lease", " ".join(["w"] * 80), meta={"fake.step_ms": 100}, max_attempts=5)
    wait_until(lambda: len(cluster.events("lease")) >= 5, what="text events")
    entry = pending_entry(cluster)["message_id"]
    # the thief: a live worker that took the entry over and keeps renewing it
    stop = threading.Event()

    def thief():
        cluster.r.xclaim(cluster.key("jobs"), "duogen", "thief", 0, [entry])
        while not stop.wait(0.2):
            cluster.r.xclaim(cluster.key("jobs"), "duogen", "thief", 0, [entry], justid=True)
    t = threading.Thread(target=thief, daemon=True)
    t.start()
    try:
        wait_until(lambda: "its lease was lost" in w.logs(), timeout=5, what="the lease noticed lost")
        time.sleep(0.3)   # a step under way when it was noticed may still end
        n_events, job = len(cluster.events("lease")), cluster.r.hgetall("duogen:job:lease")
        time.sleep(1.5)   # 15 more steps of the fake engine had it gone on
        assert len(cluster.events("lease")) == n_events, "the stale attempt kept writing events"
        assert cluster.r.hgetall("duogen:job:lease") == job, "the stale attempt kept writing progress"
        assert not cluster.result("lease"), "the stale attempt wrote a result"
        assert pending_entry(cluster)["consumer"] == b"thief"
        assert w.alive()
    finally:
        stop.set()
        t.join()
    # the thief 'dies': w1's reaper takes the entry back after claim_idle_ms and runs it
    res = cluster.wait_result("lease", timeout=30)
    assert res["status"] == b"done" and res["worker"] == b"w1", res
    assert cluster.r.hget("duogen:worker:w1", "leases_lost") == b"1"


class HoldProxy(WireProxy):
    """Once, holds a client's command for which hold(data) is true (or that contains the
    bytes `hold`) until released (a renewal delayed on the wire between its XPENDING and its
    XCLAIM)."""

    def __init__(self, port, hold):
        self.hold = hold if callable(hold) else (lambda data: hold in data)   # bytes: a marker
        self.held, self.released = threading.Event(), threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        if not from_server and not self.held.is_set() and self.hold(data):
            self.held.set()
            self.released.wait(30)
        return True


def renewal_idle_at_least(ms):
    """A keeper's renewal (XCLAIM ... JUSTID) whose min-idle-time, the idle XPENDING gave, is
    at least ms: released that long after another claim, a smaller one would claim the entry
    back as Redis means it to (the entry idle past its min-idle-time again)."""
    def hold(data):
        parts = data.split(b"\r\n")
        if b"JUSTID" not in parts or b"XCLAIM" not in parts:
            return False
        i = parts.index(b"XCLAIM")   # $n, stream, $n, group, $n, consumer, $n, min-idle
        return len(parts) > i + 8 and parts[i + 8].isdigit() and int(parts[i + 8]) >= ms
    return hold


def test_a_renewal_does_not_take_back_an_entry_reaped_meanwhile(cluster):
    """The keeper looks (XPENDING: ours, idle ~renew_ms), then renews (XCLAIM). Another
    worker's reaper that takes the entry in between must keep it: the renewal used
    min-idle-time 0 and took it back, and both workers ran the job. Here the renewal is held
    on the wire while the 'other worker' reaps the entry once it is idle past
    claim_idle_ms."""
    proxy = HoldProxy(cluster.server.port, renewal_idle_at_least(300))
    from conftest import Worker
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "w1", cluster.model,
               args=["--prefix", "duogen", "--reaper-ms", "600000"])   # its own reaper out of the way
    cluster.workers.append(w)
    cluster.wait_groups()
    cluster.enqueue("race", " ".join(["w"] * 100), meta={"fake.step_ms": 100}, max_attempts=5)
    assert proxy.held.wait(10), "no renewal seen"   # renewals every 500 ms, their idle 0..500
    entry = pending_entry(cluster)
    assert entry["consumer"] == b"w1"
    wait_until(lambda: pending_entry(cluster)["time_since_delivered"] >= 1500, timeout=5, what="idle past claim_idle")
    # what XAUTOCLAIM with claim_idle_ms does, for the one entry
    got = cluster.r.xclaim(cluster.key("jobs"), "duogen", "reaper", 1500, [entry["message_id"]], justid=True)
    assert got == [entry["message_id"]], got
    time.sleep(0.1)
    proxy.released.set()
    time.sleep(0.5)
    assert pending_entry(cluster)["consumer"] == b"reaper", "the renewal took the reaped entry back"
    wait_until(lambda: "its lease was lost" in w.logs(), timeout=5, what="the lease noticed lost")


def test_a_job_given_back_waits_claim_idle_before_its_next_attempt(cluster):
    """A passing failure leaves the entry pending for a later attempt, after claim_idle_ms
    (a reaper's XAUTOCLAIM). While this worker's own pending list was to be looked at (here:
    its connection was killed, so a lost reply could have left entries there), it took the
    entry back at once: no back-off, and max_attempts used up in a burst."""
    w = cluster.worker("w1", args=["--claim-idle-ms", "4000"])
    cluster.wait_groups()
    cluster.enqueue("backoff", "x", meta={"fake.fail": "retry"}, max_attempts=2)
    t0 = wait_until(lambda: cluster.r.hget("duogen:job:backoff", "state") == b"retrying" and time.monotonic(),
                    every=0.005, what="first attempt given back")
    for c in cluster.r.client_list():
        if c["name"] == "w1":
            cluster.r.client_kill_filter(_id=c["id"])
    t1 = wait_until(lambda: cluster.r.hget("duogen:job:backoff", "attempt") == b"2" and time.monotonic(),
                    timeout=15, every=0.005, what="second attempt")
    print(w.logs()[-1500:])
    # 4 s less a renewal period (the entry's idle time counts from its last renewal)
    assert t1 - t0 >= 2.5, f"second attempt {t1 - t0:.2f} s after the first was given back"
    res = cluster.wait_result("backoff", timeout=20)
    assert res["error_code"] == b"EXHAUSTED", res


def kill_main_connection(cluster, name):
    for c in cluster.r.client_list():
        if c["name"] == name:
            cluster.r.client_kill_filter(_id=c["id"])


def attempt_of(res):
    return pb.Result.FromString(res["pb"]).attempt


def test_a_lost_read_of_two_entries_with_one_slot_left_runs_both_uncounted(cluster):
    """A read of two entries whose reply was lost, and one slot left after a high job: the
    look at our own list claimed one and dropped the other from view (own_pending cleared
    with rows unexamined), until a reaper counted a delivery for it: with max_attempts 1 it
    was given up without ever running."""
    cluster.worker("w1", args=["--max-inflight", "3", "--claim-idle-ms", "3000"])
    cluster.wait_groups()
    cluster.enqueue("long", " ".join(["w"] * 80), meta={"fake.step_ms": 100}, stream="jobs:high")
    wait_until(lambda: cluster.r.hget("duogen:job:long", "state") == b"running", what="long running")
    p = cluster.r.pipeline(transaction=True)   # the lost read, atomically, as w1
    for j in ("a", "b"):
        p.xadd(cluster.key("jobs"), {"id": j, "job": make_job(j, "x y", max_attempts=1).SerializeToString()})
    p.xreadgroup("duogen", "w1", {cluster.key("jobs"): ">"}, count=2)
    p.xadd(cluster.key("jobs:high"), {"id": "h", "job": make_job("h", " ".join(["w"] * 40),
                                                                 meta={"fake.step_ms": 100}).SerializeToString()})
    p.execute()
    kill_main_connection(cluster, "w1")
    for j in ("a", "b"):
        res = cluster.wait_result(j, timeout=20)
        assert res["status"] == b"done" and attempt_of(res) == 1, (j, res)


def test_entries_of_an_earlier_life_count_past_the_first_look(cluster):
    """Two entries left in w1's list by an earlier life; with one slot, the first look takes
    one: the second, taken at a later look, was claimed as never run (uncounted)."""
    for s in ("jobs", "jobs:high"):
        cluster.r.xgroup_create(cluster.key(s), "duogen", id="0", mkstream=True)
    for j in ("e1", "e2"):
        cluster.enqueue(j, " ".join(["w"] * 5), meta={"fake.step_ms": 50})
    cluster.r.xreadgroup("duogen", "w1", {cluster.key("jobs"): ">"}, count=2)   # the earlier life
    time.sleep(0.05)   # delivered before the new life starts
    cluster.worker("w1", args=["--max-inflight", "1"])
    assert attempt_of(cluster.wait_result("e1")) == 2
    assert attempt_of(cluster.wait_result("e2")) == 2


def test_a_redis_rollback_does_not_stop_a_run_nobody_else_holds(cluster):
    """Redis restarts from a snapshot taken before the worker read a job: the entry is not
    pending any more, and no one else has it. The run must go on (it was fenced as if another
    attempt had acknowledged it, and the job ran again from scratch)."""
    w = cluster.worker("w1", args=["--claim-idle-ms", "3000", "--max-inflight", "2"])
    cluster.wait_groups()
    cluster.enqueue("long", " ".join(["w"] * 100), meta={"fake.step_ms": 100}, max_attempts=5)
    wait_until(lambda: cluster.r.hget("duogen:job:long", "state") == b"running", what="long running")
    w.proc.send_signal(signal.SIGSTOP)
    cluster.enqueue("rb", " ".join(["w"] * 60), meta={"fake.step_ms": 100}, max_attempts=5)
    cluster.r.save()                            # the snapshot: rb not yet delivered
    w.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: cluster.r.hget("duogen:job:rb", "state") == b"running", what="rb running")
    time.sleep(1.0)
    cluster.server.stop(hard=True)
    cluster.server.start()
    cluster.r = cluster.server.client()
    cluster.wait_result("rb", timeout=30)
    assert "its lease was lost" not in w.logs()


def test_a_job_given_up_unread_keeps_its_ttl_and_its_id(cluster):
    """A delivery past max_attempts is given up without unpacking the job: its result must
    still go under the job's own id (an entry without an `id` field) with its own TTL."""
    for s in ("jobs", "jobs:high"):
        cluster.r.xgroup_create(cluster.key(s), "duogen", id="0", mkstream=True)
    cluster.enqueue("ttl", "x", max_attempts=1, result_ttl_s=600)
    raw = make_job("noid", "x", max_attempts=1).SerializeToString()
    cluster.enqueue("noid", raw=raw, fields={"job": raw})
    cluster.r.xreadgroup("duogen", "ghost", {cluster.key("jobs"): ">"}, count=2)   # a dead worker
    cluster.worker("w1", args=["--claim-idle-ms", "500", "--reaper-ms", "100"])
    res = cluster.wait_result("ttl")
    assert res["error_code"] == b"EXHAUSTED", res
    assert 0 < cluster.r.ttl(cluster.key("result", "ttl")) <= 600
    assert cluster.wait_result("noid")["error_code"] == b"EXHAUSTED"


def test_a_restart_from_an_older_snapshot_leaves_running_jobs_to_their_worker(cluster):
    """Redis restarted from a snapshot older than claim_idle_ms: every pending entry's idle
    time ran on through it. Another worker's reaper took w1's running job at once (a
    delivery counted: with max_attempts 1 it was given up while it ran fine); now the
    reapers wait for the keepers, which renew at once on a new connection."""
    cluster.worker("w1", args=["--claim-idle-ms", "3000", "--max-inflight", "1"])
    cluster.wait_groups()
    cluster.enqueue("live", " ".join(["w"] * 150), meta={"fake.step_ms": 100}, max_attempts=1)
    wait_until(lambda: cluster.r.hget("duogen:job:live", "state") == b"running", what="live running")
    cluster.worker("w2", args=["--claim-idle-ms", "3000"])
    cluster.wait_heartbeat("w2")
    cluster.r.save()
    time.sleep(4.0)   # the snapshot is older than claim_idle_ms
    cluster.server.stop(hard=True)
    cluster.server.start()
    cluster.r = cluster.server.client()
    res = cluster.wait_result("live", timeout=40)
    assert res["status"] == b"done" and res["worker"] == b"w1", res
    assert attempt_of(res) == 1


def test_the_reaper_reaches_an_abandoned_entry_behind_ten_running_ones(cluster):
    """XAUTOCLAIM looks at COUNT x 10 pending entries a call; every call started at 0-0, so a
    worker with one free slot never got past the ten oldest running jobs of the fleet."""
    for s in ("jobs", "jobs:high"):
        cluster.r.xgroup_create(cluster.key(s), "duogen", id="0", mkstream=True)
    for i in range(10):
        cluster.enqueue(f"live{i}", "x")
    cluster.enqueue("orphan", "x")
    live = [e for e, _ in cluster.r.xreadgroup("duogen", "holder", {cluster.key("jobs"): ">"}, count=10)[0][1]]
    cluster.r.xreadgroup("duogen", "ghost", {cluster.key("jobs"): ">"}, count=1)   # a dead worker's
    stop = threading.Event()

    def holder():   # a live worker renewing its ten
        while not stop.wait(0.2):
            cluster.r.xclaim(cluster.key("jobs"), "duogen", "holder", 0, live, justid=True)
    t = threading.Thread(target=holder, daemon=True)
    t.start()
    try:
        cluster.worker("w1", args=["--max-inflight", "1"])   # claim_idle 1.5 s, reaper every 0.3 s
        assert cluster.wait_result("orphan", timeout=10)["status"] == b"done"
        assert not any(cluster.result(f"live{i}") for i in range(10)), "a live job was taken over"
    finally:
        stop.set()
        t.join()


def test_a_stale_attempt_writes_no_result_after_the_first_one_expired(cluster):
    """w1 paused; w2 took the job over and finished it with result_ttl_s 1. When w1 resumed,
    its entry was not pending and the result gone (expired): it wrote a second result. Not
    pending and already delivered by the group means acknowledged: fenced."""
    w1 = cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("ttl", " ".join(["w"] * 40), meta={"fake.step_ms": 100}, result_ttl_s=1, max_attempts=5)
    wait_until(lambda: cluster.r.hget("duogen:job:ttl", "state") == b"running", what="running on w1")
    time.sleep(0.5)
    w1.proc.send_signal(signal.SIGSTOP)
    cluster.worker("w2")
    wait_until(lambda: cluster.result("ttl"), timeout=20, what="w2's result")
    wait_until(lambda: not cluster.r.exists("duogen:result:ttl"), timeout=5, what="the result expired")
    w1.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: "its lease was lost" in w1.logs(), timeout=5, what="w1 fenced")
    time.sleep(1.0)
    done = [f[b"id"] for _, f in cluster.r.xrange("duogen:done")]
    assert done.count(b"ttl") == 1, done


def test_a_job_given_back_long_ago_still_counts_its_deliveries(cluster):
    """A passing failure given back while the worker stayed full for longer than its
    back-off and a reaper period was forgotten, then claimed as never run (uncounted) at the
    next look at the worker's own list: a job of max_attempts 1 was attempted twice."""
    w = cluster.worker("w1", args=["--max-inflight", "1"])
    cluster.wait_groups()
    cluster.enqueue("bo", "x", meta={"fake.fail": "retry"}, max_attempts=1)
    wait_until(lambda: cluster.r.hget("duogen:job:bo", "state") == b"retrying", every=0.005, what="given back")
    cluster.enqueue("L", " ".join(["w"] * 60), meta={"fake.step_ms": 100}, stream="jobs:high")
    wait_until(lambda: cluster.r.hget("duogen:job:L", "state") == b"running", what="L running")
    time.sleep(4.0)
    kill_main_connection(cluster, "w1")
    cluster.wait_result("L", timeout=20)
    res = cluster.wait_result("bo", timeout=20)
    assert res["error_code"] == b"EXHAUSTED", res
    tries = [ln for ln in w.logs().splitlines() if 'job "bo"' in ln and "left pending for a later attempt" in ln]
    assert len(tries) == 1, tries


def test_the_parked_entry_takes_a_slot_of_its_own_pending_step(cluster):
    """max_inflight 1: the idle wait parked normal entry n beside high h; while h ran, a read
    whose reply was lost left x in the worker's list. The look at its own list claimed x and
    n besides (COUNT 1): n found no slot, went back as 'all 1 slots busy' and, max_attempts
    1, was given up without running."""
    from conftest import Worker
    for st in ("jobs", "jobs:high"):
        cluster.r.xgroup_create(cluster.key(st), "duogen", id="0", mkstream=True)
    proxy = HoldProxy(cluster.server.port, b"BLOCK")     # hold the first idle wait
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "w1", cluster.model,
               args=["--prefix", "duogen", "--max-inflight", "1"])
    cluster.workers.append(w)
    assert proxy.held.wait(10)
    p = cluster.r.pipeline(transaction=True)
    p.xadd(cluster.key("jobs"), {"id": "n", "job": make_job("n", "x", max_attempts=1).SerializeToString()})
    p.xadd(cluster.key("jobs:high"), {"id": "h", "job": make_job("h", " ".join(["w"] * 30),
                                                                 meta={"fake.step_ms": 100}).SerializeToString()})
    p.execute()
    proxy.released.set()
    wait_until(lambda: "came with a high-priority job" in w.logs(), timeout=5, what="parked")
    p = cluster.r.pipeline(transaction=True)             # a lost read, as w1
    p.xadd(cluster.key("jobs"), {"id": "x", "job": make_job("x", "x").SerializeToString()})
    p.xreadgroup("duogen", "w1", {cluster.key("jobs"): ">"}, count=1)
    p.execute()
    for j in ("h", "x", "n"):
        res = cluster.wait_result(j, timeout=20)
        assert res["status"] == b"done", (j, res)
    assert "slots busy" not in w.logs()


def park_beside_a_high_job(cluster, high_words, args=()):
    """A worker w1 (max_inflight 1) whose idle wait gets high job h and normal job n
    (max_attempts 1) in one reply: h runs, n is parked."""
    from conftest import Worker
    for st in ("jobs", "jobs:high"):
        cluster.r.xgroup_create(cluster.key(st), "duogen", id="0", mkstream=True)
    proxy = HoldProxy(cluster.server.port, b"BLOCK")     # hold the first idle wait
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "w1", cluster.model,
               args=["--prefix", "duogen", "--max-inflight", "1", *args])
    cluster.workers.append(w)
    assert proxy.held.wait(10)
    p = cluster.r.pipeline(transaction=True)
    p.xadd(cluster.key("jobs"), {"id": "n", "job": make_job("n", "x", max_attempts=1).SerializeToString()})
    p.xadd(cluster.key("jobs:high"), {"id": "h", "job": make_job("h", " ".join(["w"] * high_words),
                                                                 meta={"fake.step_ms": 100}).SerializeToString()})
    p.execute()
    proxy.released.set()
    wait_until(lambda: "came with a high-priority job" in w.logs(), timeout=5, what="parked")
    return w


def test_a_parked_entry_taken_over_by_another_worker_runs_as_its_first_attempt(cluster):
    """The parked entry n waits in w1's list while h runs for longer than claim_idle_ms
    (1.5 s here); w2's reaper takes it over. Its parked delivery was counted there: with
    max_attempts 1, n was given up as exhausted without ever starting."""
    park_beside_a_high_job(cluster, 150)
    wait_until(lambda: cluster.r.xpending_range(cluster.key("jobs"), "duogen", "-", "+", 1)[0]["times_delivered"] == 0,
               timeout=5, what="the parked delivery set back to 0")
    w2 = cluster.worker("w2")
    res = cluster.wait_result("n", timeout=30)
    assert res["status"] == b"done" and pb.Result.FromString(res["pb"]).attempt == 1, res
    assert "took over 1 abandoned entries" in w2.logs()


def test_a_parked_entry_left_at_a_stop_runs_as_its_first_attempt_in_the_next_life(cluster):
    """SIGTERM while n is parked: it stays pending in w1's list, and the next process under
    w1 counted its delivery as an earlier life's: max_attempts 1, exhausted unrun."""
    w1 = park_beside_a_high_job(cluster, 20, args=["--drain-ms", "10000"])
    assert w1.term(timeout=30) == 0
    pend = cluster.r.xpending_range(cluster.key("jobs"), "duogen", "-", "+", 10)
    assert [(e["consumer"], e["times_delivered"]) for e in pend] == [(b"w1", 0)], pend
    cluster.worker("w1", args=["--max-inflight", "1"])
    res = cluster.wait_result("n", timeout=30)
    assert res["status"] == b"done" and pb.Result.FromString(res["pb"]).attempt == 1, res


class DropClaimReplyProxy(WireProxy):
    """Once: the reply to a claim that returns entries (XAUTOCLAIM of duogen:jobs, or XCLAIM
    without JUSTID) holding `marker` is lost with its connection."""

    def __init__(self, port, marker):
        self.marker, self.fired = marker, threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        if self.fired.is_set():
            return True
        if not from_server:
            conn["claim"] = (b"XAUTOCLAIM" in data and b"\r\nduogen:jobs\r\n" in data) or \
                            (b"XCLAIM" in data and b"JUSTID" not in data)
        elif conn.pop("claim", False) and self.marker in data:
            self.fired.set()
            return False
        return True


def test_a_lost_claim_reply_of_a_given_back_job_is_not_counted_twice(cluster):
    """A passing failure gives the entry back; the reaper's claim that takes it again
    (delivery 2) loses its reply with the connection. The look at the worker's own list
    after the reconnect claimed it as another delivery (3): with max_attempts 3, only two
    attempts ran before the job was given up."""
    from conftest import Worker
    proxy = DropClaimReplyProxy(cluster.server.port, b"zqxmark")
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "w1", cluster.model, args=["--prefix", "duogen"])
    cluster.workers.append(w)
    cluster.wait_groups()
    cluster.enqueue("rc", "zqxmark", meta={"fake.fail": "retry"}, max_attempts=3)
    res = cluster.wait_result("rc", timeout=40)
    assert proxy.fired.is_set() and res["error_code"] == b"EXHAUSTED", res
    tries = [ln for ln in w.logs().splitlines() if 'job "rc"' in ln and "left pending for a later attempt" in ln]
    assert len(tries) == 3, tries


def test_a_job_whose_xadd_redis_forgot_keeps_running_after_later_reads(cluster):
    """Redis restarted from a snapshot older than the job's XADD: its entry is gone, and the
    first later job read moved the group's last-delivered-id past it. "Not pending and not
    past last-delivered" then fenced the job's only run (no result ever). An entry gone from
    the stream is forgotten, not acknowledged: the run goes on."""
    w = cluster.worker("w1", args=["--claim-idle-ms", "3000", "--max-inflight", "2"])
    cluster.wait_groups()
    cluster.r.save()                             # the snapshot: no "rb" at all
    cluster.enqueue("rb", " ".join(["w"] * 80), meta={"fake.step_ms": 100}, max_attempts=5)
    wait_until(lambda: cluster.r.hget("duogen:job:rb", "state") == b"running", what="rb running")
    time.sleep(0.5)
    cluster.server.stop(hard=True)
    cluster.server.start()
    cluster.r = cluster.server.client()
    time.sleep(1.5)
    cluster.enqueue("later", "x")                # any later job, read by the group
    cluster.wait_result("later", timeout=20)
    assert cluster.wait_result("rb", timeout=15)["status"] == b"done"
    assert "its lease was lost" not in w.logs()


def test_a_running_entry_deleted_from_the_stream_still_gets_its_result(cluster):
    """XDEL (or a producer's MAXLEN) of a running job's entry: the renewal's XCLAIM drops it
    from the pending list, and the run was fenced as acknowledged: no result ever."""
    w = cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("del", " ".join(["w"] * 40), meta={"fake.step_ms": 100}, max_attempts=5)
    wait_until(lambda: cluster.r.hget("duogen:job:del", "state") == b"running", what="running")
    cluster.r.xdel(cluster.key("jobs"), pending_entry(cluster)["message_id"])
    assert cluster.wait_result("del", timeout=15)["status"] == b"done"
    assert "its lease was lost" not in w.logs()


class SlowKeeperProxy(WireProxy):
    """Once armed, holds the keeper's connection set-up (CLIENT SETNAME <id>:keeper) for
    `delay` s: a keeper whose backoff ends after Redis is back."""

    def __init__(self, port, delay):
        self.armed, self.delay, self.done = threading.Event(), delay, threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        if not from_server and self.armed.is_set() and not self.done.is_set() and b":keeper" in data:
            self.done.set()
            time.sleep(self.delay)
        return True


def test_a_worker_connecting_for_the_first_time_waits_for_the_keepers_too(cluster):
    """The reaper's hold after a reconnect did not cover a worker's first connect: one
    started while Redis was away took a live job over before its keeper was back."""
    from conftest import Worker
    proxy = SlowKeeperProxy(cluster.server.port, 3.0)
    w1 = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "w1", cluster.model,
                args=["--prefix", "duogen", "--claim-idle-ms", "3000", "--max-inflight", "1"])
    cluster.workers.append(w1)
    cluster.wait_groups()
    cluster.enqueue("live", " ".join(["w"] * 150), meta={"fake.step_ms": 100}, max_attempts=1)
    wait_until(lambda: cluster.r.hget("duogen:job:live", "state") == b"running", what="live running")
    cluster.r.save()
    time.sleep(4.0)                              # the snapshot is older than claim_idle_ms
    cluster.server.stop(hard=True)
    proxy.armed.set()
    cluster.server.start()
    cluster.r = cluster.server.client()
    cluster.worker("w2", args=["--claim-idle-ms", "3000"])   # its first connect
    res = cluster.wait_result("live", timeout=40)
    assert res["status"] == b"done" and res["worker"] == b"w1", res
    assert attempt_of(res) == 1


def test_a_connection_breaking_every_few_seconds_does_not_stop_the_reaper(cluster):
    """Each reconnect pushed the reaper's hold 7 s further: a connection breaking more often
    than that never let it run, and a dead worker's job was never taken over."""
    w = cluster.worker("w1")                     # claim_idle 1.5 s, reaper every 0.3 s
    cluster.wait_groups()
    wait_until(lambda: "ready" in w.logs(), what="ready")
    kill_main_connection(cluster, "w1")
    cluster.enqueue("orphan", "x")
    time.sleep(0.05)
    cluster.r.xreadgroup("duogen", "ghost", {cluster.key("jobs"): ">"}, count=1)   # a dead worker's
    end = time.monotonic() + 20
    while time.monotonic() < end and not cluster.result("orphan"):
        time.sleep(4)
        kill_main_connection(cluster, "w1")
    assert cluster.result("orphan"), "the reaper never ran: a connection that broke every 4 s"


def test_a_second_process_under_a_live_worker_id_stops_before_taking_a_job(cluster):
    """Two processes under one worker id are one consumer: each took the other's pending
    entry for its own lost reply and ran the job again, and both wrote one heartbeat hash
    (found by review: cloned hosts with one hostname). The newcomer finds the live one's hash
    beating and stops with 78 before taking anything; the first goes on."""
    w1 = cluster.worker("dup")
    cluster.wait_groups()
    wait_until(lambda: cluster.r.hget("duogen:worker:dup", "state") == b"idle", what="w1 idle")
    first = cluster.r.hget("duogen:worker:dup", "instance")
    assert first and len(first) == 16
    cluster.enqueue("held", " ".join(["w"] * 30), meta={"fake.step_ms": 50})
    wait_until(lambda: cluster.r.hget("duogen:job:held", "state") == b"running", what="running")
    w2 = cluster.worker("dup")
    assert w2.proc.wait(20) == 78
    assert 'worker id "dup" is in use by another live process' in w2.logs()
    assert w1.alive() and cluster.r.hget("duogen:worker:dup", "instance") == first
    res = cluster.wait_result("held", timeout=20)
    assert res["status"] == b"done" and attempt_of(res) == 1
    started = [f for _, f in cluster.r.xrange("duogen:events:held") if f.get(b"type") == b"started"]
    assert len(started) == 1


def test_a_worker_id_whose_process_died_is_taken_over(cluster):
    """A process killed -9 leaves its heartbeat hash and the id's lease in it (until its
    time to live): the next process under the id (systemd's restart) waits for the lease to
    lapse and takes the id over, not exit 78, which systemd would not restart."""
    w1 = cluster.worker("phoenix")
    cluster.wait_groups()
    wait_until(lambda: cluster.r.hget("duogen:worker:phoenix", "state") == b"idle", what="idle")
    w1.kill()
    assert cluster.r.hget("duogen:worker:phoenix", "state") == b"idle"   # still there
    w2 = cluster.worker("phoenix")
    wait_until(lambda: "lapsed: taken over" in w2.logs(), timeout=20, what="takeover")
    cluster.enqueue("after", "hi")
    assert cluster.wait_result("after")["status"] == b"done"
    assert w2.alive()


def test_two_processes_started_together_under_one_id_leave_one(cluster):
    """Started at the same moment: the id's lease (HSETNX) lets one in; the other waits for
    it to lapse, sees it renewed, and stops (78) before taking a job."""
    ws = [cluster.worker("twin") for _ in range(2)]
    wait_until(lambda: sum(not w.alive() for w in ws) == 1, timeout=20, what="one of the two to stop")
    time.sleep(1.0)                               # several beats: the other stays
    gone = [w for w in ws if not w.alive()]
    assert len(gone) == 1 and gone[0].proc.returncode == 78
    cluster.enqueue("twinjob", "hi")
    assert cluster.wait_result("twinjob")["status"] == b"done"


def test_two_processes_under_one_id_started_while_redis_is_away_run_no_job_twice(cluster):
    """Started while Redis was down: the id check at start found no Redis and left the
    lease to the keeper's beats, but the main loop took jobs as soon as Redis answered:
    both processes started the same job (its entry re-taken from the shared consumer's
    list), two "started" events and its text twice in its stream, before one saw the clash
    (found in use). Now the lease is taken before any job."""
    cluster.server.stop()
    ws = [cluster.worker("late", args=["--block-ms", "200"]) for _ in range(2)]
    time.sleep(1.0)                               # both up, both waiting for Redis
    cluster.server.start()
    cluster.enqueue("latejob", " ".join(["w"] * 8), meta={"fake.step_ms": 100})
    assert cluster.wait_result("latejob", timeout=30)["status"] == b"done"
    wait_until(lambda: sum(not w.alive() for w in ws) == 1, timeout=20, what="one of the two to stop")
    assert [w.proc.returncode for w in ws if not w.alive()] == [78]
    started = [e for e in cluster.events("latejob") if e["type"] == b"started"]
    assert len(started) == 1, started
    runs = {l for w in ws for l in w.logs().splitlines() if 'job "latejob"' in l and l.endswith(" started")}
    assert len(runs) == 1, runs   # (the two share a log file: one id)


class GateProxy(WireProxy):
    """Closes every connection at its first bytes until `opened` is set: a Redis away."""

    def __init__(self, port):
        self.opened = threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        return self.opened.is_set()


def test_a_worker_started_while_redis_is_away_waits_out_a_dead_processs_lease(cluster):
    """A crashed worker restarted during a Redis blip: its predecessor's lease (owner
    "deadbeef") still runs for 3 s when Redis answers. The main thread waited for it to
    lapse and took it, but the keeper's first beat had already called it a clash, and the
    worker exited 78 (which systemd does not restart; found by review). The keeper now
    beats only once the main thread holds the lease."""
    from conftest import Worker
    cluster.r.hset("duogen:worker:heir", "owner", "deadbeef")
    cluster.r.pexpire("duogen:worker:heir", 3000)
    proxy = GateProxy(cluster.server.port)
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "heir", cluster.model, args=["--prefix", "duogen"])
    cluster.workers.append(w)
    wait_until(lambda: "Redis is away" in w.logs(), timeout=20, what="the worker up, Redis away")
    proxy.opened.set()
    wait_until(lambda: "lapsed: taken over" in w.logs(), timeout=20, what="the dead process's lease taken over")
    cluster.enqueue("heirjob", "hello")
    assert cluster.wait_result("heirjob", timeout=20)["status"] == b"done"
    assert w.alive() and "is held by another process" not in w.logs().split("lapsed: taken over")[1], w.logs()


def test_a_running_job_whose_entry_is_deleted_is_not_failed_by_another_worker(cluster):
    """XAUTOCLAIM lists a deleted pending entry to any reaper at once, idle or not: a first
    version of the taken index failed a job that was running fine on another worker (found
    by review). The sweep leaves a job that the heartbeat of its worker lists."""
    w1 = cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("alive", " ".join(["w"] * 150), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:alive", "state") == b"running", what="running")
    cluster.worker("w2", args=["--reaper-ms", "100"])
    entry = cluster.r.xrange(cluster.key("jobs"))[0][0]
    cluster.r.xdel(cluster.key("jobs"), entry)
    res = cluster.wait_result("alive", timeout=40)
    assert res["status"] == b"done" and res["worker"] == b"w1", res
    assert [e["type"] for e in cluster.events("alive")].count(b"failed") == 0
    assert w1.alive()


def test_a_job_running_from_a_second_entry_is_not_failed_for_its_first(cluster):
    """The same job id in two entries (a retried XADD): the first given back for a later
    attempt, the second running; the first deleted. The sweep failed the running job, whose
    own result was then thrown away (found by review): a job is live while any worker lists
    it, whichever entry it runs from."""
    cluster.worker("w1", args=["--max-inflight", "4"])   # takes both entries
    cluster.wait_groups()
    first = cluster.enqueue("twice", "x", meta={"fake.fail": "retry"})
    wait_until(lambda: cluster.r.hget("duogen:job:twice", "state") == b"retrying", what="given back")
    cluster.enqueue("twice", " ".join(["w"] * 150), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:twice", "state") == b"running", what="running")
    cluster.r.xdel(cluster.key("jobs"), first)
    res = cluster.wait_result("twice", timeout=40)
    assert res["status"] == b"done", res


def test_a_running_job_whose_job_hash_expired_is_not_failed(cluster):
    """A result_ttl_s shorter than the run lets the job hash expire mid-run: the sweep read
    no worker there and failed the job (found by review); the entry's own field names the
    worker that took it."""
    cluster.worker("w1")
    cluster.wait_groups()
    e = cluster.enqueue("shortttl", " ".join(["w"] * 120), meta={"fake.step_ms": 100}, result_ttl_s=3)
    wait_until(lambda: cluster.r.hget("duogen:job:shortttl", "state") == b"running", what="running")
    cluster.worker("w2")
    cluster.r.xdel(cluster.key("jobs"), e)
    res = cluster.wait_result("shortttl", timeout=40)
    assert res["status"] == b"done" and res["worker"] == b"w1", res


def lost_result(cluster, job_id):
    res = cluster.wait_result(job_id, timeout=30)
    assert res["status"] == b"failed" and res["error_code"] == b"UNAVAILABLE", res
    assert b"was deleted (MAXLEN or XDEL) before an attempt finished" in res["error"], res
    assert cluster.r.hget(f"duogen:job:{job_id}", "state") == b"failed"
    assert [e for e in cluster.events(job_id) if e["type"] == b"failed"]
    assert cluster.r.ttl(f"duogen:events:{job_id}") > 0
    return res


def test_an_entry_trimmed_after_an_attempt_gave_it_back_still_gets_a_result(cluster):
    """A job given back for a later attempt (a passing failure), then trimmed from the
    stream by a producer's MAXLEN: it stayed "retrying" with no result, no event and only a
    count (found by review). The stream's taken index names its job: it fails, saying so."""
    cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("given", "hi", meta={"fake.fail": "retry"}, result_ttl_s=600)
    wait_until(lambda: cluster.r.hget("duogen:job:given", "state") == b"retrying", what="retrying")
    assert cluster.r.hget(cluster.key("jobs") + ":taken", cluster.r.xrange(cluster.key("jobs"))[0][0]) == b"given w1"
    assert cluster.r.hget("duogen:job:given", "ttl_s") == b"600"
    cluster.r.xtrim(cluster.key("jobs"), maxlen=0)
    lost_result(cluster, "given")
    # the job's own TTL, not the worker's default of a day (the sweep read it from the hash)
    assert 0 < cluster.r.ttl(cluster.key("result", "given")) <= 600
    wait_until(lambda: not cluster.r.exists(cluster.key("jobs") + ":taken"), what="the index emptied")
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0


def test_an_entry_trimmed_after_its_worker_died_still_gets_a_result(cluster):
    """The worker dies, the entry is trimmed, and the worker comes back under the same id (as
    systemd restarts it): its own pending list drops the deleted entry without a word
    (XCLAIM), so the taken index's sweep answers the job."""
    w1 = cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("orphaned", " ".join(["w"] * 40), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:orphaned", "state") == b"running", what="running")
    w1.kill()
    cluster.r.xtrim(cluster.key("jobs"), maxlen=0)
    w1 = cluster.worker("w1")
    lost_result(cluster, "orphaned")
    assert "was deleted before an attempt finished: failed" in w1.logs()
    # an entry no attempt ever took is still only counted (nothing names its job)
    cluster.enqueue("normal", "hi")
    assert cluster.wait_result("normal")["status"] == b"done"
    assert not cluster.r.exists(cluster.key("jobs") + ":taken")   # acknowledged: out of the index


def test_passing_failures_run_again_after_claim_idle_not_the_reapers_turn(cluster):
    """Eight jobs that fail for now on a worker of max_inflight 1 whose reaper's turn is ten
    minutes: each is delivered again once it has been idle claim_idle_ms (the reaper is due
    when a given-back entry may be taken), and a scan of the pending list that stopped at
    its COUNT (the one free slot) goes on at the next plan. Both were at reaper_ms: one entry
    a turn (15 s by default), and the jobs took minutes to use up their attempts."""
    w = cluster.worker("w1", args=["--max-inflight", "1", "--claim-idle-ms", "1000", "--reaper-ms", "600000"])
    cluster.wait_groups()
    ids = [f"later-{i}" for i in range(8)]
    for i in ids:
        cluster.enqueue(i, "x", meta={"fake.fail": "retry"}, max_attempts=3)
    for i in ids:   # 3 attempts each, 1 s apart: seconds; the reaper's next turn is in 10 min
        res = cluster.wait_result(i, timeout=60)
        assert res["error_code"] == b"EXHAUSTED" and b"gave up after 3 deliveries" in res["error"], (i, res)
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0
    assert w.alive()


def test_a_dead_workers_entries_are_all_taken_over_by_a_worker_with_one_slot(cluster):
    """A worker killed with four jobs running; another of max_inflight 1, started once they
    have been idle claim_idle_ms, takes all four over one after another: its XAUTOCLAIM
    (COUNT 1) stops after one entry, and the scan goes on when the slot is free again, not
    at the reaper's next turn ten minutes later."""
    w1 = cluster.worker("w1", args=["--max-inflight", "4"])
    cluster.wait_groups()
    ids = [f"orphan-{i}" for i in range(4)]
    for i in ids:
        cluster.enqueue(i, " ".join(["w"] * 200), meta={"fake.step_ms": 100})
    wait_until(lambda: all(cluster.r.hget(f"duogen:job:{i}", "state") == b"running" for i in ids),
               what="all four running")
    w1.kill()
    time.sleep(2.0)                               # idle past claim_idle_ms (1.5 s here)
    cluster.worker("w2", args=["--max-inflight", "1", "--reaper-ms", "600000"])
    for i in ids:
        res = cluster.wait_result(i, timeout=60)
        assert res["status"] == b"done" and attempt_of(res) == 2, (i, res)


def test_a_long_pending_list_of_live_entries_does_not_spin_the_reaper(cluster):
    """Thirty entries pending with another consumer and not idle, a worker of max_inflight 1:
    XAUTOCLAIM looks at COUNT x 10 entries a call and answers a cursor short of the end,
    which the reaper took for "more to look at" and called again at once, the idle wait
    skipped: 55,000 XAUTOCLAIMs in 5 s. Nothing is idle, so nothing is claimed, and the
    reaper keeps its turn (reaper_ms 15 s here): a handful of calls, not thousands."""
    for i in range(30):
        cluster.enqueue(f"held-{i}", "x")
    cluster.r.xgroup_create(cluster.key("jobs"), "duogen", id="0", mkstream=True)
    cluster.r.xreadgroup("duogen", "other", {cluster.key("jobs"): ">"}, count=30)
    w = cluster.worker("w1", args=["--max-inflight", "1", "--claim-idle-ms", "600000", "--reaper-ms", "15000"])
    wait_until(lambda: "reap" in w.logs() or cluster.r.hget("duogen:worker:w1", "state") == b"idle",
               what="the worker up")
    time.sleep(8.0)                               # past the reaper's hold after the first connect
    cluster.r.config_resetstat()
    time.sleep(3.0)
    stats = cluster.r.info("commandstats")
    calls = stats.get("cmdstat_xautoclaim", {}).get("calls", 0)
    reads = stats.get("cmdstat_xreadgroup", {}).get("calls", 0)
    # the idle wait here blocks 200 ms (conftest's --block-ms) and reads both streams: about
    # 15 a second; the spin was 11,000 a second
    assert calls <= 4 and reads <= 100, (calls, reads)
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 30
    assert w.alive()


def test_a_given_back_entry_another_worker_took_does_not_spin_the_reaper(cluster):
    """A job given back for a later attempt and taken meanwhile by another consumer: when
    its time comes our XCLAIM gets nothing (the entry is not idle). The reaper must not stay
    due for it (it would XCLAIM again at once, every plan, until the given-back record is
    dropped a claim_idle_ms later)."""
    w = cluster.worker("w1", args=["--max-inflight", "1", "--claim-idle-ms", "2000", "--reaper-ms", "15000"])
    cluster.wait_groups()
    time.sleep(8.0)                               # past the reaper's hold after the first connect
    cluster.enqueue("taken", "x", meta={"fake.fail": "retry"}, max_attempts=5)
    wait_until(lambda: cluster.r.hget("duogen:job:taken", "state") == b"retrying", what="given back")
    entry = cluster.r.xrange(cluster.key("jobs"))[0][0]
    # the other worker holds it and renews its lease (an XCLAIM every 200 ms), as a live one does
    stop = threading.Event()

    def renew():
        r = redis.Redis(port=cluster.server.port)
        while not stop.is_set():
            r.xclaim(cluster.key("jobs"), "duogen", "thief", 0, [entry], justid=True)
            stop.wait(0.2)
    t = threading.Thread(target=renew)
    t.start()
    try:
        time.sleep(2.5)                           # past the entry's time: the reaper was due
        cluster.r.config_resetstat()
        time.sleep(2.0)
        stats = cluster.r.info("commandstats")
    finally:
        stop.set()
        t.join()
    stats["cmdstat_xclaim"]["calls"] -= 10        # the renewals (about 10 in 2 s)
    claims = stats.get("cmdstat_xclaim", {}).get("calls", 0) + stats.get("cmdstat_xautoclaim", {}).get("calls", 0)
    assert claims <= 10, stats.get("cmdstat_xclaim")   # a spin is thousands
    assert cluster.r.xpending_range(cluster.key("jobs"), "duogen", "-", "+", 1)[0]["consumer"] == b"thief"
    assert w.alive()


class KillAtProxy(WireProxy):
    """Forwards the first client chunk holding `marker`, having SIGKILLed `victim` first: the
    process dies with that chunk sent and nothing after it."""

    def __init__(self, port, marker):
        self.marker = marker
        self.victim = None
        self.armed = threading.Event()
        self.fired = threading.Event()
        super().__init__(port)

    def pass_on(self, data, from_server, conn):
        if not from_server and not self.fired.is_set() and self.marker in data:
            self.armed.wait(10)
            self.fired.set()
            self.victim.kill()
        return True


def test_a_worker_killed_as_it_takes_its_id_leaves_a_lease_that_lapses(cluster):
    """The worker id's lease was HSETNX, then PEXPIRE apart: a worker killed between the two
    left a heartbeat hash with an owner and no time to live, and every restart under that id
    waited, then exited 78 ("held by another process") for good; a reader between them saw
    a live worker's hash with none (a flake of test_heartbeat_outlives_one_timed_out_keeper_command
    under ASan). The two now go in one MULTI/EXEC (PEXPIRE NX)."""
    from conftest import Worker
    proxy = KillAtProxy(cluster.server.port, b"HSETNX")
    w = Worker(cluster.tmp, f"redis://127.0.0.1:{proxy.port}/0", "mortal", cluster.model, args=["--prefix", "duogen"])
    proxy.victim = w.proc
    proxy.armed.set()
    cluster.workers.append(w)
    wait_until(proxy.fired.is_set, timeout=20, what="the worker killed as it sends HSETNX")
    w.proc.wait(10)
    key = "duogen:worker:mortal"
    wait_until(lambda: cluster.r.exists(key), timeout=5, what="the lease written")
    ttl = cluster.r.pttl(key)
    assert 0 < ttl <= 10000, ttl   # heartbeat_ttl_ms: 5000 + the keeper's command timeout 5000
    heir = cluster.worker("mortal")   # the id's owner is dead: its lease lapses, the heir takes it
    wait_until(lambda: "lapsed: taken over" in heir.logs(), timeout=20, what="the dead process's lease taken over")
    cluster.enqueue("mortaljob", "hello")
    assert cluster.wait_result("mortaljob", timeout=20)["status"] == b"done"
    assert heir.alive(), heir.logs()


def test_a_give_back_that_never_came_is_not_said_to_be_uncounted(cluster):
    """A worker stopping notes in the job hash "left for another worker, this attempt not
    counted", then gives the entry back uncounted (XCLAIM RETRYCOUNT). Killed between the two,
    the delivery counted: a job of max_attempts 1 is given up, and its dead letter's only
    reason said the attempt was not counted (as when Redis did not take the give-back, or
    the next worker died before it marked the job). The state such a worker leaves is made here: its
    note, and its delivery of the entry (consumer "gone")."""
    cluster.r.xgroup_create(cluster.key("jobs"), "duogen", id="0", mkstream=True)
    cluster.r.xgroup_create(cluster.key("jobs:high"), "duogen", id="0", mkstream=True)
    cluster.enqueue("cut-short", "hello", max_attempts=1)
    cluster.r.xreadgroup("duogen", "gone", {cluster.key("jobs"): ">"}, count=1)
    cluster.r.hset(cluster.key("job", "cut-short"), mapping={
        "state": "retrying", "worker": "gone", "attempt": "1",
        "error": 'worker "gone" stopped: the job not finished in the drain time (300 ms); left for another worker, '
                 "this attempt not counted"})
    cluster.worker("heir")   # --claim-idle-ms 1500: the entry is taken over, its delivery 2 of 1
    res = cluster.wait_result("cut-short", timeout=30)
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED", res
    err = res["error"].decode()
    assert err.endswith("this attempt not counted; a delivery after that note counted (the give-back did not land, "
                        "or the next worker died before it started the job)"), err


def test_a_lease_taken_from_a_stopped_workers_hash_gets_its_whole_time_to_live(cluster):
    """A clean stop deletes the lease's owner and leaves the hash with its time to live; a
    restart took the lease with HSETNX and PEXPIRE NX, which kept that shrinking time (the
    lease could lapse before the first beat, up to heartbeat_ms after it, renewed it)."""
    first = cluster.worker("again")   # --heartbeat-ms 200: a time to live of 10 s
    cluster.wait_heartbeat("again", "idle")
    assert first.term() == 0
    time.sleep(6)   # about 4 s of it left
    key = "duogen:worker:again"
    assert 0 < cluster.r.pttl(key) < 5000
    second = cluster.worker("again", args=["--heartbeat-ms", "3000"])   # its own: 9000 + 5000 ms
    seen = []
    until = time.time() + 3
    while time.time() < until:
        owner, ttl = cluster.r.hget(key, "owner"), cluster.r.pttl(key)
        if owner:
            seen.append(ttl)
        time.sleep(0.02)
    assert seen and min(seen) > 9000, seen[:10]   # the first beat comes up to 3 s after the lease
    assert second.alive()
