"""A job's whole life through one duogend: the group, events, images, result, ack."""
import time

from conftest import pb, wait_until


def test_group_created_and_job_runs_end_to_end(cluster):
    w = cluster.worker()
    # the worker creates the consumer group on both job streams (MKSTREAM)
    wait_until(lambda: cluster.r.exists(cluster.key("jobs")) and cluster.r.exists(cluster.key("jobs", "high")),
               what="job streams")
    groups = cluster.r.xinfo_groups(cluster.key("jobs"))
    assert [g["name"] for g in groups] == [b"duogen"]

    entry = cluster.enqueue("job-1", "draw a cat please", meta={"fake.images": 2}, width=32, height=48, steps=3)
    res = cluster.wait_result("job-1")
    assert res["status"] == b"done"
    assert res["images"] == b"2"
    text = res["text"].decode()
    assert text.startswith("Echo:")
    assert "![image 1](duogen:image:job-1:1)" in text and "![image 2](duogen:image:job-1:2)" in text

    # the protobuf Result agrees with the readable fields
    result = pb.Result.FromString(res["pb"])
    assert result.job_id == "job-1" and result.status == pb.Result.DONE
    assert result.worker_id == "w1" and result.attempt == 1
    kinds = [p.WhichOneof("kind") for p in result.output]
    assert kinds.count("image") == 2
    img = [p.image for p in result.output if p.WhichOneof("kind") == "image"][0]
    assert img.key == "duogen:image:job-1:1" and (img.width, img.height) == (32, 48)
    assert result.usage.generated_tokens == 5 and result.usage.images == 2

    # the PNGs are stored under their keys, with a TTL
    png = cluster.r.get("duogen:image:job-1:1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 0 < cluster.r.ttl("duogen:image:job-1:1") <= 86400

    # events in order, with readable fields and a protobuf twin
    ev = cluster.events("job-1")
    types = [e["type"].decode() for e in ev]
    assert types[0] == "started" and types[-1] == "done"
    assert types[1:] == ["text", "image_started", "step", "step", "step", "image",
                         "text", "image_started", "step", "step", "step", "image",
                         "text", "text", "text", "done"]
    assert [int(e["seq"]) for e in ev] == list(range(1, len(ev) + 1))
    step = [e for e in ev if e["type"] == b"step"][1]
    assert (step["index"], step["step"], step["steps"]) == (b"1", b"2", b"3")
    parsed = pb.Event.FromString(step["pb"])
    assert parsed.WhichOneof("payload") == "step" and parsed.step.step == 2 and parsed.job_id == "job-1"
    assert "".join(e["text"].decode() for e in ev if e["type"] == b"text") == "Echo: draw a cat please"

    # job hash, done stream, acknowledgement
    job = cluster.r.hgetall("duogen:job:job-1")
    assert job[b"state"] == b"done" and job[b"worker"] == b"w1" and job[b"progress"] == b"1"
    done = cluster.r.xrange("duogen:done")
    assert [(f[b"id"], f[b"status"]) for _, f in done] == [(b"job-1", b"done")]
    pending = cluster.r.xpending(cluster.key("jobs"), "duogen")
    assert pending["pending"] == 0
    assert cluster.r.xlen("duogen:dead") == 0
    assert w.alive()
    del entry


def test_high_priority_stream_is_served(cluster):
    cluster.worker()
    cluster.enqueue("urgent", "now", stream="jobs:high")
    assert cluster.wait_result("urgent")["status"] == b"done"


def test_job_with_existing_result_is_acknowledged_without_running(cluster):
    cluster.r.hset(cluster.key("result", "dup"), mapping={"status": "done", "text": "earlier answer"})
    cluster.worker()
    cluster.wait_groups()
    cluster.enqueue("dup", "run me again")
    wait_until(lambda: cluster.r.xpending(cluster.key("jobs"), "duogen")["pending"] == 0
               and cluster.r.xinfo_groups(cluster.key("jobs"))[0]["last-delivered-id"] != b"0-0",
               what="the entry to be acknowledged")
    time.sleep(0.3)
    assert cluster.result("dup")["text"] == b"earlier answer"
    assert cluster.events("dup") == []
    assert cluster.r.xlen("duogen:done") == 0


def test_own_pending_entries_are_read_before_new_ones(cluster):
    # entries delivered to consumer w1 before it started (an earlier life that died)
    cluster.r.xgroup_create(cluster.key("jobs"), "duogen", id="$", mkstream=True)
    cluster.r.xgroup_create(cluster.key("jobs", "high"), "duogen", id="$", mkstream=True)
    cluster.enqueue("old-1", "first")
    cluster.enqueue("old-2", "second")
    cluster.r.xreadgroup("duogen", "w1", {cluster.key("jobs"): ">"}, count=2)
    cluster.enqueue("new-1", "third")
    cluster.worker("w1")
    for j in ("old-1", "old-2", "new-1"):
        cluster.wait_result(j)
    order = [f[b"id"] for _, f in cluster.r.xrange("duogen:done")]
    assert order == [b"old-1", b"old-2", b"new-1"]
    # the re-taken entries count their second delivery
    assert pb.Result.FromString(cluster.result("old-1")["pb"]).attempt == 2
    assert pb.Result.FromString(cluster.result("new-1")["pb"]).attempt == 1


def test_inline_images_and_ttl(cluster):
    cluster.worker()
    cluster.enqueue("inl", "x", meta={"fake.images": 1}, inline_images=True, result_ttl_s=120)
    res = cluster.wait_result("inl")
    result = pb.Result.FromString(res["pb"])
    imgs = [p.image for p in result.output if p.WhichOneof("kind") == "image"]
    assert imgs[0].data[:4] == b"\x89PNG"
    for key in ("duogen:result:inl", "duogen:events:inl", "duogen:image:inl:1", "duogen:job:inl"):
        assert 0 < cluster.r.ttl(key) <= 120, key


def test_metadata_is_echoed_into_the_job_hash(cluster):
    """Job.metadata shows as meta.<key> fields of the job hash (proto/duogen.proto)."""
    cluster.worker()
    cluster.wait_groups()
    cluster.enqueue("tagged", "hi", meta={"customer": "acme", "batch": "7"})
    assert cluster.wait_result("tagged")["status"] == b"done"
    h = cluster.r.hgetall("duogen:job:tagged")
    assert h[b"meta.customer"] == b"acme" and h[b"meta.batch"] == b"7", h


def test_heartbeat_outlives_one_timed_out_keeper_command(cluster):
    """The keeper beats, renews and trims in turn on one connection whose commands time out
    after 5 s: the heartbeat hash's TTL covers three beats and one such timeout, or one slow
    trim made a live worker vanish from `duogenctl stats` and the rollout's health check."""
    cluster.worker("hb")   # --heartbeat-ms 200
    cluster.wait_heartbeat("hb")
    ttl = cluster.r.pttl("duogen:worker:hb")
    assert 6000 < ttl <= 10000, ttl   # 5000 + 5000 when written, a beat (200 ms) ago at most


def test_the_test_engine_takes_a_word_longer_than_its_buffer(cluster):
    """The fake engine wrote each word into 512 bytes and passed the word's whole length on:
    a word of 120000 bytes read past the buffer and killed the worker (SIGSEGV, found in
    use). It now cuts such a word at its buffer."""
    cluster.worker()
    cluster.enqueue("longword", "a" * 120000)
    res = cluster.wait_result("longword", timeout=30)
    assert res["status"] == b"done" and b"a" * 500 in res["text"], res["status"]
    cluster.enqueue("after", "still here")
    assert cluster.wait_result("after")["status"] == b"done"
