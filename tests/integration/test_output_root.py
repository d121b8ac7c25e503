"""Outputs off Redis (issue 19): a worker with output_root writes drawn images as files,
<output_root>/<id>/<n>.png, atomically; the Result and the events carry their paths; a job
chooses Redis or files (Job.image_output); a retried job leaves one set of files, the one
its result names; a file that cannot be written is a passing failure, and the worker lives."""
import os
import struct

from conftest import make_job, pb, wait_until


def png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", head[16:24])


def enqueue(cluster, job_id, n_images, output=None, **kw):
    job = make_job(job_id, "draw two things", meta={"fake.images": n_images, **kw.pop("meta", {})},
                   width=48, height=32, steps=2, **kw)
    if output is not None:
        job.image_output = output
    return cluster.r.xadd(cluster.key("jobs"), {"id": job_id, "job": job.SerializeToString()})


def files_of(root, job_id):
    d = os.path.join(root, job_id)
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_images_are_written_to_files_and_named_by_the_result(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    cluster.worker("fw", args=["--output-root", root])
    cluster.wait_groups()
    enqueue(cluster, "f1", 2)
    res = cluster.wait_result("f1")
    assert res["status"] == b"done", res
    assert files_of(root, "f1") == ["1.png", "2.png"]
    result = pb.Result.FromString(res["pb"])
    paths = [p.image.path for p in result.output if p.WhichOneof("kind") == "image"]
    assert paths == [os.path.join(root, "f1", "1.png"), os.path.join(root, "f1", "2.png")]
    for p in result.output:
        if p.WhichOneof("kind") == "image":
            assert p.image.WhichOneof("source") == "path" and p.image.key == ""
            assert p.image.file == p.image.path
            assert png_size(p.image.path) == (48, 32)
    assert not cluster.r.keys(cluster.key("image", "f1", "*"))   # nothing of them in Redis
    image_events = [e for e in cluster.events("f1") if e["type"] == b"image"]
    assert [e["path"].decode() for e in image_events] == paths
    assert all("key" not in e for e in image_events)
    assert all(p in res["text"].decode() for p in paths)          # the answer's links


def test_inline_images_written_to_files_name_the_files_too(cluster, tmpdir_path):
    """inline_images with images in files: the bytes are Image.data, and the file, which
    Image.path (in the same oneof) cannot name beside them, is Image.file: the Result told
    the producer nothing of the file it must remove."""
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    cluster.worker("fw", args=["--output-root", root])
    cluster.wait_groups()
    enqueue(cluster, "fi", 2, inline_images=True)
    res = cluster.wait_result("fi")
    assert res["status"] == b"done", res
    images = [p.image for p in pb.Result.FromString(res["pb"]).output if p.WhichOneof("kind") == "image"]
    assert [im.file for im in images] == [os.path.join(root, "fi", f"{n}.png") for n in (1, 2)]
    for im in images:
        assert im.WhichOneof("source") == "data" and im.key == ""
        with open(im.file, "rb") as f:
            assert f.read() == im.data


def test_a_job_chooses_redis_on_a_worker_with_files(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    cluster.worker("fw", args=["--output-root", root])
    cluster.wait_groups()
    enqueue(cluster, "r1", 1, output=pb.Job.REDIS)
    res = cluster.wait_result("r1")
    assert res["status"] == b"done"
    assert files_of(root, "r1") == []
    assert cluster.r.get(cluster.key("image", "r1", 1))[:8] == b"\x89PNG\r\n\x1a\n"
    images = [p.image for p in pb.Result.FromString(res["pb"]).output if p.WhichOneof("kind") == "image"]
    assert [im.key for im in images] == [cluster.key("image", "r1", 1)] and images[0].path == ""


def test_files_are_refused_by_a_worker_without_output_root(cluster):
    w = cluster.worker("rw")
    cluster.wait_groups()
    enqueue(cluster, "nofiles", 1, output=pb.Job.FILES)
    res = cluster.wait_result("nofiles")
    assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST"
    assert "image_output: FILES, but this worker writes no files (output_root unset)" in res["error"].decode()
    enqueue(cluster, "default", 1)                  # the default there is Redis
    assert cluster.wait_result("default")["status"] == b"done"
    assert cluster.r.exists(cluster.key("image", "default", 1))
    assert w.alive()


def test_a_retried_job_leaves_one_set_of_files(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(os.path.join(root, "again"))
    # what an earlier attempt could have left: an image past this answer's two, and a
    # temporary file of a worker that died while writing
    for stray in ("5.png", ".3.png.4242.tmp"):
        with open(os.path.join(root, "again", stray), "wb") as f:
            f.write(b"stale")
    w1 = cluster.worker("w1", args=["--output-root", root])
    cluster.wait_groups()
    enqueue(cluster, "again", 2, meta={"fake.step_ms": 150})
    wait_until(lambda: any(e["type"] == b"image" for e in cluster.events("again")), timeout=30, what="a first image")
    w1.kill()                                       # SIGKILL after its first file
    w2 = cluster.worker("w2", args=["--output-root", root])
    res = cluster.wait_result("again", timeout=40)
    assert res["status"] == b"done" and res["worker"] == b"w2", res
    assert pb.Result.FromString(res["pb"]).attempt == 2
    # the earlier attempt's leftovers go once the result is written: just after it shows
    wait_until(lambda: files_of(root, "again") == ["1.png", "2.png"], timeout=10,
               what="one set of files, the earlier attempt's leftovers removed")
    assert w2.alive()


def test_an_image_that_cannot_be_written_is_retried_then_dead_lettered(cluster, tmpdir_path):
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    with open(os.path.join(root, "blocked"), "wb") as f:   # a file where the job's folder goes
        f.write(b"in the way")
    w = cluster.worker("bw", args=["--output-root", root])
    cluster.wait_groups()
    enqueue(cluster, "blocked", 1, max_attempts=2)
    res = cluster.wait_result("blocked", timeout=40)
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED", res
    err = res["error"].decode()
    assert "gave up after 2 deliveries; last error: output_root: cannot write" in err, err
    assert os.path.join(root, "blocked") in err and "Not a directory" in err, err
    assert [f[b"id"] for _, f in cluster.r.xrange("duogen:dead")] == [b"blocked"]
    enqueue(cluster, "fine", 1)                     # the worker goes on
    assert cluster.wait_result("fine")["status"] == b"done"
    assert files_of(root, "fine") == ["1.png"]
    assert w.alive()


def test_an_image_that_cannot_be_written_in_the_answers_last_step_is_not_lost(cluster, tmpdir_path):
    """The answer can end in the step that finishes its last picture (the engine feeds it
    back and samples the end in that step): a picture that could not be written then must
    still fail the attempt, not leave a "done" result without it."""
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    with open(os.path.join(root, "last"), "wb") as f:   # a file where the job's folder goes
        f.write(b"in the way")
    cluster.worker("lw", args=["--output-root", root])
    cluster.wait_groups()
    job = make_job("last", "draw", meta={"fake.images": 1, "fake.end_with_image": "1"}, width=32, height=32,
                   steps=1, max_attempts=1, max_new_tokens=1)
    cluster.r.xadd(cluster.key("jobs"), {"id": "last", "job": job.SerializeToString()})
    res = cluster.wait_result("last", timeout=40)
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED", res
    err = res["error"].decode()
    assert "output_root: cannot write" in err and "Not a directory" in err, err


def test_a_job_given_up_after_its_worker_died_leaves_no_files(cluster, tmpdir_path):
    """A job of max_attempts 1 whose worker died after two of its pictures: the next
    delivery gives it up (EXHAUSTED, dead-lettered) without unpacking it, and the pictures
    the dead attempt wrote stayed for ever beside a result that names none."""
    root = os.path.join(tmpdir_path, "out")
    os.makedirs(root)
    w1 = cluster.worker("w1", args=["--output-root", root])
    cluster.wait_groups()
    # six pictures of two 400 ms steps: the kill comes well before the last (3 s of margin)
    enqueue(cluster, "given-up", 6, max_attempts=1, meta={"fake.step_ms": 400})
    wait_until(lambda: files_of(root, "given-up")[:2] == ["1.png", "2.png"], timeout=30, what="two files")
    w1.kill()
    cluster.worker("w2", args=["--output-root", root])
    res = cluster.wait_result("given-up", timeout=40)
    assert res["status"] == b"failed" and res["error_code"] == b"EXHAUSTED", res
    assert not [p for p in pb.Result.FromString(res["pb"]).output if p.HasField("image")]
    wait_until(lambda: files_of(root, "given-up") == [], timeout=10, what="the dead attempt's files removed")
