"""Faults: many workers, killed workers, a restarted Redis, poison jobs. Every job ends
with exactly one result; none is lost, none is done twice."""
import os
import signal
import subprocess
import time

from conftest import BUILD, exposition, free_port, pb, scrape_metrics, wait_until


def results_of(cluster, ids):
    return {j: cluster.result(j) for j in ids}


def test_three_workers_300_jobs_each_exactly_once(cluster):
    for i in range(3):
        cluster.worker(args=["--max-inflight", "2"])
    ids = [f"bulk-{i:03d}" for i in range(300)]
    pipe = cluster.r.pipeline(transaction=False)
    for j in ids:
        pipe.xadd(cluster.key("jobs"), {"id": j, "job": __import__("conftest").make_job(j, f"n {j}").SerializeToString()})
    pipe.execute()
    wait_until(lambda: cluster.r.xlen("duogen:done") >= 300, timeout=120, what="300 results")
    time.sleep(0.5)
    done = [f[b"id"].decode() for _, f in cluster.r.xrange("duogen:done")]
    assert sorted(done) == ids, "every job exactly once in the done stream"
    res = results_of(cluster, ids)
    assert all(r["status"] == b"done" for r in res.values())
    # started events: one per job (no job ran twice)
    for j in ids[:50]:
        assert [e["type"] for e in cluster.events(j)].count(b"started") == 1
    workers = {r["worker"] for r in res.values()}
    assert len(workers) == 3, f"all three workers took jobs: {workers}"
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0


def test_killed_worker_job_taken_over_and_long_job_not_stolen(cluster):
    w1 = cluster.worker("w1")
    cluster.wait_groups()
    # a long job (40 steps x 150 ms = 6 s, four times claim_idle) on w1
    cluster.enqueue("long", "a b c d e f g h i j k l m n o p q r s t u v w x y z aa bb cc dd ee ff gg hh ii jj kk ll mm",
                    meta={"fake.step_ms": 150})
    wait_until(lambda: cluster.r.hget("duogen:job:long", "state") == b"running", what="long job running")
    w2 = cluster.worker("w2")
    res = cluster.wait_result("long", timeout=30)
    # w2's reaper ran all along, but w1 kept its claim fresh: w1 finished, once
    assert res["worker"] == b"w1" and res["status"] == b"done"
    assert [e["type"] for e in cluster.events("long")].count(b"started") == 1

    # now kill w1 in the middle of a job: w2 takes it over after the idle time and finishes
    cluster.enqueue("orphan", "one two three four five six seven eight nine ten", meta={"fake.step_ms": 200})
    wait_until(lambda: cluster.r.hget("duogen:job:orphan", "worker") in (b"w1", b"w2")
               and cluster.r.hget("duogen:job:orphan", "state") == b"running", what="orphan running")
    owner = cluster.r.hget("duogen:job:orphan", "worker").decode()
    victim = w1 if owner == "w1" else w2
    survivor = w2 if victim is w1 else w1
    victim.kill()
    res = cluster.wait_result("orphan", timeout=30)
    assert res["status"] == b"done" and res["worker"] == survivor.id.encode()
    assert pb.Result.FromString(res["pb"]).attempt == 2
    assert "took over 1 abandoned" in survivor.logs()
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0
    assert [f[b"id"] for _, f in cluster.r.xrange("duogen:done")].count(b"orphan") == 1


def test_redis_restart_mid_job_and_down_10s(aof_cluster):
    c = aof_cluster
    w = c.worker("w1")
    c.wait_groups()
    c.enqueue("survivor", " ".join(f"w{i}" for i in range(30)), meta={"fake.step_ms": 100})
    wait_until(lambda: c.r.hget("duogen:job:survivor", "state") == b"running", what="running")
    time.sleep(0.5)
    c.server.stop()               # SHUTDOWN with AOF: the pending entry survives
    time.sleep(10)                # down for 10 s: the worker must live through it
    assert w.alive(), w.logs()[-2000:]
    c.server.start()
    c.r = c.server.client()
    res = c.wait_result("survivor", timeout=30)
    assert res["status"] == b"done"
    assert [f[b"id"] for _, f in c.r.xrange("duogen:done")] == [b"survivor"]
    assert c.r.xpending(c.key("jobs"), "duogen")["pending"] == 0
    # the whole answer made it through, although Redis was away for part of it
    assert res["text"].decode() == "Echo: " + " ".join(f"w{i}" for i in range(30))
    assert "reconnected to Redis" in w.logs()
    # and the worker takes new jobs afterwards
    c.enqueue("after", "hi")
    assert c.wait_result("after")["status"] == b"done"
    assert w.alive()


def test_metrics_through_a_redis_outage(aof_cluster):
    """While Redis is away the queue figures are unknown (-1: they stood at their last value,
    a queue at rest), and a job the engine ended waits in the phase "writing" (it stayed in
    decode, growing: the stuck-job alert's figure)."""
    c = aof_cluster
    port = free_port()
    w = c.worker("ow", args=["--metrics-port", str(port)])
    c.wait_groups()
    key = lambda name, stream="duogen:jobs": f'{name}{{worker="ow",stream="{stream}"}}'   # noqa: E731
    wait_until(lambda: exposition(scrape_metrics(port) or "").get(key("duogen_queue_lag_entries")) == 0,
               what="the lag known")
    c.enqueue("out", " ".join(f"w{i}" for i in range(8)), meta={"fake.step_ms": 100})
    wait_until(lambda: c.r.hget("duogen:job:out", "state") == b"running", what="running")
    c.server.stop()
    # the answer ends about a second in; the result cannot be written
    v = wait_until(lambda: (lambda v: v if v.get('duogen_job_phase_seconds{worker="ow",phase="writing"}', 0) > 1
                            else None)(exposition(scrape_metrics(port) or "")), timeout=15, what="the result waiting")
    assert v['duogen_job_phase_seconds{worker="ow",phase="decode"}'] == 0, v
    assert v['duogen_redis_up{worker="ow"}'] == 0
    for stream in ("duogen:jobs", "duogen:jobs:high"):
        assert v[key("duogen_queue_lag_entries", stream)] == -1, v
        assert v[key("duogen_queue_pending_entries", stream)] == -1, v
    assert w.alive(), w.logs()[-2000:]
    c.server.start()
    c.r = c.server.client()
    assert c.wait_result("out", timeout=30)["status"] == b"done"
    # the keeper and the main loop reconnect each on its own backoff, and the keeper reads the
    # figures every heartbeat: the entry may show pending a beat after its result
    back = lambda v: (v.get(key("duogen_queue_lag_entries")) == 0 and   # noqa: E731
                      v.get(key("duogen_queue_pending_entries")) == 0 and
                      v.get('duogen_job_phase_seconds{worker="ow",phase="writing"}') == 0)
    wait_until(lambda: back(exposition(scrape_metrics(port) or "")), timeout=15, what="the figures back")


def test_bad_jobs_fail_clearly_and_worker_keeps_running(cluster):
    w = cluster.worker(args=["--max-image-bytes", "4096", "--max-job-bytes", "65536"])
    cluster.wait_groups()
    cases = {}
    # malformed protobuf
    cases["garbage"] = cluster.enqueue("garbage", raw=b"\xff\xff\xff\xff not protobuf")
    # a known field with the wrong wire type: field 2 (messages) as a varint
    cases["wrongtype"] = cluster.enqueue("wrongtype", raw=b"\x0a\x09wrongtype\x10\x05")
    # no id anywhere
    job = pb.Job()
    job.messages.add(role=pb.Message.USER).parts.add(text="hi")
    cases["noid"] = cluster.r.xadd(cluster.key("jobs"), {"job": job.SerializeToString()})
    # an image that is not an image
    cluster.enqueue("notimage", "look", images=[b"GIF89a this is no png"])
    # oversize image and oversize job
    cluster.enqueue("bigimage", "look", images=[b"\x89PNG\r\n\x1a\n" + b"\0" * 5000])
    cluster.enqueue("bigjob", "x" * 70000)
    # unknown fields (a newer producer) are fine and do not fail the job
    ok = pb.Job(id="unknownfield")
    ok.messages.add(role=pb.Message.USER).parts.add(text="hello")
    cluster.enqueue("unknownfield", raw=ok.SerializeToString() + b"\xa0\x06\x01")   # field 100, varint 1

    noid_key = "entry-" + cases["noid"].decode()
    expect = {
        "garbage": ("BAD_REQUEST", "not a duogen.v1.Job protobuf"),
        "wrongtype": ("BAD_REQUEST", "field 2 (messages) has wire type 0, expected 2"),
        noid_key: ("BAD_REQUEST", "id: missing"),
        "notimage": ("BAD_IMAGE", "image 1: not a PNG or JPEG"),
        "bigimage": ("BAD_REQUEST", "over max_image_bytes"),
        "bigjob": ("BAD_REQUEST", "over max_job_bytes"),
    }
    for j, (code, msg) in expect.items():
        res = cluster.wait_result(j)
        assert res["status"] == b"failed", j
        assert res["error_code"].decode() == code, (j, res["error_code"])
        assert msg in res["error"].decode(), (j, res["error"])
        r = pb.Result.FromString(res["pb"])
        assert r.error.message == res["error"].decode()
        ev = cluster.events(j)
        assert ev[-1]["type"] == b"failed" and msg in ev[-1]["error"].decode()
    assert cluster.wait_result("unknownfield")["status"] == b"done"
    dead = {f[b"id"].decode(): f for _, f in cluster.r.xrange("duogen:dead")}
    assert set(dead) == set(expect)
    assert dead["garbage"][b"job"] == b"\xff\xff\xff\xff not protobuf"   # the original bytes kept
    assert dead[noid_key][b"entry"] == cases["noid"]
    assert cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0
    assert w.alive()


def test_crashing_job_goes_dead_after_max_attempts(cluster):
    # each attempt kills its worker (a crashing kernel); a supervisor restarts workers
    ws = [cluster.worker(f"w{i}") for i in (1, 2)]
    cluster.wait_groups()
    cluster.enqueue("poison", "boom", meta={"fake.fail": "crash"}, max_attempts=2)
    cluster.enqueue("fine", "ok")

    def supervise():
        for w in ws:
            if not w.alive():
                w.start()
        return cluster.result("poison") or None
    res = wait_until(supervise, timeout=60, every=0.1, what="poison job to be dead-lettered")
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED"
    assert "gave up after 2 deliveries" in res["error"].decode()
    assert "ended without a result" in res["error"].decode()
    dead = cluster.r.xrange("duogen:dead")
    assert len(dead) == 1 and dead[0][1][b"id"] == b"poison" and dead[0][1][b"deliveries"] == b"3"
    assert cluster.wait_result("fine")["status"] == b"done"


def test_job_that_kills_the_parser_goes_dead_after_max_attempts(cluster):
    """A job whose reading kills the worker (crash_on_unpack.c makes protobuf-c abort on it):
    each delivery died in the parser, before the worker could see that max_attempts was
    used up, so the job took down every worker that touched it, for ever. A delivery past
    the limit (read off the wire without unpacking) is now given up unread."""
    shim = os.path.join(cluster.tmp, "crash_on_unpack.so")
    src = os.path.join(os.path.dirname(__file__), "crash_on_unpack.c")
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", "-o", shim, src, "-ldl"], check=True)
    ws = [cluster.worker(f"w{i}", env={"LD_PRELOAD": shim}) for i in (1, 2)]
    cluster.wait_groups()
    cluster.enqueue("parsekill", "CRASH-ON-UNPACK", max_attempts=2)
    cluster.enqueue("fine", "ok")
    restarts = [0]

    def supervise():
        for w in ws:
            if not w.alive():
                restarts[0] += 1
                w.start()
        return cluster.result("parsekill") or None
    res = wait_until(supervise, timeout=60, every=0.1, what="the job to be dead-lettered")
    assert restarts[0] == 2, f"{restarts[0]} worker deaths for a job of max_attempts 2"
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED", res
    assert "none of which got to start the job" in res["error"].decode(), res["error"]
    dead = cluster.r.xrange("duogen:dead")
    assert len(dead) == 1 and dead[0][1][b"id"] == b"parsekill" and dead[0][1][b"deliveries"] == b"3"
    assert b"CRASH-ON-UNPACK" in dead[0][1][b"job"]   # the bytes as sent, for inspection
    assert cluster.wait_result("fine")["status"] == b"done"
    assert all(w.alive() for w in ws)


def test_retryable_failure_retried_then_dead_with_last_error(cluster):
    cluster.worker()
    cluster.wait_groups()
    cluster.enqueue("flaky", "x", meta={"fake.fail": "retry"}, max_attempts=2)
    res = cluster.wait_result("flaky", timeout=30)
    assert res["error_code"] == b"EXHAUSTED"
    assert "last error: fake engine: asked to fail this attempt as retryable" in res["error"].decode()


def test_cancel_and_deadline(cluster):
    cluster.worker()
    cluster.wait_groups()
    cluster.enqueue("cancelme", " ".join(["w"] * 100), meta={"fake.step_ms": 50})
    wait_until(lambda: int(cluster.r.hget("duogen:job:cancelme", "tokens") or 0) >= 3, what="a few tokens")
    cluster.r.set("duogen:cancel:cancelme", 1, ex=60)
    res = cluster.wait_result("cancelme")
    assert res["status"] == b"cancelled"
    assert int(res["images"]) == 0 and 3 <= len(res["text"].split()) < 50
    assert cluster.events("cancelme")[-1]["type"] == b"cancelled"
    assert cluster.r.hget("duogen:job:cancelme", "state") == b"cancelled"

    # expired before it starts: not run at all
    cluster.enqueue("late", "hi", deadline_unix_ms=int(time.time() * 1000) - 1000)
    res = cluster.wait_result("late")
    assert res["status"] == b"expired" and res["text"] == b""
    assert [e["type"] for e in cluster.events("late")] == [b"done"]
    # expires while running: stops at the next step
    cluster.enqueue("slow", " ".join(["w"] * 100), meta={"fake.step_ms": 50},
                    deadline_unix_ms=int(time.time() * 1000) + 600)
    res = cluster.wait_result("slow")
    assert res["status"] == b"expired" and 0 < len(res["text"].split()) < 50
    # cancelled before it starts
    cluster.r.set("duogen:cancel:early", 1)
    cluster.enqueue("early", "hi")
    assert cluster.wait_result("early")["status"] == b"cancelled"


def test_sigterm_drains_or_leaves_pending(cluster):
    w1 = cluster.worker("w1", args=["--drain-ms", "5000"])
    cluster.wait_groups()
    cluster.enqueue("drained", "one two three four five six", meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:drained", "state") == b"running", what="running")
    cluster.enqueue("queued-after", "hi")
    assert w1.term() == 0
    assert cluster.result("drained")["status"] == b"done"   # finished within the drain time
    assert cluster.result("queued-after") == {}              # not taken while stopping
    assert cluster.r.hget("duogen:worker:w1", "state") == b"stopped"

    # a job longer than the drain time is left pending, and another worker finishes it
    w2 = cluster.worker("w2", args=["--drain-ms", "300"])
    assert cluster.wait_result("queued-after")["worker"] == b"w2"
    cluster.enqueue("toolong", " ".join(["w"] * 40), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:toolong", "state") == b"running", what="running")
    assert w2.term() == 0
    assert cluster.result("toolong") == {}
    assert "left pending for another worker" in w2.logs()
    cluster.worker("w3")
    res = cluster.wait_result("toolong", timeout=30)
    assert res["status"] == b"done" and res["worker"] == b"w3"


def test_sighup_and_sigusr_are_said_and_ignored(cluster):
    """Operators send daemons SIGHUP to reload: it killed the worker mid-job with nothing
    logged (found by review). The settings are read at start only: the worker says so on
    standard error and goes on; the job finishes on the same attempt."""
    w = cluster.worker("hup")
    cluster.wait_groups()
    cluster.enqueue("hupped", " ".join(["w"] * 20), meta={"fake.step_ms": 50})
    wait_until(lambda: cluster.r.hget("duogen:job:hupped", "state") == b"running", what="running")
    for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        w.proc.send_signal(sig)
        time.sleep(0.05)
    res = cluster.wait_result("hupped", timeout=20)
    assert res["status"] == b"done" and res["attempt"] == b"1"
    assert w.proc.poll() is None
    assert "SIGHUP ignored: the settings are read at start" in w.logs()
    assert "SIGUSR1/SIGUSR2 ignored" in w.logs()
    assert w.term() == 0


def test_stops_at_the_drain_time_do_not_use_up_attempts(cluster):
    """A rolling restart is the operator's doing: a job longer than drain_ms that meets it
    again and again is given back each time with its delivery uncounted, so that it is not
    dead-lettered as "the worker died" once max_attempts stops have passed (found by review:
    three SIGTERMs gave EXHAUSTED at max_attempts 2). The same worker id each time, as
    systemd restarts a unit: the new process takes its own pending entry back at once."""
    cluster.enqueue("rolled", " ".join(["w"] * 20), meta={"fake.step_ms": 100}, max_attempts=2)
    args = ["--drain-ms", "300", "--claim-idle-ms", "1500"]
    for i in range(3):
        w = cluster.worker("roll", args=args)
        wait_until(lambda: cluster.r.hget("duogen:job:rolled", "state") == b"running", timeout=20,
                   what=f"the job running, restart {i}")
        time.sleep(0.5)
        assert w.term() == 0
        assert "this delivery not counted" in w.logs()
        job = cluster.r.hgetall("duogen:job:rolled")
        assert job[b"state"] == b"retrying" and b"the job not finished in the drain time (300 ms)" in job[b"error"], job
        assert job[b"attempt"] == b"1"
        # pending with no delivery counted, and idle past the takeover time: another
        # worker's reaper would take it at once
        p = cluster.r.xpending_range(cluster.key("jobs"), "duogen", "-", "+", 1)[0]
        assert p["times_delivered"] == 0 and p["time_since_delivered"] >= 1500, p
    assert cluster.result("rolled") == {}
    cluster.worker("roll", args=args)
    res = cluster.wait_result("rolled", timeout=30)
    assert res["status"] == b"done" and res["attempt"] == b"1", res
    assert cluster.r.xlen("duogen:dead") == 0


def test_a_second_stop_signal_is_said_as_such(cluster):
    """A second SIGTERM cuts the drain short: the job is given back as at the drain time, and
    the log and its job hash say the signal did it (they said "not finished in the drain
    time (120000 ms)" of a drain that had lasted half a second; found in use)."""
    cluster.enqueue("cut", " ".join(["w"] * 40), meta={"fake.step_ms": 100})
    w = cluster.worker("cutter", args=["--drain-ms", "120000"])
    wait_until(lambda: cluster.r.hget("duogen:job:cut", "state") == b"running", what="the job running")
    w.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "stopping: no new jobs" in w.logs(), what="the drain begun")
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0
    assert "not finished before a second stop signal cut the drain short: left pending for another worker, " \
           "this delivery not counted" in w.logs(), w.logs()[-2000:]
    assert "drain time" not in w.logs().split("stopping: no new jobs")[1]
    job = cluster.r.hgetall("duogen:job:cut")
    assert job[b"state"] == b"retrying" and b"a second stop signal cut the drain short" in job[b"error"], job


def test_streams_trimmed_and_keys_expire(cluster):
    cluster.worker(args=["--trim-ms", "200", "--jobs-retain-s", "0", "--result-ttl-s", "2",
                         "--events-maxlen", "10", "--done-maxlen", "10", "--dead-maxlen", "10"])
    cluster.wait_groups()
    for i in range(12):
        cluster.enqueue(f"f{i}", "x", meta={"fake.fail": "error"})   # dead-lettered
    for i in range(150):
        cluster.enqueue(f"t{i}", " ".join(["w"] * 30))
    wait_until(lambda: cluster.result("t149"), timeout=60, what="last job")
    assert all(cluster.result(f"f{i}") for i in range(12))
    assert cluster.r.xlen("duogen:dead") == 10
    dead = [e[1][b"id"] for e in cluster.r.xrange("duogen:dead")]   # the last 10 to end (any order)
    assert len(set(dead)) == 10 and set(dead) <= {b"f%d" % i for i in range(12)}, dead
    # the event and done streams hold exactly their caps (a `MAXLEN ~` trims only whole
    # nodes of 100 entries: a cap of 10 was never reached)
    assert cluster.r.xlen("duogen:events:t149") == 10
    assert cluster.r.xlen("duogen:done") == 10
    # acknowledged job entries trimmed away
    wait_until(lambda: cluster.r.xlen(cluster.key("jobs")) < 150, timeout=10, what="job stream trimmed")
    # results, events and images expire with the TTL
    assert 0 < cluster.r.ttl("duogen:result:t149") <= 2
    wait_until(lambda: not cluster.r.exists("duogen:result:t0", "duogen:events:t0", "duogen:job:t0"),
               timeout=10, what="keys to expire")


def test_result_written_by_another_worker_meanwhile_is_kept(cluster):
    """The race the WATCH guards: while this worker runs a job, another (one that held the
    job before its lease lapsed, say) writes the result. The running worker must not
    overwrite it: its EXEC aborts, it only acknowledges the entry."""
    w = cluster.worker()
    cluster.wait_groups()
    cluster.enqueue("raced", " ".join(["w"] * 20), meta={"fake.step_ms": 50})
    wait_until(lambda: cluster.r.hget("duogen:job:raced", "state") == b"running", what="running")
    cluster.r.hset("duogen:result:raced", mapping={"status": "done", "text": "from the other worker"})
    wait_until(lambda: cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0, timeout=20,
               what="the entry to be acknowledged")
    assert cluster.result("raced")["text"] == b"from the other worker"
    assert cluster.r.xlen("duogen:done") == 0      # the other writer's business, not ours
    assert "result written meanwhile" in w.logs() or "already has a result" in w.logs()
    # and the worker goes on with the next job normally
    cluster.enqueue("next", "hi")
    assert cluster.wait_result("next")["status"] == b"done"


def test_redis_loading_its_dataset_is_waited_for(aof_cluster):
    """A restarted Redis accepts connections while it loads its AOF, answering LOADING to
    every command. Found by `make soak`: the worker took that for a refusal (exit 78, which
    systemd does not restart) and dropped the progress events it sent meanwhile. It must
    wait like for an outage: stay up, lose no event, write the result once."""
    c = aof_cluster
    pipe = c.r.pipeline(transaction=False)
    for i in range(3000):   # with key-load-delay 1 ms, about 6 s of loading
        pipe.set(f"pad:{i}", "x")
    pipe.execute()
    w = c.worker("w1")
    c.wait_groups()
    words = " ".join(f"w{i}" for i in range(30))
    c.enqueue("loaded", words, meta={"fake.step_ms": 100})
    wait_until(lambda: int(c.r.hget("duogen:job:loaded", "tokens") or 0) >= 3, what="a few tokens")
    c.server.stop()
    # 1 ms per key loaded; clients answered every 1 kB of AOF read, not every 2 MB
    c.server.extra = ["--key-load-delay", "1000", "--loading-process-events-interval-bytes", "1024"]
    c.server.start()                                 # returns once loading is over
    c.r = c.server.client()
    res = c.wait_result("loaded", timeout=30)
    assert w.alive(), w.logs()[-2000:]
    assert res["status"] == b"done" and res["text"].decode() == "Echo: " + words
    # every progress event written, none dropped (by seq: one sent again after the broken
    # connection of the shutdown may be there twice)
    texts = {int(e["seq"]): e["text"] for e in c.events("loaded") if e["type"] == b"text"}
    assert b"".join(texts[k] for k in sorted(texts)) == res["text"]
    assert sorted(texts) == list(range(2, 33)), "seq 1 is started, then 31 text events"
    assert [f[b"id"] for _, f in c.r.xrange("duogen:done")] == [b"loaded"]
    assert c.r.xpending(c.key("jobs"), "duogen")["pending"] == 0
    assert "not ready: LOADING" in w.logs()


def goes_on(c, w):
    """The worker lived through it: a job after it is done."""
    c.enqueue("after", "hello again")
    assert c.wait_result("after")["status"] == b"done"
    assert w.alive()


def test_writes_redis_never_accepts_fail_the_job_and_the_worker_goes_on(tmpdir_path):
    """A Redis whose proto-max-bulk-len (1mb here; 512mb stock) is below a picture's PNG
    closes the connection each time the worker sends it: the job stayed "running" for ever,
    the worker reconnecting and sending it again ten times a second. After three tries, each
    on a connection that had just answered, the job fails naming the size and the setting,
    what was stored is kept (the text, pictures in files), the rest goes; the worker goes on.
    Pictures of 640x640 noise are about 1.2 MB as PNG."""
    from conftest import Cluster
    c = Cluster(tmpdir_path, extra=["--proto-max-bulk-len", "1mb"])
    try:
        root = os.path.join(tmpdir_path, "out")
        os.makedirs(root)
        w = c.worker("wb", args=["--output-root", root, "--max-inflight", "4"])
        c.wait_groups()
        big = {"fake.images": 1, "fake.noise": 1, "fake.step_ms": 50}
        # in Redis: the image's SET is refused while the job runs (progress) or at its end
        c.enqueue("key", "draw a big thing", meta=big, width=640, height=640, steps=2, image_output=1)
        # in a file, with its bytes inline in the Result: the result is refused
        c.enqueue("inl", "draw a big thing", meta=big, width=640, height=640, steps=2, image_output=2,
                  inline_images=True)
        c.enqueue("small", "draw a small thing", meta={"fake.images": 1, "fake.step_ms": 50}, width=64, height=64,
                  steps=2)
        for j in ("key", "inl"):
            res = c.wait_result(j, timeout=30)
            assert res["status"] == b"failed", (j, res)
            assert res["error_code"] == b"BAD_REQUEST", res
            err = res["error"].decode()
            assert "proto-max-bulk-len" in err and "closed the connection" in err, err
            result = pb.Result.FromString(res["pb"])
            assert result.error.code == pb.Error.BAD_REQUEST
            text = "".join(p.text for p in result.output if p.WhichOneof("kind") == "text")
            assert text.startswith("Echo:"), text
            images = [p.image for p in result.output if p.WhichOneof("kind") == "image"]
            assert all(not im.data for im in images), "inline data dropped"
            assert [e["type"] for e in c.events(j)][-1] == b"failed"
        # sent again after a cut, an event may repeat; none is skipped where none was dropped
        # (the final event kept its seq across the result's four tries; "key" lost the events
        # queued with its picture)
        seqs = {int(e["seq"]) for e in c.events("inl")}
        assert seqs == set(range(1, max(seqs) + 1)), sorted(seqs)
        # the picture in Redis was never stored: the result names none; the file stays named
        images = [p.image for p in pb.Result.FromString(c.result("key")["pb"]).output if p.WhichOneof("kind") == "image"]
        assert images == [] and not c.r.keys(c.key("image", "key", "*"))
        images = [p.image for p in pb.Result.FromString(c.result("inl")["pb"]).output if p.WhichOneof("kind") == "image"]
        assert [im.path for im in images] == [os.path.join(root, "inl", "1.png")]
        assert os.path.getsize(images[0].path) > 1024 * 1024
        dead = {f[b"id"] for _, f in c.r.xrange(c.key("dead"))}
        assert dead == {b"key", b"inl"}, dead
        assert c.wait_result("small")["status"] == b"done"
        # the worker goes on: a job after them is done
        goes_on(c, w)
        logs = w.logs()
        assert "could not be stored" in logs, logs[-3000:]
    finally:
        c.close()


def test_a_result_too_large_even_cut_down_drops_its_text(tmpdir_path):
    """A word of 1.5 MB echoed back: its text event, then the Result holding it, are over a
    proto-max-bulk-len lowered (CONFIG SET) after the job was enqueued. The running job is
    stopped; its result, cut down once and still too large, is cut again: no text, and the
    dead letter without its 1.5 MB copy of the job. It is stored, and the worker goes on."""
    from conftest import Cluster
    c = Cluster(tmpdir_path)
    try:
        w = c.worker("wt", args=["--max-text-bytes", "4M"])
        c.wait_groups()
        c.enqueue("huge", "a b c d " + "x" * 1_500_000, meta={"fake.step_ms": 400})
        wait_until(lambda: c.r.hget(c.key("job", "huge"), "state") == b"running", what="the job running")
        c.r.config_set("proto-max-bulk-len", "1mb")
        res = c.wait_result("huge", timeout=30)
        assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
        assert "the answer's text" in res["error"].decode() and "proto-max-bulk-len" in res["error"].decode()
        assert res["text"] == b""
        assert [p for p in pb.Result.FromString(res["pb"]).output if p.text] == []
        dead = [f for _, f in c.r.xrange(c.key("dead"))]
        assert [(f[b"id"], f[b"job"]) for f in dead] == [(b"huge", b"")]
        goes_on(c, w)
    finally:
        c.close()


def test_a_bad_job_too_large_for_its_dead_letter_keeps_its_own_error(tmpdir_path):
    """A bad job (top_p 0) of 1.2 MB enqueued before proto-max-bulk-len was lowered to 1mb:
    its dead letter's copy of the job is the value refused. The copy goes; the result keeps
    the job's own error and code, the storing trouble said after it, naming the copy's size."""
    from conftest import Cluster
    c = Cluster(tmpdir_path)
    try:
        c.enqueue("bad", "w " * 600_000, top_p=0.0)
        c.r.config_set("proto-max-bulk-len", "1mb")
        w = c.worker("wd", args=["--max-text-bytes", "4M"])
        res = c.wait_result("bad", timeout=30)
        assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
        err = res["error"].decode()
        assert err.startswith("text.top_p"), err
        assert "could not be stored whole" in err and "dead letter's copy of the job" in err, err
        size = len(c.r.xrange(c.key("jobs"))[0][1][b"job"])
        assert f"largest value {size} bytes" in err, (size, err)
        assert [(f[b"id"], f[b"job"]) for _, f in c.r.xrange(c.key("dead"))] == [(b"bad", b"")]
        goes_on(c, w)
    finally:
        c.close()


def test_a_keeper_turned_away_says_the_leases_lapse(cluster):
    """The keeper's own connection refused (maxclients reached: the main connection still
    works) left the leases unrenewed and a live worker's running job was taken over, with
    nothing said but one "Redis unavailable". Now the keeper says what it means, and when it
    renews again. The server's own words are said (its refusal came as the reply to CLIENT
    SETNAME, which was ignored: the log said "Connection reset by peer (is it a TLS port?)"),
    and duogenctl says them too (it died of SIGPIPE writing to the closed socket, exit 141
    with nothing said)."""
    w = cluster.worker("mc")
    cluster.wait_groups()
    cluster.enqueue("long", " ".join(["w"] * 50), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget(cluster.key("job", "long"), "state") == b"running", what="the job running")
    admin = __import__("redis").Redis(port=cluster.server.port, single_connection_client=True)
    keeper = [c for c in admin.client_list() if c["name"] == "mc:keeper"]
    assert len(keeper) == 1, admin.client_list()
    admin.config_set("maxclients", str(len(admin.client_list()) - 1))
    admin.client_kill_filter(_id=keeper[0]["id"])
    wait_until(lambda: "the keeper cannot reach Redis" in w.logs(), what="the keeper's word")
    assert "are not renewed" in w.logs()
    assert "turned the connection away: ERR max number of clients reached (the server's maxclients" in w.logs()
    assert "TLS" not in w.logs()
    p = subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis", cluster.server.url, "stats"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 3 and "turned the connection away: ERR max number of clients reached" in p.stderr, p
    admin.config_set("maxclients", "10000")
    wait_until(lambda: "the keeper renews the running jobs' leases again" in w.logs(), what="renewing again")
    assert cluster.wait_result("long")["status"] == b"done"
    admin.close()


def test_an_entry_too_large_to_read_is_said(tmpdir_path):
    """An entry of 100 KB against client-output-buffer-limit normal 64kb: each read of it
    closes the connection, and its job id is inside it. The worker reconnected ten times a
    second with nothing said but "connection lost"; now it names the setting."""
    from conftest import Cluster
    c = Cluster(tmpdir_path, extra=["--client-output-buffer-limit", "normal 64kb 32kb 2"])
    try:
        w = c.worker("cobl")
        c.wait_groups()
        c.enqueue("wide", "x " * 50_000)
        wait_until(lambda: "reading jobs lost the connection 3 times running" in w.logs(), timeout=20,
                   what="the reads said")
        assert "client-output-buffer-limit" in w.logs()
        assert w.alive()
        c.r.config_set("client-output-buffer-limit", "normal 0 0 0")   # the stock value: it goes on
        assert c.wait_result("wide")["status"] == b"done"
    finally:
        c.close()


def test_a_server_timeout_closing_idle_connections_is_named(tmpdir_path):
    """A server with `timeout 1` closes the worker's connections idle past a second (the
    keeper's between beats): the log said "Server closed the connection" every second and
    nothing of why. Now it names the idle time and the setting; jobs go on."""
    from conftest import Cluster
    c = Cluster(tmpdir_path, extra=["--timeout", "1"])
    try:
        w = c.worker("to", args=["--heartbeat-ms", "2500"])
        c.wait_groups()
        wait_until(lambda: "the server's `timeout` closing idle clients?" in w.logs(), timeout=20, what="the hint")
        c.enqueue("j", "hello")
        assert c.wait_result("j")["status"] == b"done"
    finally:
        c.close()
