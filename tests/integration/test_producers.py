"""The example producers of examples/producers/ (Python, Ruby, Go, C) against a real Redis and
a real duogend over the test engine: each enqueues a job with an input image, follows its
events, waits for the result and writes the answer with its pictures. All four must print
the same lines and write the same answer, equal to what the worker stored. A producer whose
toolchain is missing here is skipped with the reason, never passed."""
import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from conftest import BUILD, ROOT, pb, png_bytes, wait_until

PRODUCERS = os.path.join(ROOT, "examples", "producers")
DEPS = "tools/deps.sh installs it"


def png(w, h, seed):
    """A real RGB PNG, w x h, whose pixels depend on seed."""
    return png_bytes(w, h, lambda y: ((x * 7 + y * 3 + seed) % 256 for x in range(w * 3)))


def png_size(data):
    """(width, height) of a PNG after checking every chunk's CRC and inflating its pixels."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, t = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(t + body) & 0xffffffff
        if t == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif t == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    assert len(zlib.decompress(idat)) >= h * (1 + w * 3), "pixel data too short"
    return size


def ruby_missing():
    if not shutil.which("ruby"):
        return f"ruby is not installed ({DEPS}: ruby, ruby-redis, ruby-google-protobuf)"
    p = subprocess.run(["ruby", "-e", 'require "redis"; require "google/protobuf"'], capture_output=True,
                       text=True)
    if p.returncode:
        return f"ruby cannot load redis and google/protobuf ({DEPS}: ruby-redis, ruby-google-protobuf): " \
               + p.stderr.strip().splitlines()[-1]
    return None


def go_missing():
    """The reason the Makefile did not build the Go producer (the same checks as its GO_READY)."""
    for tool, pkg in (("go", "golang-go"), ("protoc-gen-go", "protoc-gen-go")):
        if not shutil.which(tool):
            return f"{tool} is not installed ({DEPS}: {pkg})"
    for path, pkg in (("github.com/gomodule/redigo/redis", "golang-github-gomodule-redigo-dev"),
                      ("google.golang.org/protobuf/proto", "golang-google-protobuf-dev")):
        if not os.path.isdir(os.path.join("/usr/share/gocode/src", path)):
            return f"/usr/share/gocode/src/{path} is missing ({DEPS}: {pkg})"
    return None


def producer(lang):
    """The command line of one producer, or pytest.skip with why it cannot run here."""
    if lang == "python":
        return [sys.executable, os.path.join(PRODUCERS, "python", "producer.py")], {"PYTHONPATH": os.path.join(BUILD, "gen", "python")}
    if lang == "ruby":
        why = ruby_missing()
        if why:
            pytest.skip(why)
        return ["ruby", os.path.join(PRODUCERS, "ruby", "producer.rb")], {"RUBYLIB": os.path.join(BUILD, "gen", "ruby")}
    if lang == "go":
        why = go_missing()
        if why:
            pytest.skip(why)
        return [os.path.join(BUILD, "producers", "go-producer")], {}
    return [os.path.join(BUILD, "producers", "c-producer")], {}


def run(cluster, lang, job_id, out, image, *meta):
    argv, env = producer(lang)
    assert os.path.exists(argv[-1]), f"{argv[-1]} is not built (make builds it when its toolchain is there)"
    args = argv + ["--redis", cluster.server.url, "--id", job_id, "--image", image, "--out", out]
    for m in meta:
        args += ["--meta", m]
    return subprocess.run(args + ["make", "soup"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, **env))


def enqueued_job(cluster, job_id):
    for _entry, fields in cluster.r.xrange("duogen:jobs"):
        if fields[b"id"] == job_id.encode():
            return pb.Job.FromString(fields[b"job"])
    raise AssertionError(f"{job_id} is not on duogen:jobs")


LANGS = ["python", "ruby", "go", "c"]


def runnable():
    """The producers that can run here (the others' reasons are in their own tests' skips)."""
    for lang in LANGS:
        try:
            producer(lang)
        except pytest.skip.Exception:
            continue
        yield lang


@pytest.mark.parametrize("lang", LANGS)
def test_producer_writes_the_answer_with_its_pictures(cluster, tmpdir_path, lang):
    cluster.worker()
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(24, 16, 5))
    out = os.path.join(tmpdir_path, "out")
    job_id = f"{lang}-1"
    p = run(cluster, lang, job_id, out, image, "fake.images=2", "color=red")
    assert p.returncode == 0, p.stdout + p.stderr

    # the job on the stream: the image's bytes, then the text, and the metadata
    job = enqueued_job(cluster, job_id)
    parts = job.messages[0].parts
    assert job.messages[0].role == pb.Message.USER and len(job.messages) == 1
    assert parts[0].image.data == open(image, "rb").read() and parts[1].text == "make soup"
    assert dict(job.metadata) == {"fake.images": "2", "color": "red"}

    # every event, in order, one line each
    steps = lambda n: [f"image {n} started 64x64 steps=4"] + [f"image {n} step {s}/4" for s in range(1, 5)] \
        + [f"image {n} done duogen:image:{job_id}:{n}"]
    assert p.stdout.splitlines() == [f"enqueued {job_id}", "started worker=w1 attempt=1"] + steps(1) + steps(2) \
        + ["done", f"wrote {out}/answer.md and 2 image(s)"]

    # the answer: the worker's Markdown with each image key replaced by its file
    res = cluster.result(job_id)
    assert res["status"] == b"done"
    want = res["text"].decode()
    for n in (1, 2):
        want = want.replace(f"duogen:image:{job_id}:{n}", f"image-{n}.png")
        data = open(os.path.join(out, f"image-{n}.png"), "rb").read()
        assert data == cluster.r.get(f"duogen:image:{job_id}:{n}") and png_size(data) == (64, 64)
    answer = open(os.path.join(out, "answer.md"), encoding="utf-8").read()
    assert answer == want and "Echo: make soup" in answer.replace("\n\n![image 1](image-1.png)\n\n", "") \
        .replace("\n\n![image 2](image-2.png)\n\n", "")
    assert sorted(os.listdir(out)) == ["answer.md", "image-1.png", "image-2.png"]


@pytest.mark.parametrize("lang", LANGS)
def test_producer_follows_images_written_to_files(cluster, tmpdir_path, lang):
    """A worker with output_root: the events and the Result name files, and the producer
    reads its pictures from them (nothing of them is in Redis)."""
    root = os.path.join(tmpdir_path, "files")
    os.makedirs(root)
    cluster.worker(args=["--output-root", root])
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(24, 16, 6))
    out = os.path.join(tmpdir_path, "out")
    job_id = f"{lang}-files"
    p = run(cluster, lang, job_id, out, image, "fake.images=1")
    assert p.returncode == 0, p.stdout + p.stderr
    path = os.path.join(root, job_id, "1.png")
    assert f"image 1 done {path}" in p.stdout.splitlines(), p.stdout
    assert not cluster.r.exists(f"duogen:image:{job_id}:1")
    assert open(os.path.join(out, "image-1.png"), "rb").read() == open(path, "rb").read()
    answer = open(os.path.join(out, "answer.md"), encoding="utf-8").read()
    assert "![image 1](image-1.png)" in answer and path not in answer, answer


@pytest.mark.parametrize("lang", LANGS)
def test_producer_reports_a_failed_job(cluster, tmpdir_path, lang):
    cluster.worker()
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(8, 8, 1))
    p = run(cluster, lang, f"{lang}-bad", os.path.join(tmpdir_path, "out"), image, "fake.fail=error")
    assert p.returncode == 1, p.stdout + p.stderr
    res = cluster.result(f"{lang}-bad")
    assert res["status"] == b"failed"
    failed = f"failed {res['error_code'].decode()}: {res['error'].decode()}"
    assert p.stdout.splitlines()[-2:] == [failed, f"wrote {tmpdir_path}/out/answer.md and 0 image(s)"]
    assert "fake engine: failing as the job asked" in failed


def test_producer_refuses_a_missing_image(cluster, tmpdir_path):
    """Every producer that can run here exits 3 (a file error) without enqueueing anything."""
    ran = 0
    for lang in runnable():
        p = run(cluster, lang, f"{lang}-none", os.path.join(tmpdir_path, "out"), "/nonexistent.png")
        assert p.returncode == 3, f"{lang}: {p.returncode} {p.stdout} {p.stderr}"
        assert "/nonexistent.png" in p.stderr
        ran += 1
    assert ran >= 2 and cluster.r.xlen("duogen:jobs") == 0


def test_producers_refuse_an_id_the_workers_would_not_take(cluster, tmpdir_path):
    """An id outside A-Z a-z 0-9 . _ : - (1..128) would be dead-lettered under an id of the
    worker's own while the producer waits for nothing: every producer refuses it (exit 2)
    and enqueues nothing; a good id gets its job hash "queued" before the XADD."""
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(8, 8, 1))
    ran = 0
    for lang in runnable():
        p = run(cluster, lang, f"{lang} soup", os.path.join(tmpdir_path, "out"), image)
        assert p.returncode == 2, f"{lang}: {p.returncode} {p.stdout} {p.stderr}"
        assert "is not 1..128 characters" in p.stderr, f"{lang}: {p.stderr}"
        ran += 1
    assert ran >= 2 and cluster.r.xlen("duogen:jobs") == 0


def test_producers_refuse_a_url_that_is_not_redis(cluster, tmpdir_path):
    """--redis http://x: Python raised a ValueError traceback (exit 1, "the job failed"), Ruby
    an exception, Go said it as a Redis error (exit 3). Every producer now says the URL's
    form, exit 2, and enqueues nothing."""
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(8, 8, 1))
    ran = 0
    for lang in runnable():
        argv, env = producer(lang)
        p = subprocess.run(argv + ["--redis", "http://x", "--id", f"{lang}-url", "--image", image, "--out",
                                   os.path.join(tmpdir_path, "out"), "make", "soup"],
                           capture_output=True, text=True, timeout=60, env=dict(os.environ, **env))
        assert p.returncode == 2 and "Traceback" not in p.stderr and "redis://" in p.stderr, \
            f"{lang}: {p.returncode} {p.stderr}"
        ran += 1
    assert ran >= 2 and cluster.r.xlen("duogen:jobs") == 0


@pytest.mark.parametrize("lang", LANGS)
def test_producer_marks_the_job_queued_first(cluster, tmpdir_path, lang):
    producer(lang)
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(8, 8, 1))
    # no worker: the job waits, its hash says so
    argv, env = producer(lang)
    args = argv + ["--redis", cluster.server.url, "--id", f"{lang}-q", "--image", image, "--out",
                   os.path.join(tmpdir_path, "out"), "make", "soup"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **env))
    try:
        wait_until(lambda: cluster.r.xlen("duogen:jobs") == 1, what="the job enqueued")
        assert cluster.r.hget(f"duogen:job:{lang}-q", "state") == b"queued"
    finally:
        proc.kill()
        proc.wait(10)
