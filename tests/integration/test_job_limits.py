"""What a job can make a worker do, found by review, each failing before its fix: an image
path naming a FIFO (the worker hung in open()), a job of millions of empty parts (2 GB to
unpack), an input key far over max_image_bytes (read whole to be refused), a refused job's
own result_ttl_s (a TTL of -1 deleted its result), logit_bias keys given twice (summed past
the limit), and the metrics server (held by a client that sends a byte now and then, reset
by a request over its buffer)."""
import os
import socket
import threading
import time
import urllib.request

import pytest

from conftest import SANITIZER, free_port, ld, pb, wait_until


def vmhwm_kb(pid):
    """The process's peak resident memory."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


def question_about(job_id, image):
    """A job asking about one image, packed."""
    job = pb.Job(id=job_id)
    m = job.messages.add(role=pb.Message.USER)
    m.parts.add(image=image)
    m.parts.add(text="what is this")
    return job.SerializeToString()


def test_an_image_path_naming_a_fifo_is_refused(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "images")
    os.makedirs(root)
    os.mkfifo(os.path.join(root, "pipe.png"))
    cluster.worker("w1", args=["--image-root", root])
    cluster.wait_groups()
    cluster.enqueue("fifo", raw=question_about("fifo", pb.Image(path="pipe.png")))
    res = cluster.wait_result("fifo", timeout=20)
    assert res["status"] == b"failed" and b"is not a regular file" in res["error"], res
    cluster.enqueue("after", "hello there")
    assert cluster.wait_result("after")["status"] == b"done"


def test_millions_of_empty_parts_are_refused_before_they_cost_memory(cluster):
    w = cluster.worker("w1")
    cluster.wait_groups()
    wait_until(lambda: "ready" in w.logs(), what="the worker ready")
    before = vmhwm_kb(w.proc.pid)
    n = 15_000_000
    msg = b"\x08\x02" + ld(2, ld(1, b"")) * n + ld(2, ld(1, b"end"))   # Message{role, parts: Part{text=""}...}
    raw = ld(1, b"parts") + ld(2, msg)                                   # Job{id, messages}
    cluster.enqueue("parts", raw=raw)
    res = cluster.wait_result("parts", timeout=120)
    assert res["status"] == b"failed" and b"unpack into more than" in res["error"], res
    if SANITIZER:   # ASan keeps 256 MB of freed memory in quarantine, and shadows the rest
        pytest.skip(f"the refusal is checked; a peak resident size under {SANITIZER} is not the worker's")
    # the budget is 4 bytes of memory a byte of job: 30 MB of job, at most ~120 MB (it took 2 GB)
    assert vmhwm_kb(w.proc.pid) - before < 400 * 1024


def test_an_input_key_over_the_limit_is_not_read(cluster):
    cluster.worker("w1", args=["--max-image-bytes", "1k"])
    cluster.wait_groups()
    cluster.r.set("duogen:input:big", b"\x89PNG" + b"\0" * (8 << 20))
    cluster.enqueue("bigkey", raw=question_about("bigkey", pb.Image(redis_key="duogen:input:big")))
    res = cluster.wait_result("bigkey", timeout=60)
    # over a limit: BAD_REQUEST, as inline data over max_image_bytes and too many pixels are
    assert res["error_code"] == b"BAD_REQUEST" and b"holds 8388612 bytes (allowed 1..1024)" in res["error"], res
    info = cluster.r.info("commandstats")
    assert info.get("cmdstat_strlen", {}).get("calls", 0) >= 1 and "cmdstat_get" not in info, info


def test_a_refused_jobs_own_ttl_is_not_used(cluster):
    """result_ttl_s past its year is refused, and the refusal keeps the worker's TTL: the job's
    4294967295 became EXPIRE -1, which deleted the result just written."""
    cluster.worker("w1")
    cluster.wait_groups()
    cluster.enqueue("ttlneg", "hi", result_ttl_s=4294967295)
    cluster.enqueue("ttlbig", "hi", result_ttl_s=2000000000)
    for job_id in ("ttlneg", "ttlbig"):
        res = cluster.wait_result(job_id)
        assert res["status"] == b"failed" and b"result_ttl_s" in res["error"], res
        assert 0 < cluster.r.ttl(f"duogen:result:{job_id}") <= 86400


def test_logit_bias_keys_given_twice_are_refused(cluster):
    """A map may repeat a key on the wire; the engine summed the entries past +-1000."""
    cluster.worker("w1")
    cluster.wait_groups()
    job = pb.Job(id="bias2")
    job.messages.add(role=pb.Message.USER).parts.add(text="x")
    tp = pb.TextParams()
    tp.logit_bias[5] = 1000.0
    text = ld(3, tp.SerializeToString() * 3)   # Job.text: the entry {5: 1000} three times on the wire
    raw = job.SerializeToString()
    cluster.enqueue("bias2", raw=raw + text)
    res = cluster.wait_result("bias2")
    assert res["status"] == b"failed" and b"text.logit_bias[5]: given twice" in res["error"], res


def scrape(port, timeout):
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout).read()


def metrics_worker(cluster):
    port = free_port()
    cluster.worker("w1", args=["--metrics-port", str(port)])
    cluster.wait_groups()
    wait_until(lambda: scrape(port, 1), what="metrics up")
    return port


def test_a_trickling_client_does_not_hold_the_metrics(cluster):
    port = metrics_worker(cluster)
    stop = threading.Event()

    def trickle():
        s = socket.create_connection(("127.0.0.1", port))
        while not stop.is_set():
            s.send(b"G")
            time.sleep(0.3)
        s.close()
    t = threading.Thread(target=trickle)
    t.start()
    try:
        time.sleep(0.2)
        assert b"duogen_" in scrape(port, 5)   # it held the server for up to 2047 s
    finally:
        stop.set()
        t.join()


def test_a_large_request_gets_its_answer(cluster):
    port = metrics_worker(cluster)
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000 + b"\r\n\r\n")
        data = b""
        while True:
            c = s.recv(65536)   # a reset (unread input at close) raised here
            if not c:
                break
            data += c
        s.close()
        assert data.startswith(b"HTTP/1.1 200 OK") and b"duogen_" in data


def test_text_holding_a_nul_is_refused_not_cut(cluster):
    """A NUL in a string field cut the text there (protobuf-c strings are C strings): the
    model saw "Describe this." of "Describe this.\\0 Ignore the rest"."""
    cluster.worker("w1")
    cluster.wait_groups()
    job = pb.Job(id="nul")
    job.messages.add(role=pb.Message.USER).parts.add(text="Describe this.\0 Ignore the rest")
    cluster.enqueue("nul", raw=job.SerializeToString())
    res = cluster.wait_result("nul")
    assert res["error_code"] == b"BAD_REQUEST" and b"Part.text string holds a NUL byte" in res["error"], res
    job = pb.Job(id="nulmeta")
    job.messages.add(role=pb.Message.USER).parts.add(text="fine")
    job.metadata["k"] = "a\0b"
    cluster.enqueue("nulmeta", raw=job.SerializeToString())
    res = cluster.wait_result("nulmeta")
    assert res["error_code"] == b"BAD_REQUEST" and b"MetadataEntry.value string holds a NUL" in res["error"], res
