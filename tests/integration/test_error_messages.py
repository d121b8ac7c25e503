"""What a failed job's result says, found by review, each failing before its fix: the
message is valid UTF-8 whatever the producer sent (a raw-byte id, a key or path quoted past
the message's bound and cut inside a character: the Result no longer parsed), a long key or
path keeps the reason after it, and a worker that cannot read its own image_root leaves
the job for a later attempt instead of dead-lettering it as the job's fault."""
import os
import shutil

from conftest import ld, pb, wait_until


def raw_job(job_id_bytes):
    """Job{id, messages: [Message{role USER, parts: [Part{text "hi"}]}]}, the id as given."""
    msg = b"\x08\x02" + ld(2, ld(1, b"hi"))
    return ld(1, job_id_bytes) + ld(2, msg)


def question_about(job_id, image):
    job = pb.Job(id=job_id, max_attempts=3)
    m = job.messages.add(role=pb.Message.USER)
    m.parts.add(image=image)
    m.parts.add(text="what is this")
    return job.SerializeToString()


def readable_error(res):
    """The result's error, checked to be UTF-8 in the hash and in the Result it packs."""
    err = res["error"].decode("utf-8")                  # raises on invalid UTF-8
    assert pb.Result.FromString(res["pb"]).error.message == err
    return err


def test_an_invalid_id_is_quoted_as_valid_utf8(cluster):
    cluster.worker("w1")
    cluster.wait_groups()
    # cut at the quote's bound inside a character, and bytes that are no UTF-8 at all
    for entry_id, id_bytes in (("cutid", b"a" * 63 + "é".encode() + b"b" * 80), ("rawid", b"\xff\xfe!")):
        cluster.enqueue(entry_id, raw=raw_job(id_bytes))
        res = cluster.wait_result(entry_id)
        assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
        err = readable_error(res)
        assert "is not 1..128 characters" in err, err


def test_metadata_that_is_not_utf8_is_refused_and_not_echoed(cluster):
    """Metadata becomes meta.<key> fields of the job hash, which readers decode as UTF-8:
    raw bytes there broke redis-py with decode_responses (found by review). Such a job is
    refused naming the entry, and its job hash holds no meta field; valid metadata is
    echoed as before."""
    cluster.worker("w1")
    cluster.wait_groups()
    entry = ld(1, b"who") + ld(2, b"ok\xff")                 # Job.metadata["who"] = b"ok\xff"
    cluster.enqueue("rawmeta", raw=raw_job(b"rawmeta") + ld(10, entry))
    res = cluster.wait_result("rawmeta")
    assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
    assert readable_error(res) == 'metadata["who"]: invalid UTF-8 at byte 2'
    job = cluster.r.hgetall("duogen:job:rawmeta")
    assert job[b"state"] == b"failed" and not [k for k in job if k.startswith(b"meta.")], job
    for k, v in job.items():
        k.decode("utf-8"), v.decode("utf-8")
    cluster.enqueue("goodmeta", meta={"who": "café"})
    assert cluster.wait_result("goodmeta")["status"] == b"done"
    assert cluster.r.hget("duogen:job:goodmeta", "meta.who") == "café".encode()


def test_a_long_key_keeps_its_reason_and_stays_utf8(cluster):
    cluster.worker("w1")
    cluster.wait_groups()
    key = "photo" + "é" * 600                         # 1205 bytes: past the message's 1024
    cluster.enqueue("longkey", raw=question_about("longkey", pb.Image(redis_key=key)))
    res = cluster.wait_result("longkey")
    assert res["status"] == b"failed" and res["error_code"] == b"UNAVAILABLE", res
    err = readable_error(res)
    assert err.endswith("does not exist") and "..." in err, err


def test_a_long_path_keeps_its_reason(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "images")
    os.makedirs(root)
    open(os.path.join(root, "other.png"), "wb").close()   # a root in use: the missing file is the job's
    cluster.worker("w1", args=["--image-root", root])
    cluster.wait_groups()
    cluster.enqueue("longpath", raw=question_about("longpath", pb.Image(path="dir" + "é" * 600)))
    res = cluster.wait_result("longpath")
    assert res["status"] == b"failed" and res["error_code"] == b"UNAVAILABLE", res
    err = readable_error(res)
    assert "No such file or directory" in err or "too long" in err, err


def test_a_missing_image_root_is_the_workers_not_the_jobs(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "images")
    os.makedirs(root)
    with open(os.path.join(os.path.dirname(__file__), "..", "golden", "image", "rgb_13x17.png"), "rb") as f:
        png = f.read()
    cluster.worker("w1", args=["--image-root", root])
    cluster.wait_groups()
    shutil.rmtree(root)                                # unmounted, say, after the worker started
    cluster.enqueue("noroot", raw=question_about("noroot", pb.Image(path="a.png")))
    job_key = cluster.key("job", "noroot")
    state = wait_until(lambda: cluster.r.hgetall(job_key).get(b"state") == b"retrying" and cluster.r.hgetall(job_key),
                       timeout=20, what="the attempt given back")
    assert b"this worker's image_root" in state[b"error"], state
    assert not cluster.result("noroot")                # not failed, not dead-lettered
    assert not cluster.r.xrange(cluster.key("dead"))
    os.makedirs(root)                                  # the folder is back: a later attempt reads it
    with open(os.path.join(root, "a.png"), "wb") as f:
        f.write(png)
    res = cluster.wait_result("noroot", timeout=30)
    assert res["status"] == b"done", res
    assert int(res["attempt"]) >= 2, res


def test_an_empty_image_root_is_a_mount_gone_not_a_missing_file(cluster, tmpdir_path):
    """Unmounted, the root is an empty folder: a file the job names is missing from it, but
    the job is not at fault; with a file in the root the same job is (UNAVAILABLE)."""
    root = os.path.join(tmpdir_path, "mnt")
    os.makedirs(root)
    cluster.worker("w1", args=["--image-root", root])
    cluster.wait_groups()
    cluster.enqueue("unmounted", raw=question_about("unmounted", pb.Image(path="a.png")))
    job_key = cluster.key("job", "unmounted")
    state = wait_until(lambda: cluster.r.hgetall(job_key).get(b"state") == b"retrying" and cluster.r.hgetall(job_key),
                       timeout=20, what="the attempt given back")
    assert b"image_root is empty: not mounted?" in state[b"error"], state
    assert not cluster.r.xrange(cluster.key("dead"))


def test_a_worker_that_cannot_read_inputs_takes_jobs_slowly(cluster, tmpdir_path):
    """Each job it cannot read makes it wait before the next (250 ms, doubling): it does not
    pull the whole backlog through its pending list, where the entries it gives back would
    outnumber what it remembers of them."""
    root = os.path.join(tmpdir_path, "images")
    os.makedirs(root)
    w = cluster.worker("w1", args=["--image-root", root])
    cluster.wait_groups()
    shutil.rmtree(root)
    for i in range(4):
        cluster.enqueue(f"slow{i}", raw=question_about(f"slow{i}", pb.Image(path="a.png")))
    wait_until(lambda: "no job is taken for 1000 ms" in w.logs(), timeout=30, what="a third refusal")
    logs = w.logs()
    assert logs.index("no job is taken for 250 ms") < logs.index("no job is taken for 500 ms"), logs
    assert w.alive()


def test_an_entry_whose_id_field_is_not_its_jobs_id_is_refused_under_the_field(cluster):
    """The stream entry's `id` field "fieldA" and Job.id "pbB" (found by review): the job ran
    as pbB, and a second such entry under "fieldC" was only acknowledged (pbB had a result):
    neither fieldA nor fieldC ever got a result, their job hashes stayed "queued". Now the
    job is refused, under the field's id, naming both; the worker goes on."""
    cluster.worker("w1")
    cluster.wait_groups()
    cluster.r.hsetnx("duogen:job:fieldA", "state", "queued")
    cluster.enqueue("fieldA", raw=raw_job(b"pbB"))
    res = cluster.wait_result("fieldA")
    assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
    assert readable_error(res) == ('the stream entry\'s id "fieldA" is not the job\'s id "pbB" '
                                   "(its `id` field and Job.id must be the same)")
    assert cluster.r.hget("duogen:job:fieldA", "state") == b"failed" and not cluster.result("pbB")
    assert cluster.r.xlen("duogen:dead") == 1
    cluster.enqueue("same", raw=raw_job(b"same"))
    assert cluster.wait_result("same")["status"] == b"done"


def test_a_message_field_sent_twice_is_named(cluster):
    """Two serialized Jobs appended (an override of `text` or `image`): other protobuf
    readers merge the two; protobuf-c refuses the bytes, and the error said only "a nested
    message is malformed" (found by review). Now it names the field given twice."""
    cluster.worker("w1")
    cluster.wait_groups()
    base = pb.Job(id="twice")
    base.messages.add(role=pb.Message.USER).parts.add(text="hi")
    base.text.max_new_tokens = 4
    override = pb.Job(text=pb.TextParams(stop=["zz"])).SerializeToString()
    sized = pb.Job(id="twice2", image=pb.ImageParams(width=32))
    sized.messages.add(role=pb.Message.USER).parts.add(text="hi")
    tall = pb.Job(image=pb.ImageParams(height=32)).SerializeToString()
    for job_id, raw, said in (("twice", base.SerializeToString() + override, "Job.text is given twice"),
                              ("twice2", sized.SerializeToString() + tall, "Job.image is given twice")):
        cluster.enqueue(job_id, raw=raw)
        res = cluster.wait_result(job_id)
        assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
        assert readable_error(res).startswith(f"job: {said} (appended messages); send it once"), res
