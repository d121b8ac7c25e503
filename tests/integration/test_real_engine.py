"""duogend with the real engine (libduogen) on the tiny package: a text job, and the
interleaved job of issue 7 — two input images, a logit bias that makes <BOV> likely,
max_images 2 — end to end through Redis; and parameters whose effect shows: guidance 0 is one
DiT forward per step, temperature 0 is greedy over a sampling default, the schedule."""
import json
import os
import struct
import subprocess
import zlib

import pytest

from conftest import BUILD, ROOT, Worker, pb, png_bytes

VOCAB = os.path.join(ROOT, "tools", "mkmodel", "vocab", "qwen2")
BOV = 151665   # mkmodel adds <BOV> right after the Qwen2 vocabulary's last added token


def png(w, h, seed):
    return png_bytes(w, h, lambda y: ((x * 7 + y * 3 + seed) % 256 for x in range(w) for _ in range(3)))


def real_worker(cluster, wid="real1", defaults=None):
    """A duogend over the tiny package; `defaults` overrides keys of its duogen.json "defaults"."""
    pkg = os.path.join(cluster.tmp, "pkg")
    if not os.path.exists(pkg):
        subprocess.run([os.path.join(BUILD, "mkmodel"), "--preset", "tiny", "--seed", "5", "--out", pkg,
                        "--vocab", VOCAB], check=True, capture_output=True, timeout=120)
    if defaults:
        path = os.path.join(pkg, "duogen.json")
        with open(path) as f:
            manifest = json.load(f)
        manifest["defaults"].update(defaults)
        with open(path, "w") as f:
            json.dump(manifest, f)
    w = Worker(cluster.tmp, cluster.server.url, wid, pkg)
    w.kill()
    w.cmd[0] = os.path.join(BUILD, "duogend")
    w.start()
    cluster.workers.append(w)
    return w


def test_duogend_runs_the_tiny_package(cluster):
    w = real_worker(cluster)
    cluster.enqueue("real-1", "Hello, what is for dinner?", system="You are a cook.", max_new_tokens=12,
                    max_images=0)
    res = cluster.wait_result("real-1", timeout=60)
    assert res["status"] == b"done", res
    r = pb.Result.FromString(res["pb"])
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.generated_tokens <= 12
    assert r.finish_reason in ("stop", "length")
    texts = [e["text"] for e in cluster.events("real-1") if e["type"] == b"text"]
    assert b"".join(texts) == res["text"]
    assert "model loaded: duogen-tiny: qwen2.5-vl" in w.logs()
    # max_inflight 0 came to a number, which the log and the heartbeat say alike
    said = [line.split("max_inflight ")[1].split()[0] for line in w.logs().splitlines() if "max_inflight " in line]
    assert said and int(cluster.r.hget(cluster.key("worker", w.id), "max_inflight")) == int(said[-1]) >= 1, said


def test_interleaved_job_with_two_input_images(cluster):
    real_worker(cluster)
    job = pb.Job(id="inter-1", seed=3)
    m = job.messages.add(role=pb.Message.USER)
    m.parts.add(image=pb.Image(data=png(48, 40, 1)))
    m.parts.add(text="Here are two dishes.")
    m.parts.add(image=pb.Image(data=png(30, 66, 2)))
    m.parts.add(text="Show me how to plate them.")
    job.text.max_new_tokens = 16
    job.text.logit_bias[BOV] = 6.0
    job.image.width, job.image.height, job.image.steps, job.image.max_images = 48, 32, 3, 2
    cluster.enqueue("inter-1", raw=job.SerializeToString())
    res = cluster.wait_result("inter-1", timeout=120)
    assert res["status"] == b"done", res
    r = pb.Result.FromString(res["pb"])
    assert r.usage.images == 2 and res["images"] == b"2"
    text = res["text"].decode()
    assert "![image 1](duogen:image:inter-1:1)" in text and "![image 2](duogen:image:inter-1:2)" in text
    assert "<BOV>" not in text
    for i in (1, 2):
        data = cluster.r.get(f"duogen:image:inter-1:{i}")
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        w, h = struct.unpack(">II", data[16:24])
        assert (w, h) == (48, 32)
        assert b"duogen:job" in data and b"inter-1" in data     # the PNG's text chunks
    types = [e["type"].decode() for e in cluster.events("inter-1")]
    assert types[0] == "started" and types[-1] == "done"
    # each image: image_started, 3 steps, image; nothing else in between
    body = ",".join(types[1:-1])
    assert body.count("image_started,step,step,step,image") == 2, body
    assert r.timings.diffusion_ms > 0 and r.timings.vae_ms > 0 and r.timings.vision_ms > 0
    # the second image finds both inputs in the latent cache; the first drawn one is encoded
    # from its pixels, as a later job that sends its PNG back would have it
    assert r.usage.cached_latents == 2


def pixels(data):
    """A PNG's header and pixel data (IHDR, inflated IDAT), without its text chunks (which
    carry the job id)."""
    out, at = [], 8
    idat = b""
    while at < len(data):
        n, = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + n]
        if kind == b"IHDR":
            out.append(body)
        elif kind == b"IDAT":
            idat += body
        at += 12 + n
    return out[0] + zlib.decompress(idat)


def follow_up(job_id, question, images, answer):
    """The conversation so far (question; the earlier answer: its drawn PNGs, then its text)
    and a new question; the answer draws one image."""
    job = pb.Job(id=job_id, seed=4)
    job.messages.add(role=pb.Message.USER).parts.add(text=question)
    a = job.messages.add(role=pb.Message.ASSISTANT)
    for im in images:
        a.parts.add(image=pb.Image(data=im))
    a.parts.add(text=answer)
    job.messages.add(role=pb.Message.USER).parts.add(text="Now slice it.")
    job.text.max_new_tokens = 6
    job.text.logit_bias[BOV] = 100.0
    job.image.width, job.image.height, job.image.steps, job.image.max_images = 32, 48, 3, 1
    return job.SerializeToString()


def test_follow_up_with_drawn_pngs_is_the_same_on_a_fresh_worker(cluster):
    """Issue 14: a job that sends the worker's own PNGs back gets the same answer on the
    worker that drew them (its caches hold that job's blocks and latents) and on a fresh
    worker."""
    a = real_worker(cluster, "warm")
    question = "Draw a pancake, twice."
    job = pb.Job(id="draw-1", seed=4)
    job.messages.add(role=pb.Message.USER).parts.add(text=question)
    job.text.max_new_tokens = 8
    job.text.logit_bias[BOV] = 100.0      # both images first
    job.image.width, job.image.height, job.image.steps, job.image.max_images = 32, 48, 3, 2
    cluster.enqueue("draw-1", raw=job.SerializeToString())
    assert cluster.wait_result("draw-1", timeout=120)["status"] == b"done"
    pngs = [cluster.r.get(f"duogen:image:draw-1:{i}") for i in (1, 2)]
    answer = b"".join(e["text"] for e in cluster.events("draw-1") if e["type"] == b"text").decode()

    def run(job_id):
        cluster.enqueue(job_id, raw=follow_up(job_id, question, pngs, answer))
        res = cluster.wait_result(job_id, timeout=120)
        assert res["status"] == b"done", res
        text = b"".join(e["text"] for e in cluster.events(job_id) if e["type"] == b"text")
        return pb.Result.FromString(res["pb"]), text, pixels(cluster.r.get(f"duogen:image:{job_id}:1"))

    warm, warm_text, warm_px = run("follow-warm")
    assert a.term() == 0
    real_worker(cluster, "fresh")
    fresh, fresh_text, fresh_px = run("follow-fresh")
    assert warm.usage.cached_prompt_tokens > 0 and warm.usage.cached_vision == 2
    assert fresh.usage.cached_prompt_tokens == 0 and fresh.usage.cached_vision == 0
    assert warm_text == fresh_text and warm_px == fresh_px


def drawing_job(job_id, seed=3, **image):
    """One 32x32 image in 3 steps, <BOV> forced first; `image` sets more ImageParams."""
    job = pb.Job(id=job_id, seed=seed)
    job.messages.add(role=pb.Message.USER).parts.add(text="Draw a lemon.")
    job.text.max_new_tokens = 4
    job.text.logit_bias[BOV] = 100.0
    job.image.width, job.image.height, job.image.steps, job.image.max_images = 32, 32, 3, 1
    for k, v in image.items():
        setattr(job.image, k, v)
    return job.SerializeToString()


def test_guidance_zero_is_one_dit_forward_per_step(cluster):
    real_worker(cluster)   # the tiny package's default guidance is 4
    cluster.enqueue("cfg-default", raw=drawing_job("cfg-default"))
    cluster.enqueue("cfg-zero", raw=drawing_job("cfg-zero", guidance_scale=0.0))
    cluster.enqueue("no-images", raw=drawing_job("no-images", max_images=0))
    forwards = {}
    for job_id in ("cfg-default", "cfg-zero", "no-images"):
        res = cluster.wait_result(job_id, timeout=120)
        assert res["status"] == b"done", res
        forwards[job_id] = (pb.Result.FromString(res["pb"]).usage.dit_forwards, res["images"])
    assert forwards["cfg-default"] == (6, b"1")   # 3 steps, conditional and unconditional
    assert forwards["cfg-zero"] == (3, b"1")      # 3 steps, the conditional branch alone
    assert forwards["no-images"] == (0, b"0")     # max_images 0: <BOV> banned from the start


def test_temperature_zero_is_greedy_over_a_sampling_default(cluster):
    real_worker(cluster, defaults={"temperature": 1.0})
    for seed in (1, 2):
        for temperature in (None, 0.0):
            job = pb.Job(id=f"t{seed}-{temperature}", seed=seed)
            job.messages.add(role=pb.Message.USER).parts.add(text="Name a soup.")
            job.text.max_new_tokens = 12
            job.image.max_images = 0
            if temperature is not None:
                job.text.temperature = temperature
            cluster.enqueue(job.id, raw=job.SerializeToString())
    text = {}
    for seed in (1, 2):
        for temperature in (None, 0.0):
            res = cluster.wait_result(f"t{seed}-{temperature}", timeout=60)
            assert res["status"] == b"done", res
            text[seed, temperature] = res["text"]
    assert text[1, 0.0] == text[2, 0.0]       # greedy: the seed does not matter
    assert text[1, None] != text[2, None]     # the package's temperature 1 samples


def test_schedule_default_is_the_packages_and_karras_differs(cluster):
    real_worker(cluster)   # mkmodel's packages: shift 5 and no "schedule", so shifted
    jobs = {"default": {}, "shifted": {"schedule": pb.ImageParams.SHIFTED},
            "shift5": {"shift": 5.0}, "karras": {"schedule": pb.ImageParams.KARRAS}}
    for name, image in jobs.items():
        cluster.enqueue(f"sched-{name}", raw=drawing_job(f"sched-{name}", **image))
    seen = {}
    for name in jobs:
        res = cluster.wait_result(f"sched-{name}", timeout=120)
        assert res["status"] == b"done" and res["images"] == b"1", res
        seen[name] = pixels(cluster.r.get(f"duogen:image:sched-{name}:1"))
    assert seen["default"] == seen["shifted"] == seen["shift5"]
    assert seen["karras"] != seen["default"]


def memory_cgroup(name):
    """A memory cgroup of our own beside this process's (v1: the memory controller's
    hierarchy; v2: a child where the memory controller is enabled), as (its folder, the limit
    file); None with the reason where this machine gives none (not root, no writable tree)."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [p for i, c, p in lines if "memory" in c.split(",")]
    v2 = [p for i, c, p in lines if i == "0" and c == ""]
    if v1:
        parent, limit = "/sys/fs/cgroup/memory" + v1[0], "memory.limit_in_bytes"
    elif v2:
        parent, limit = "/sys/fs/cgroup" + v2[0], "memory.max"
    else:
        return None, "no memory cgroup in /proc/self/cgroup"
    path = os.path.join(parent, name)
    try:
        os.mkdir(path)
    except OSError as e:
        return None, f"cannot make a cgroup under {parent}: {e.strerror}"
    if not os.path.exists(os.path.join(path, limit)):
        os.rmdir(path)
        return None, f"{parent} has no memory controller for its children (v2: subtree_control)"
    return (path, limit), None


def test_max_inflight_from_the_memory_within_a_cgroup_limit(cluster):
    """max_inflight 0 sizes the KV by the memory free to the worker: under a cgroup memory
    limit (a unit's MemoryMax=, a container's limit) that is the limit's room, not the host's
    MemAvailable, which it read before. A worker in a cgroup of 2 GiB (room for a sanitizer's
    shadow memory) says what it came to."""
    with open("/proc/meminfo") as f:
        host = next(int(line.split()[1]) << 10 for line in f if line.startswith("MemAvailable:"))
    if host < 4 << 30:
        pytest.skip(f"the host has {host >> 20} MiB free: no room to tell a 2 GiB limit from it")
    cg, why = memory_cgroup(f"duogen-test-{os.getpid()}")
    if not cg:
        pytest.skip(why)
    path, limit = cg
    try:
        with open(os.path.join(path, limit), "w") as f:
            f.write(str(2 << 30))
        w = real_worker(cluster, wid="limited")
        w.kill()

        def join_cgroup():   # in the child, before exec: the worker starts inside the limit
            with open(os.path.join(path, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))

        w.proc = subprocess.Popen(w.cmd, stdout=w.log, stderr=subprocess.STDOUT, env=w.env, preexec_fn=join_cgroup)
        cluster.enqueue("limited-1", "Hello", max_new_tokens=4, max_images=0)
        assert cluster.wait_result("limited-1", timeout=60)["status"] == b"done"
        said = [line for line in w.logs().splitlines() if "max_inflight" in line and "from the memory" in line]
        assert said, w.logs()[-2000:]
        free_gib = float(said[-1].split("from the memory: ")[1].split(" GiB")[0])
        # what the worker saw free: within the cgroup's 2 GiB less what the loaded worker
        # already uses (the host has 4 GiB or more free; a figure above 2 is the host's)
        assert 0 < free_gib < 2.0, said[-1]
    finally:
        for w in cluster.workers:
            w.kill()
        os.rmdir(path)
