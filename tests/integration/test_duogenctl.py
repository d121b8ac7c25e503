"""duogenctl against a real Redis and worker: enqueue/wait/out, watch, result, cancel,
stats, dead list and requeue."""
import os
import struct
import subprocess
import zlib

from conftest import BUILD, wait_until

CTL = os.path.join(BUILD, "duogenctl")


def tiny_png(w=3, h=2):
    raw = b"".join(b"\0" + bytes([10, 20, 30] * w) for _ in range(h))
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def ctl(cluster, *args, timeout=30):
    return subprocess.run([CTL, "--redis", cluster.server.url] + list(args), capture_output=True,
                          text=True, timeout=timeout)


def test_enqueue_wait_out_result_watch(cluster, tmpdir_path):
    cluster.worker()
    img = os.path.join(tmpdir_path, "in.png")
    with open(img, "wb") as f:
        f.write(tiny_png())
    out = os.path.join(tmpdir_path, "out")
    p = ctl(cluster, "enqueue", "--id", "ctl-1", "--image", img, "--param", "width=32", "--param", "height=16",
            "--param", "meta.fake.images=2", "--param", "steps=2", "--out", out, "make", "soup")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("ctl-1\n")
    assert "Echo: make soup" in p.stdout.replace("\n[image 1: duogen:image:ctl-1:1]\n", "").replace(
        "\n[image 2: duogen:image:ctl-1:2]\n", "")
    md = open(os.path.join(out, "answer.md")).read()
    assert "![image 1](image-1.png)" in md and "![image 2](image-2.png)" in md
    assert open(os.path.join(out, "image-2.png"), "rb").read()[:4] == b"\x89PNG"

    p = ctl(cluster, "result", "ctl-1")
    assert p.returncode == 0 and "status: done" in p.stdout and "images: 2" in p.stdout
    p = ctl(cluster, "watch", "ctl-1")
    lines = p.stdout.splitlines()
    assert lines[0] == "started worker=w1 attempt=1"
    assert "step index=1 2/2" in lines and lines[-1] == "done (stop)"


def test_cancel_stats_dead_requeue(cluster):
    cluster.worker()
    cluster.wait_groups()
    p = ctl(cluster, "enqueue", "--id", "slow", "--param", "meta.fake.step_ms=100", *(["w"] * 60))
    assert p.returncode == 0
    wait_until(lambda: cluster.r.hget("duogen:job:slow", "state") == b"running", what="running")
    # the heartbeat shows the running job within a heartbeat interval
    out = wait_until(lambda: (lambda o: o if "running" in o else None)(ctl(cluster, "stats").stdout),
                     what="stats to show the running job")
    assert "stream duogen:jobs" in out and "pending 1" in out
    assert [l for l in out.splitlines() if l.strip().startswith("w1")][0].split()[-1] == "slow"
    assert ctl(cluster, "cancel", "slow").returncode == 0
    assert cluster.wait_result("slow")["status"] == b"cancelled"
    assert ctl(cluster, "result", "slow").returncode == 1

    # a job that fails as bad input lands in the dead letters; requeue runs it again
    p = ctl(cluster, "enqueue", "--id", "bad", "--param", "meta.fake.fail=error", "x")
    assert cluster.wait_result("bad")["status"] == b"failed"
    p = ctl(cluster, "dead", "list")
    assert "bad" in p.stdout and "fake engine: failing as the job asked" in p.stdout
    p = ctl(cluster, "stats")
    assert "dead letters 1" in p.stdout
    p = ctl(cluster, "dead", "requeue", "bad")
    assert p.returncode == 0 and "requeued bad" in p.stdout
    wait_until(lambda: len(cluster.events("bad")) and cluster.result("bad"), what="second run")
    assert [e["type"] for e in cluster.events("bad")].count(b"started") == 2
    assert ctl(cluster, "enqueue", "--param", "bogus=1", "x").returncode == 2
    # an id the workers would refuse is refused here, before anything is enqueued
    queued = cluster.r.xlen("duogen:jobs")
    p = ctl(cluster, "enqueue", "--id", "a<b", "--wait", "x")
    assert p.returncode == 2 and 'id "a<b" is not 1..128 characters' in p.stderr
    assert cluster.r.xlen("duogen:jobs") == queued
