"""duogenctl against a real Redis and worker: enqueue/wait/out, watch, result, cancel,
stats, dead list and requeue."""
import os
import pty
import subprocess
import time

from conftest import BUILD, pb, png_bytes, wait_until

CTL = os.path.join(BUILD, "duogenctl")


def tiny_png(w=3, h=2):
    return png_bytes(w, h, lambda y: [10, 20, 30] * w)


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
    p = ctl(cluster, "enqueue", "--id", "slow", "--param", "meta.fake.step_ms=100", "--param", "result_ttl_s=300",
            *(["w"] * 60))
    assert p.returncode == 0
    wait_until(lambda: cluster.r.hget("duogen:job:slow", "state") == b"running", what="running")
    # the heartbeat shows the running job within a heartbeat interval
    out = wait_until(lambda: (lambda o: o if "running" in o else None)(ctl(cluster, "stats").stdout),
                     what="stats to show the running job")
    assert "stream duogen:jobs" in out and "pending 1" in out
    assert [l for l in out.splitlines() if l.strip().startswith("w1")][0].split()[-1] == "slow"
    assert ctl(cluster, "cancel", "slow").returncode == 0
    # the cancel key lives as long as the job's keys (it outlived them by a day)
    assert 0 < cluster.r.ttl("duogen:cancel:slow") <= 300
    assert cluster.wait_result("slow")["status"] == b"cancelled"
    assert ctl(cluster, "result", "slow").returncode == 1
    # an ended job has nothing to cancel; an id no one knows is named, the key set anyway
    p = ctl(cluster, "cancel", "slow")
    assert p.returncode == 1 and "has ended already (cancelled)" in p.stderr
    p = ctl(cluster, "cancel", "no-such-job")
    assert p.returncode == 0 and 'no job "no-such-job" is known' in p.stderr

    # a job that fails as bad input lands in the dead letters; requeue runs it again
    p = ctl(cluster, "enqueue", "--id", "bad", "--param", "meta.fake.fail=error", "x")
    assert cluster.wait_result("bad")["status"] == b"failed"
    p = ctl(cluster, "dead", "list")
    assert "bad" in p.stdout and "fake engine: failing as the job asked" in p.stdout
    p = ctl(cluster, "stats")
    assert "dead letters 1" in p.stdout
    p = ctl(cluster, "dead", "requeue", "bad")
    assert p.returncode == 0 and "requeued bad" in p.stdout
    # the old result, events and job hash go with the requeue: `watch` follows the new run only
    assert cluster.r.hget("duogen:job:bad", "state") in (b"queued", b"running", b"failed")
    wait_until(lambda: cluster.result("bad"), what="second run")
    types = [e["type"] for e in cluster.events("bad")]
    assert types == [b"started", b"failed"], types
    p = ctl(cluster, "watch", "bad")
    assert p.returncode == 1 and p.stdout.splitlines()[0] == "started worker=w1 attempt=1"
    assert ctl(cluster, "enqueue", "--param", "bogus=1", "x").returncode == 2
    # an id the workers would refuse is refused here, before anything is enqueued
    queued = cluster.r.xlen("duogen:jobs")
    p = ctl(cluster, "enqueue", "--id", "a<b", "--wait", "x")
    assert p.returncode == 2 and 'id "a<b" is not 1..128 characters' in p.stderr
    assert cluster.r.xlen("duogen:jobs") == queued


def test_requeue_keeps_the_high_stream(cluster):
    """A dead letter from duogen:jobs:high went back to duogen:jobs and lost its priority
    (found by review): requeue follows the letter's `stream` where it is the high one."""
    cluster.worker()
    cluster.wait_groups()
    assert ctl(cluster, "enqueue", "--high", "--id", "hi-bad", "--param", "meta.fake.fail=error", "x").returncode == 0
    assert cluster.wait_result("hi-bad")["status"] == b"failed"
    assert cluster.r.xrange("duogen:dead")[0][1][b"stream"] == b"duogen:jobs:high"
    high, normal = cluster.r.xlen("duogen:jobs:high"), cluster.r.xlen("duogen:jobs")
    p = ctl(cluster, "dead", "requeue", "hi-bad")
    assert p.returncode == 0 and "requeued hi-bad" in p.stdout
    assert cluster.r.xlen("duogen:jobs:high") == high + 1 and cluster.r.xlen("duogen:jobs") == normal
    wait_until(lambda: cluster.result("hi-bad"), what="second run")


def test_param_values_are_checked_not_wrapped(cluster):
    """A --param value out of its type's range, or not a number, is refused (exit 2), never
    wrapped around or read as 0 (seed=abc was seed 0, steps= -1 was 4294967295, top_k=2^32
    was 0: off); inline_images takes 1, 0, true or false only."""
    for kv in ("seed=abc", "seed=-1", "seed=18446744073709551616", "max_new_tokens=4294967297",
               "top_k=4294967296", "width=4294967360", "steps= -1", "steps=+3", "inline_images=yes",
               "bias.2147483648=1", "bias.x=1"):
        p = ctl(cluster, "enqueue", "--param", kv, "x")
        assert p.returncode == 2 and "--param" in p.stderr, (kv, p.returncode, p.stderr)
    assert cluster.r.xlen("duogen:jobs") == 0
    p = ctl(cluster, "enqueue", "--id", "big", "--param", "seed=18446744073709551615", "--param",
            "inline_images=false", "x")
    assert p.returncode == 0, p.stderr
    fields = cluster.r.xrange("duogen:jobs")[-1][1]
    assert pb.Job.FromString(fields[b"job"]).seed == 2**64 - 1


def test_long_text_is_enqueued_whole(cluster):
    """Text past 64 KiB (it was cut there, and a word past it wrote out of bounds)."""
    words = ["w%06d" % i for i in range(12000)]   # 95,999 bytes with the spaces
    p = ctl(cluster, "enqueue", "--id", "long", *words)
    assert p.returncode == 0, p.stderr
    job = pb.Job.FromString(cluster.r.xrange("duogen:jobs")[-1][1][b"job"])
    assert job.messages[-1].parts[-1].text == " ".join(words)


def test_wait_prints_the_answer_once_after_a_retry(cluster):
    """--wait with stdout not a terminal prints the answer of the attempt that ended, once: a
    worker killed mid-job made the first attempt's beginning print before the second's."""
    w = cluster.worker("k1")
    cluster.wait_groups()
    proc = subprocess.Popen([CTL, "--redis", cluster.server.url, "enqueue", "--id", "retried", "--wait",
                             "--param", "meta.fake.step_ms=150", *["w%d" % i for i in range(12)]],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: int(cluster.r.hget("duogen:job:retried", "tokens") or 0) >= 3, what="a few tokens")
    w.kill()
    cluster.worker("k2")   # takes the job over after claim_idle_ms
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert cluster.r.hget("duogen:job:retried", "attempt") == b"2"   # the answer came from a second attempt
    answer = out.splitlines()[1:]   # after the id
    assert answer == ["Echo: " + " ".join("w%d" % i for i in range(12))], out


def test_trimmed_events_give_the_results_text(cluster):
    """Events trimmed past events_maxlen before --wait read them: the answer printed is the
    result's text (with a note on stderr), not its tail."""
    cluster.worker("t1", args=["--events-maxlen", "10"])
    cluster.wait_groups()
    words = ["w%d" % i for i in range(300)]   # far more events than the cap of 10
    p = ctl(cluster, "enqueue", "--id", "trimmed", *words)
    assert p.returncode == 0
    cluster.wait_result("trimmed")
    p = ctl(cluster, "enqueue", "--id", "trimmed", "--wait", *words)   # the same id: acknowledged, its result kept
    assert p.returncode == 0, p.stderr
    assert "were trimmed before they were read" in p.stderr
    assert p.stdout.splitlines()[1:] == ["Echo: " + " ".join(words)], p.stdout


def test_out_with_images_in_files_and_inline(cluster, tmpdir_path):
    """A worker with output_root and a job with inline_images: the Result's images carry their
    bytes and no path, and the answer links the files; --out still makes image-N.png of them
    (the links were left pointing at the worker's files)."""
    root = os.path.join(tmpdir_path, "root")
    os.makedirs(root)
    cluster.worker("f1", args=["--output-root", root])
    out = os.path.join(tmpdir_path, "out")
    p = ctl(cluster, "enqueue", "--id", "fi", "--param", "meta.fake.images=2", "--param", "inline_images=true",
            "--param", "width=32", "--param", "height=16", "--out", out, "x")
    assert p.returncode == 0, p.stderr
    assert f"[image 1: {root}/fi/1.png]" in p.stdout   # the event's path, not an empty key
    md = open(os.path.join(out, "answer.md")).read()
    assert "![image 1](image-1.png)" in md and "![image 2](image-2.png)" in md, md
    assert open(os.path.join(out, "image-2.png"), "rb").read() == open(os.path.join(root, "fi", "2.png"), "rb").read()


def test_mistakes_are_said_with_their_exit_status(cluster, tmpdir_path):
    """What a user gets wrong is said at once with the documented status (1 job, 2 usage,
    3 Redis or a file): `watch` of an id nothing is known of (it waited in silence; it still
    waits, as a producer may XADD without the job hash, but says so first), `watch` with
    Redis away (it waited for it), a command's --help (taken as a job id), an id starting
    with "-", a mistyped command, option or --param key (the whole usage, the mistake not
    named; now one line with the nearest known word), `dead list` with a bad count or an
    unknown option (Redis's error, exit 3;
    --count 0 said "no dead letters"; an unknown option was ignored), files that cannot be
    read (they exited 2)."""
    w = subprocess.Popen([CTL, "--redis", cluster.server.url, "watch", "no-such-job"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    w.terminate()
    _, err = w.communicate(timeout=10)
    assert 'nothing is known of job "no-such-job" yet' in err, err
    p = ctl(cluster, "enqueue", "--id", "-h", "hi")
    assert p.returncode == 2 and 'starts with "-"' in p.stderr, p.stderr
    p = subprocess.run([CTL, "--redis", "redis://127.0.0.1:1/0", "watch", "x"], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 3 and "Connection refused" in p.stderr, p.stderr
    for command in ("watch", "cancel", "result", "enqueue", "stats", "dead"):
        p = ctl(cluster, command, "--help")
        assert p.returncode == 0 and p.stdout.startswith(f"usage: duogenctl [OPTION]... {command}"), (command, p)
    assert not cluster.r.exists("duogen:cancel:--help")
    for args, said in ((["stat"], 'unknown command "stat" (did you mean stats?)'),
                       (["frobnicate"], 'unknown command "frobnicate"; duogenctl --help lists them'),
                       (["--prefx", "duogen", "stats"], 'unknown option "--prefx" (did you mean --prefix?)'),
                       (["--password-file"], "--password-file needs a value (--password-file FILE)"),
                       (["enqueue", "--imgae", "x.png", "hi"],
                        'enqueue: unknown option "--imgae" (did you mean --image?)'),
                       (["enqueue", "hi", "--image"], "enqueue: --image needs a value"),
                       (["enqueue", "--param", "max_new_token=3", "hi"],
                        "--param max_new_token: unknown (did you mean max_new_tokens?)")):
        p = ctl(cluster, *args)
        assert p.returncode == 2 and said in p.stderr and "usage:" not in p.stderr, (args, p.stderr)
    for args in (["--count", "x"], ["--count", "0"], ["--bogus"]):
        p = ctl(cluster, "dead", "list", *args)
        assert p.returncode == 2 and "dead list" in p.stderr, (args, p.stderr)
    p = ctl(cluster, "--password-file", os.path.join(tmpdir_path, "nonexistent.pw"), "stats")
    assert p.returncode == 3 and "nonexistent.pw" in p.stderr, p.stderr
    p = ctl(cluster, "enqueue", "--job", os.path.join(tmpdir_path, "nonexistent.job"))
    assert p.returncode == 3 and "nonexistent.job" in p.stderr, p.stderr
    bad = os.path.join(tmpdir_path, "bad.job")
    with open(bad, "w") as f:
        f.write("{not json")
    assert ctl(cluster, "enqueue", "--job", bad).returncode == 2


def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_batch_enqueues_every_line_waits_and_writes_each_answer(cluster, tmpdir_path):
    """A JSON Lines file, one job a line: all sent, each end said on a line of its own, each
    answer written under DIR/<id>/, the tally last; run again, nothing is sent twice."""
    cluster.worker()
    with open(os.path.join(tmpdir_path, "in.png"), "wb") as f:
        f.write(tiny_png())
    path = write_lines(os.path.join(tmpdir_path, "render.jsonl"), [
        '{"text": "first one"}',
        '{"id": "named", "text": "second", "params": {"meta.fake.images": 1, "steps": 2}}',
        '',
        '{"text": "with a picture", "images": ["in.png"], "system": "be brief"}',
        '{"id": "bad-one", "text": "fails", "params": {"meta.fake.fail": "error"}}'])
    out = os.path.join(tmpdir_path, "out")
    p = ctl(cluster, "batch", path, "--out", out)
    assert p.returncode == 1, p.stderr   # one job failed
    ids = ["render-1", "named", "render-4", "bad-one"]
    lines = p.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(["render-1 done", "named done", "render-4 done",
                                         "bad-one failed: BAD_REQUEST: fake engine: failing as the job asked (EINVAL)"])
    assert lines[-1] == f"batch {path}: 4 jobs: 3 done, 1 failed, 0 cancelled, 0 expired"
    assert f"{path}: 4 jobs: 4 enqueued, 0 running already, 0 ended before" in p.stderr
    for job_id in ids:
        assert cluster.result(job_id)["status"] == (b"failed" if job_id == "bad-one" else b"done")
        assert os.path.exists(os.path.join(out, job_id, "answer.md"))
    assert open(os.path.join(out, "named", "image-1.png"), "rb").read() == cluster.r.get("duogen:image:named:1")
    # what went out: the lines as enqueue's --job file says (the image's bytes, the system message)
    jobs = {f[b"id"].decode(): pb.Job.FromString(f[b"job"]) for _, f in cluster.r.xrange("duogen:jobs")}
    assert sorted(jobs) == sorted(ids)
    assert jobs["named"].image.steps == 2 and dict(jobs["named"].metadata) == {"fake.images": "1"}
    assert [m.role for m in jobs["render-4"].messages] == [pb.Message.SYSTEM, pb.Message.USER]
    assert jobs["render-4"].messages[1].parts[0].image.data == tiny_png()

    p = ctl(cluster, "batch", path, "--wait")
    assert p.returncode == 1 and cluster.r.xlen("duogen:jobs") == 4, p.stderr
    assert f"{path}: 4 jobs: 0 enqueued, 0 running already, 4 ended before" in p.stderr
    assert "named done (before this run)" in p.stdout.splitlines()
    assert p.stdout.splitlines()[-1].endswith("(4 ended before this run)")


def test_batch_checks_every_line_before_sending_any(cluster, tmpdir_path):
    cases = [
        (['{"text": "a"}', '{"text": oops}'], 2, '"{path}" line 2: invalid token'),
        (['{"id": "x", "text": "a"}', '{"text": "b"}', '{"id": "x", "text": "c"}'], 2,
         '"{path}" lines 1 and 3: the same id "x"'),
        (['{"text": "a", "params": {"steps": "many"}}'], 2, '"{path}" line 1: --param steps=many: not an integer'),
        (['{"text": "a", "params": {"nope": 1}}'], 2, '"{path}" line 1: --param nope: unknown'),
        (['{"text": "a"}', '{"text": "b", "images": ["missing.png"]}'], 3, '"{path}" line 2: image "'),
        (['{"id": "-x", "text": "a"}'], 2, '"{path}" line 1: id "-x" starts with "-"'),
        (['{"id": "a b", "text": "a"}'], 2, '"{path}" line 1: id "a b" is not 1..128 characters'),
        (['{"id": "x", "params": {"steps": 2}}'], 2, '"{path}" line 1: no text and no image'),
        (['{"text": "a", "colour": "red"}'], 2, '"{path}" line 1: unknown or mistyped key "colour"'),
        (['{"text": "a", "param": {"steps": 2}}'], 2, 'unknown or mistyped key "param" (did you mean params?)'),
        (['{"text": "a", "images": "x.png"}'], 2, '"{path}" line 1: "images" must be a list of paths'),
        (['', '  '], 2, 'batch file "{path}": no job in it'),
    ]
    for i, (lines, rc, said) in enumerate(cases):
        path = write_lines(os.path.join(tmpdir_path, f"bad{i}.jsonl"), lines)
        p = ctl(cluster, "batch", path)
        assert p.returncode == rc and said.format(path=path) in p.stderr, (lines, p.stderr)
        assert p.stderr.count(f'"{path}"') == 1, p.stderr   # the place said once
    assert not cluster.r.exists("duogen:jobs")   # nothing of any of them went out


def test_batch_window_keeps_at_most_n_on_their_way(cluster, tmpdir_path):
    """--window 2: never more than two jobs of the file queued or running at once; the rest
    are sent as those end."""
    cluster.worker(args=["--max-inflight", "4"])
    path = write_lines(os.path.join(tmpdir_path, "w.jsonl"),
                       [f'{{"id": "win-{i}", "text": "a b c d", "params": {{"meta.fake.step_ms": 40}}}}' for i in range(6)])
    p = subprocess.Popen([CTL, "--redis", cluster.server.url, "batch", path, "--window", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    most = 0
    while p.poll() is None:
        # one look at one moment (MULTI/EXEC): key by key, a job that ended between two reads
        # and the one sent after it would both count
        look = cluster.r.pipeline(transaction=True)
        for i in range(6):
            look.exists(f"duogen:job:win-{i}")
            look.exists(f"duogen:result:win-{i}")
        seen = look.execute()
        on_way = sum(1 for i in range(6) if seen[2 * i] and not seen[2 * i + 1])
        most = max(most, on_way)
        time.sleep(0.01)
    out, err = p.communicate()
    assert p.returncode == 0, err
    assert out.splitlines()[-1] == f"batch {path}: 6 jobs: 6 done, 0 failed, 0 cancelled, 0 expired"
    assert most == 2, most   # the window filled, and never overflowed


def test_batch_run_again_after_an_interruption_sends_only_what_has_not_gone(cluster, tmpdir_path):
    """duogenctl stopped in the middle of a batch: the same command again sends the jobs it
    had not sent, waits for those running, and every job runs once."""
    cluster.worker(args=["--max-inflight", "1"])
    path = write_lines(os.path.join(tmpdir_path, "r.jsonl"),
                       [f'{{"id": "re-{i}", "text": "a b c", "params": {{"meta.fake.step_ms": 60}}}}' for i in range(5)])
    p = subprocess.Popen([CTL, "--redis", cluster.server.url, "batch", path, "--window", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: cluster.result("re-0"), what="the first job's end")
    p.kill()
    p.wait()
    assert cluster.r.xlen("duogen:jobs") >= 1   # (on a loaded machine it may have sent all five)
    p = ctl(cluster, "batch", path, "--wait", timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[-1].startswith(f"batch {path}: 5 jobs: 5 done, 0 failed")
    # each job's events say it started once: nothing ran twice
    for i in range(5):
        starts = [e for e in cluster.events(f"re-{i}") if e["type"] == b"started"]
        assert len(starts) == 1, (i, starts)


def test_batch_high_goes_to_the_high_stream(cluster, tmpdir_path):
    cluster.worker()
    path = write_lines(os.path.join(tmpdir_path, "urgent.jsonl"), ['{"text": "one"}', '{"text": "two"}'])
    p = ctl(cluster, "batch", path, "--high", "--wait")
    assert p.returncode == 0, p.stderr
    assert sorted(p.stdout.splitlines()[:-1]) == ["urgent-1 done", "urgent-2 done"]
    assert cluster.r.xlen("duogen:jobs:high") == 2 and cluster.r.xlen("duogen:jobs") == 0


def test_batch_shows_where_it_stands_on_a_terminal(cluster, tmpdir_path):
    """With stderr a terminal, a line says how many jobs have ended and gone out, redrawn in
    place and cleared before every other line; stdout is the same as into a pipe."""
    cluster.worker()
    path = write_lines(os.path.join(tmpdir_path, "tty.jsonl"), ['{"text": "one"}', '{"text": "two"}'])
    master, slave = pty.openpty()
    p = subprocess.Popen([CTL, "--redis", cluster.server.url, "batch", path, "--wait"], stdout=subprocess.PIPE,
                         stderr=slave, text=True)
    os.close(slave)
    out, _ = p.communicate(timeout=30)
    err = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:   # the terminal's other end is closed: all read
            break
        if not chunk:
            break
        err += chunk
    os.close(master)
    assert p.returncode == 0
    assert sorted(out.splitlines()[:-1]) == ["tty-1 done", "tty-2 done"]
    err = err.decode()
    assert "\r\x1b[Kbatch: 0 of 2 ended (0 done), 2 sent" in err and "\r\x1b[Kbatch: 2 of 2 ended (2 done), 2 sent" in err
    assert err.endswith("\r\x1b[K"), repr(err)   # cleared at the end


def test_batch_ids_files_and_deadlines_as_a_user_meets_them(cluster, tmpdir_path):
    """What using `batch` found: ids "." and ".." took --out's answers out of DIR (DIR/../);
    two files named alike (jobs.mon.jsonl, jobs.tue.jsonl) gave the same ids, so the second
    ran nothing and printed the first's answers; a file that can be read once (a pipe) sent
    nothing; an empty or folder image on line 2 was found after line 1 had gone out; a
    line's deadline_s ran while the line waited under --window; deadline_s=1e30 expired the
    job at once; an unreachable Redis was waited for forever. Now each is refused before
    anything is sent, or works."""
    cluster.worker(args=["--max-inflight", "2"])
    cluster.wait_groups()
    out = os.path.join(tmpdir_path, "answers")
    for bad in (".", ".."):
        path = write_lines(os.path.join(tmpdir_path, "dots.jsonl"), [f'{{"id": "{bad}", "text": "x"}}'])
        p = ctl(cluster, "batch", path, "--out", out)
        assert p.returncode == 2 and f'id "{bad}" cannot name a folder of answers' in p.stderr, p.stderr
    assert cluster.r.xlen("duogen:jobs") == 0 and not os.path.exists(os.path.join(tmpdir_path, "answer.md"))

    # the stem is the name without its last extension, and only bytes an id may hold
    for name, stem in (("jobs.mon.jsonl", "jobs.mon"), ("jobs.tue.jsonl", "jobs.tue"), ("my batch.jsonl", "my_batch"),
                       ("-dash.jsonl", "_dash")):
        path = write_lines(os.path.join(tmpdir_path, name), [f'{{"text": "{name}"}}'])
        p = ctl(cluster, "batch", path, "--out", out)
        assert p.returncode == 0 and p.stdout.splitlines()[0] == f"{stem}-1 done", (name, p.stdout, p.stderr)
        assert f"Echo: {name}" in open(os.path.join(out, f"{stem}-1", "answer.md")).read()

    # a batch from a pipe: read once, both passes from its bytes
    p = subprocess.run([CTL, "--redis", cluster.server.url, "batch", "/dev/stdin", "--wait"],
                       input='{"id": "piped-1", "text": "one"}\n{"id": "piped-2", "text": "two"}\n',
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and sorted(p.stdout.splitlines()[:-1]) == ["piped-1 done", "piped-2 done"], p

    # images that cannot be sent are found with every other mistake, before the first line goes out
    open(os.path.join(tmpdir_path, "empty.png"), "wb").close()
    os.mkdir(os.path.join(tmpdir_path, "folder.png"))
    sent = cluster.r.xlen("duogen:jobs")
    for image, said in (("empty.png", "empty"), ("folder.png", "a folder")):
        path = write_lines(os.path.join(tmpdir_path, "img.jsonl"),
                           ['{"id": "ok-line", "text": "a"}', f'{{"text": "b", "images": ["{image}"]}}'])
        p = ctl(cluster, "batch", path)
        assert p.returncode == 3 and f'"{path}" line 2: image "' in p.stderr and said in p.stderr, p.stderr
    assert cluster.r.xlen("duogen:jobs") == sent and not cluster.r.exists("duogen:job:ok-line")

    # deadline_s counts from when the line goes out: the second line waits ~2 s for the window
    path = write_lines(os.path.join(tmpdir_path, "dl.jsonl"), [
        '{"id": "dl-slow", "text": "a b c d e f g h", "params": {"meta.fake.step_ms": 250}}',
        '{"id": "dl-quick", "text": "quick", "params": {"deadline_s": 1.5}}'])
    p = ctl(cluster, "batch", path, "--window", "1", timeout=60)
    assert p.returncode == 0 and "dl-quick done" in p.stdout.splitlines(), (p.stdout, p.stderr)
    for value in ("1e30", "0", "-5", "nan"):
        p = ctl(cluster, "enqueue", "--param", f"deadline_s={value}", "hi")
        assert p.returncode == 2 and f"deadline_s={value}" in p.stderr, (value, p.stderr)

    # a Redis that was never there is not waited for
    path = write_lines(os.path.join(tmpdir_path, "unreachable.jsonl"), ['{"text": "a"}'])
    p = subprocess.run([CTL, "--redis", "redis://127.0.0.1:1/0", "batch", path], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 3 and "Connection refused" in p.stderr and "waiting" not in p.stderr, p.stderr


def test_enqueue_and_result_as_a_user_meets_them(cluster, tmpdir_path):
    """What using enqueue and result found: an id used again printed the earlier job's answer
    with nothing said; result --out into a folder used before left that answer's pictures
    beside the new one's; --html exited 0 without a picture that --out counted as missing;
    top into a pipe wrote terminal escapes forever; bias.abc=1 was said as "bias.abc=abc"; a
    key of 128 bytes as "expected KEY=VALUE"; an image from a pipe as "empty"."""
    cluster.worker()
    assert ctl(cluster, "enqueue", "--id", "used", "--wait", "first", "question").returncode == 0
    p = ctl(cluster, "enqueue", "--id", "used", "--wait", "another", "question")
    assert p.returncode == 0 and "Echo: first question" in p.stdout, p
    assert 'job "used" has ended already (done): not sent again' in p.stderr, p.stderr
    assert cluster.r.xlen("duogen:jobs") == 1

    assert ctl(cluster, "enqueue", "--id", "three", "--param", "meta.fake.images=3", "--param", "steps=1",
               "--wait", "a", "b", "c", "d").returncode == 0
    assert ctl(cluster, "enqueue", "--id", "one", "--param", "meta.fake.images=1", "--param", "steps=1",
               "--wait", "a", "b").returncode == 0
    d = os.path.join(tmpdir_path, "d")
    assert ctl(cluster, "result", "three", "--out", d).returncode == 0
    assert sorted(os.listdir(d)) == ["answer.md", "image-1.png", "image-2.png", "image-3.png"]
    open(os.path.join(d, "image-7.png.keep"), "w").close()   # not a picture of ours: left
    assert ctl(cluster, "result", "one", "--out", d).returncode == 0
    assert sorted(os.listdir(d)) == ["answer.md", "image-1.png", "image-7.png.keep"]

    cluster.r.delete("duogen:image:three:2")
    p = ctl(cluster, "result", "three", "--html", os.path.join(tmpdir_path, "page"))
    assert p.returncode == 1 and "image 2 (duogen:image:three:2) is gone" in p.stderr, p.stderr

    top = subprocess.Popen([CTL, "--redis", cluster.server.url, "top", "--interval", "0.2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    top.terminate()
    frames, _ = top.communicate(timeout=10)
    assert top.returncode == 0 and "\033" not in frames and "(q quits)" not in frames, repr(frames[:300])
    assert frames.count("duogen top ") >= 2 and "\n\nduogen top " in frames, frames

    for args, said in ((["--param", "bias.abc=1"], '--param bias.abc: "abc" is not a token id'),
                       (["--param", "meta." + "k" * 130 + "=v"], "a key of 135 bytes (127 at most)")):
        p = ctl(cluster, "enqueue", *args, "hi")
        assert p.returncode == 2 and said in p.stderr, (args, p.stderr)
    p = subprocess.run([CTL, "--redis", cluster.server.url, "enqueue", "--id", "piped-image", "--image", "/dev/stdin",
                        "--wait", "what is it"], input=tiny_png(), capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    job = pb.Job.FromString(cluster.r.xrange("duogen:jobs")[-1][1][b"job"])
    assert job.id == "piped-image" and job.messages[0].parts[0].image.data == tiny_png()


def test_prune_removes_the_consumers_of_workers_that_are_gone(cluster):
    """Redis keeps every consumer that ever read until XGROUP DELCONSUMER: the ids of workers
    that stopped (a replaced host) stayed in the group for good, and stats counted them.
    prune removes those of the workers' group (--group, default duogen) with no live worker,
    nothing pending and idle --idle-s; a live worker's consumer and one with a pending entry
    (a reaper's to take over first) are kept, and other groups are left alone; --dry-run
    names them only."""
    def consumers(k):
        return sorted(c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                      for c in cluster.r.xinfo_consumers(cluster.key(k), "duogen"))

    # a consumer is made by its first delivery (Redis 7.0: a blocked read makes none)
    w2 = cluster.worker("gone")
    cluster.wait_groups()
    cluster.enqueue("by-gone", "hi")
    assert cluster.wait_result("by-gone")["status"] == b"done"
    w2.term()
    w1 = cluster.worker("live")
    cluster.enqueue("by-live", "hi")
    assert cluster.wait_result("by-live")["status"] == b"done"
    assert consumers("jobs") == ["gone", "live"], consumers("jobs")
    cluster.r.delete("duogen:worker:gone")     # its heartbeat hash expired
    # a consumer of another group (an audit reader), gone, with an entry still pending
    cluster.r.xgroup_create(cluster.key("jobs"), "audit", id="0")
    cluster.r.xreadgroup("audit", "holder", {cluster.key("jobs"): ">"}, count=1)
    audit = lambda: [c["name"] for c in cluster.r.xinfo_consumers(cluster.key("jobs"), "audit")]
    assert audit() == [b"holder"], audit()

    p = ctl(cluster, "prune", "--idle-s", "0", "--dry-run")
    assert p.returncode == 0 and "would remove consumer gone" in p.stdout and "holder" not in p.stdout, p
    assert consumers("jobs") == ["gone", "live"]
    p = ctl(cluster, "prune", "--idle-s", "3600")              # gone for seconds only: kept
    assert p.returncode == 0 and "removed 0 consumers" in p.stdout, p
    p = ctl(cluster, "prune", "--idle-s", "0")
    assert p.returncode == 0, p
    assert "removed consumer gone " in p.stdout and "consumer live" not in p.stdout, p.stdout
    assert "removed 1 consumer; kept 1 " in p.stdout, p.stdout   # the live one; audit is another group
    p = ctl(cluster, "prune", "--group", "audit", "--idle-s", "0")   # its consumer holds an entry
    assert p.returncode == 0 and "removed 0 consumers; kept 1 " in p.stdout, p
    assert consumers("jobs") == ["live"] and audit() == [b"holder"]
    assert "group duogen             consumers 1 " in ctl(cluster, "stats").stdout, ctl(cluster, "stats").stdout
    for bad in (["--idle-s", "-1"], ["--idle-s", "x"], ["--now"]):
        p = ctl(cluster, "prune", *bad)
        assert p.returncode == 2 and "prune" in p.stderr, p
    cluster.enqueue("after", "hi")
    assert cluster.wait_result("after")["status"] == b"done"
    assert w1.alive()


def test_events_sent_again_after_a_cut_connection_are_shown_once(cluster):
    """A worker whose connection was cut in the middle of a send sends it again: the events
    Redis applied before the cut are in the stream twice, byte for byte. watch showed them
    twice (the text twice) and said "18446744073709551615 events ... were trimmed"; now a
    repeat is skipped, and another attempt's events of the same seq still start the answer
    over."""
    k = "duogen:events:rep"
    def ev(seq, typ, t, **f):
        cluster.r.xadd(k, {"type": typ, "seq": str(seq), **f, "pb": b"\x08" + bytes([seq]) + t.to_bytes(8, "little")})
    ev(1, "started", 1, worker="a", attempt="1")
    ev(2, "text", 2, text="Echo:")
    ev(3, "text", 3, text=" one")
    ev(2, "text", 2, text="Echo:")       # the send again
    ev(3, "text", 3, text=" one")
    ev(4, "text", 4, text=" two")
    p = subprocess.Popen([CTL, "--redis", cluster.server.url, "watch", "rep"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    ev(1, "started", 9, worker="b", attempt="2")   # another attempt: the same seqs, other events
    ev(2, "text", 10, text="Echo:")
    ev(2, "text", 10, text="Echo:")
    ev(3, "done", 11, status="done", finish_reason="stop")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.splitlines() == ["started worker=a attempt=1", "text Echo:", "text  one", "text  two",
                                "started worker=b attempt=2", "text Echo:", "done (stop)"], out
    assert "trimmed" not in err, err


def test_watch_into_a_pipe_follows_and_a_reader_that_leaves_ends_it(cluster):
    """`duogenctl watch` into a pipe printed nothing until its job ended (its lines waited in
    stdio's buffer): each read's lines now go out before it waits for more. And duogenctl
    ignores SIGPIPE, so that a Redis server closing the connection is an error naming it
    (test_queue_faults: a server at maxclients); a reader of its standard output that leaves
    (`duogenctl watch J | head -1`) still ends it by SIGPIPE, as it ends any writer, watch
    and top alike, not writing into nothing until the job ends or for ever."""
    cluster.worker()
    # 30 s of words, 2.4 KB of lines: less than stdio buffers for a pipe (4 KB), which made
    # them go out at its end
    cluster.enqueue("piped", " ".join(["w"] * 300), meta={"fake.step_ms": 100})
    for args in (["watch", "piped"], ["top", "--interval", "0.1"]):
        p = subprocess.Popen([CTL, "--redis", cluster.server.url] + args, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        first = p.stdout.readline()
        assert first, args
        if args[0] == "watch":
            assert first.startswith(b"started worker=w1"), first
            assert not cluster.result("piped"), "the first line came when the job had ended"
        p.stdout.close()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            raise AssertionError(f"{args}: still running with its reader gone")
        assert p.returncode == -13, (args, p.returncode, p.stderr.read())


def test_stats_and_top_show_a_worker_before_its_first_beat_as_starting(cluster):
    """The heartbeat hash holds only the id's lease (`owner`) between the lease and the first
    beat: stats showed no state and a heartbeat 56 years ago (now - 0), top the same."""
    cluster.r.hset(cluster.key("worker", "early"), "owner", "1234abcd")
    p = ctl(cluster, "stats")
    assert p.returncode == 0, p
    line = [l for l in p.stdout.splitlines() if l.split()[:1] == ["early"]]
    assert len(line) == 1 and line[0].split() == ["early", "starting", "-"], line
    p = ctl(cluster, "top", "--once")
    line = [l for l in p.stdout.splitlines() if l.split()[:1] == ["early"]]
    assert len(line) == 1 and line[0].split()[:3] == ["early", "starting", "-"], (line, p.stdout)
