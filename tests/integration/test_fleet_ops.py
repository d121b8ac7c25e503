"""Fleet operations: least-privilege Redis users, Sentinel failover, Prometheus metrics,
the systemd units and `make install`."""
import hashlib
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
import redis

from conftest import (BUILD, ROOT, Cluster, RedisServer, Worker, exposition, free_port, ipv6_missing, make_job, pb, png_bytes,
                      scrape_metrics, wait_until)

DEPLOY = os.path.join(ROOT, "deploy", "redis")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def start_acl_redis(tmpdir_path, edit=lambda acl: acl):
    """A Redis with the shipped redis.conf and the ACL make-acl.sh writes (edit() may change
    it). Returns (srv, password files, client(role)); srv.proc is the server."""
    pw = {role: write(os.path.join(tmpdir_path, f"{role}.pw"), f"{role}-secret-{os.getpid()}\n")
          for role in ("producer", "worker", "operator")}
    acl = subprocess.run([os.path.join(DEPLOY, "make-acl.sh"), pw["producer"], pw["worker"], pw["operator"]],
                         capture_output=True, text=True, check=True).stdout
    assert "CHANGE-ME" not in acl and "secret" not in acl   # hashes only
    write(os.path.join(tmpdir_path, "users.acl"), edit(acl))
    # the shipped redis.conf (its bind as shipped), with the test's port, directory and ACL file
    port = free_port()
    proc = subprocess.Popen(["redis-server", os.path.join(DEPLOY, "redis.conf"), "--port", str(port),
                             "--dir", tmpdir_path,
                             "--aclfile", os.path.join(tmpdir_path, "users.acl"), "--maxmemory", "256mb",
                             "--daemonize", "no", "--logfile", os.path.join(tmpdir_path, "redis.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    class Srv:
        pass
    srv = Srv()
    srv.port, srv.proc = port, proc
    passwords = {r: open(p).read().strip() for r, p in pw.items()}

    def client(role):
        return redis.Redis(port=srv.port, username=f"duogen-{role}", password=passwords[role], socket_timeout=10)
    wait_until(lambda: _ping(client("producer")), what="ACL redis")
    return srv, pw, client


@pytest.fixture
def acl_redis(tmpdir_path):
    srv, pw, client = start_acl_redis(tmpdir_path)
    yield srv, pw, client
    srv.proc.kill()
    srv.proc.wait(10)


def _ping(c):
    try:
        return c.ping()
    except redis.exceptions.RedisError:
        return False


def stop_all(worker, sentinel, *servers):
    """A Sentinel test's end: its worker (None when it never started), the Sentinel, the
    Redis servers."""
    if worker:
        worker.kill()
    sentinel.kill()
    sentinel.wait(10)
    for srv in servers:
        srv.stop(hard=True)


def worker_as(tmp, srv, role, pwfile, wid, args=()):
    model = os.path.join(tmp, "model")
    os.makedirs(model, exist_ok=True)
    return Worker(tmp, f"redis://duogen-{role}@127.0.0.1:{srv.port}/0", wid, model,
                  args=["--password-file", pwfile] + list(args))


def test_acl_roles_do_their_work_and_nothing_else(acl_redis, tmpdir_path):
    srv, pw, client = acl_redis
    prod, oper = client("producer"), client("operator")
    w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "aclw", args=["--metrics-port", "0"])
    try:
        # the producer enqueues and reads state, events, images and the result
        job = make_job("acl-1", "hello there", meta={"fake.images": 1})
        prod.hsetnx("duogen:job:acl-1", "state", "queued")
        prod.xadd("duogen:jobs", {"id": "acl-1", "job": job.SerializeToString()})
        res = wait_until(lambda: prod.hgetall("duogen:result:acl-1") or None, timeout=20, what="result")
        assert res[b"status"] == b"done"
        assert prod.get("duogen:image:acl-1:1")[:4] == b"\x89PNG"
        assert [e[1][b"type"] for e in prod.xrange("duogen:events:acl-1")][-1] == b"done"
        prod.set("duogen:cancel:nothing", 1)
        # an input image under duogen:input:*, read by the worker (STRLEN, then GET)
        prod.set("duogen:input:acl-in", png_bytes(2, 2, lambda y: [0, 128, 255] * 2))
        job = pb.Job(id="acl-in")
        m = job.messages.add(role=pb.Message.USER)
        m.parts.add(image=pb.Image(redis_key="duogen:input:acl-in"))
        m.parts.add(text="what is this")
        prod.xadd("duogen:jobs", {"id": "acl-in", "job": job.SerializeToString()})
        res = wait_until(lambda: prod.hgetall("duogen:result:acl-in") or None, timeout=20, what="input job")
        assert res[b"status"] == b"done", res
        # duogenctl's cancel as the producer (it looks at the job hash first)
        p = subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis",
                            f"redis://duogen-producer@127.0.0.1:{srv.port}/0", "--password-file", pw["producer"],
                            "cancel", "acl-1"], capture_output=True, text=True, timeout=20)
        assert "NOPERM" not in p.stdout + p.stderr, p.stdout + p.stderr
        # and its watch of an ended job: the answer, exit 0 (one EXISTS over the job, result and
        # events keys was refused: a command's keys must fall in one selector of the ACL)
        p = subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis",
                            f"redis://duogen-producer@127.0.0.1:{srv.port}/0", "--password-file", pw["producer"],
                            "watch", "acl-in"], capture_output=True, text=True, timeout=20)
        assert p.returncode == 0 and "NOPERM" not in p.stderr, p.stdout + p.stderr
        # and its batch, with a failing job (whose error it reads) and an answer written
        batch = write(os.path.join(tmpdir_path, "acl.jsonl"),
                      '{"id": "acl-b1", "text": "one", "params": {"meta.fake.images": 1}}\n'
                      '{"id": "acl-b2", "text": "two", "params": {"meta.fake.fail": "error"}}\n')
        p = subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis",
                            f"redis://duogen-producer@127.0.0.1:{srv.port}/0", "--password-file", pw["producer"],
                            "batch", batch, "--out", os.path.join(tmpdir_path, "acl-out")],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 1 and "NOPERM" not in p.stderr, p.stdout + p.stderr
        assert p.stdout.splitlines()[-1] == f"batch {batch}: 2 jobs: 1 done, 1 failed, 0 cancelled, 0 expired", p.stdout
        assert "acl-b2 failed: BAD_REQUEST: fake engine: failing as the job asked (EINVAL)" in p.stdout
        assert os.path.exists(os.path.join(tmpdir_path, "acl-out", "acl-b1", "image-1.png"))

        # a job naming an input key outside duogen:input:* fails clearly; the worker lives on
        bad = pb.Job(id="acl-steal")
        m = bad.messages.add(role=pb.Message.USER)
        m.parts.add(image=pb.Image(redis_key="duogen:result:acl-1"))
        prod.xadd("duogen:jobs", {"id": "acl-steal", "job": bad.SerializeToString()})
        res = wait_until(lambda: prod.hgetall("duogen:result:acl-steal") or None, timeout=20, what="refusal")
        assert res[b"status"] == b"failed" and b"NOPERM" in res[b"error"]
        assert w.alive()

        forbidden_producer = [
            ("xack", "duogen:jobs", "duogen", "1-1"),
            ("xgroup", "destroy", "duogen:jobs", "duogen"),
            ("hset", "duogen:worker:aclw", "state", "idle"),
            ("del", "duogen:result:acl-1"),
            ("hset", "duogen:result:acl-1", "status", "forged"),
            ("xadd", "duogen:done", "*", "id", "x"),
            ("set", "elsewhere", "1"),
            ("get", "elsewhere"),
            ("flushall",), ("config", "get", "*"), ("keys", "*"), ("acl", "list"),
        ]
        for cmd in forbidden_producer:
            with pytest.raises(redis.exceptions.NoPermissionError):
                prod.execute_command(*cmd)
        # what needs the operator's rights, asked as the producer: said with the command and
        # key it was refused (it said "Redis refused the command: NOPERM ..."; top --once
        # showed length 0, dead letters 0 and no live worker, exit 0)
        as_producer = [os.path.join(BUILD, "duogenctl"), "--redis", f"redis://duogen-producer@127.0.0.1:{srv.port}/0",
                       "--password-file", pw["producer"]]
        p = subprocess.run(as_producer + ["stats"], capture_output=True, text=True, timeout=20)
        assert p.returncode == 3 and re.search(r"Redis refused [A-Z]+ duogen:\S+: NOPERM", p.stderr), p.stderr
        assert "stats, top, dead and prune need the operator's rights" in p.stderr, p.stderr
        p = subprocess.run(as_producer + ["top", "--once"], capture_output=True, text=True, timeout=20)
        assert p.returncode == 3 and "length ?" in p.stdout and "dead letters ?" in p.stdout, p.stdout
        assert "(no live worker)" not in p.stdout and re.search(r"Redis refused \S+ \S*: NOPERM", p.stdout), p.stdout
        # the worker's user as a client: no admin, no enqueueing, no keys elsewhere
        wc = client("worker")
        for cmd in [("flushall",), ("config", "set", "maxmemory", "0"), ("keys", "*"),
                    ("xadd", "duogen:jobs", "*", "id", "x"), ("del", "duogen:jobs"),
                    ("get", "duogen:result:acl-1"), ("set", "elsewhere", "1"), ("shutdown",)]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                wc.execute_command(*cmd)
        # the operator can inspect and requeue, but not administer
        assert oper.xinfo_groups("duogen:jobs")[0]["name"] == b"duogen"
        p = subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis",
                            f"redis://duogen-operator@127.0.0.1:{srv.port}/0", "--password-file", pw["operator"],
                            "stats"], capture_output=True, text=True, timeout=20)
        # dead: acl-b2 (the batch's failing job) and acl-steal
        assert p.returncode == 0 and "aclw" in p.stdout and "dead letters 2" in p.stdout, p.stdout + p.stderr
        for cmd in [("flushall",), ("config", "get", "*"), ("shutdown",), ("keys", "*")]:
            with pytest.raises(redis.exceptions.NoPermissionError):
                oper.execute_command(*cmd)
    finally:
        w.kill()


def test_a_password_rotated_as_deploy_readme_says(tmpdir_path):
    """The new password added beside the old, a worker restarted with it, the old removed: the
    new worker works on; one left on the old password is refused at its next reconnect and
    exits 78 naming WRONGPASS."""
    srv, pw, client = start_acl_redis(tmpdir_path, lambda acl: acl + "user admin on >admin-secret ~* &* +@all\n")
    admin = redis.Redis(port=srv.port, username="admin", password="admin-secret", socket_timeout=10)
    sha = lambda path: hashlib.sha256(open(path).read().strip().encode()).hexdigest()  # noqa: E731
    old_w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "rot-old")
    new_w = None
    prod = client("producer")
    try:
        wait_until(lambda: admin.hget("duogen:worker:rot-old", "state") == b"idle", what="the old worker")
        new_pw = write(os.path.join(tmpdir_path, "worker-new.pw"), f"rotated-{os.getpid()}\n")
        admin.execute_command("ACL", "SETUSER", "duogen-worker", f"#{sha(new_pw)}")
        new_w = worker_as(tmpdir_path, srv, "worker", new_pw, "rot-new")
        wait_until(lambda: admin.hget("duogen:worker:rot-new", "state") == b"idle", what="the new worker")
        admin.execute_command("ACL", "SETUSER", "duogen-worker", f"!{sha(pw['worker'])}")
        for c in admin.client_list():   # a reconnect of the old worker, as a network blip makes
            if c["name"] == "rot-old":
                admin.client_kill_filter(_id=c["id"])
        assert old_w.proc.wait(20) == 78
        assert "WRONGPASS" in old_w.logs(), old_w.logs()
        prod.xadd("duogen:jobs", {"id": "rot-1", "job": make_job("rot-1", "after the rotation").SerializeToString()})
        res = wait_until(lambda: prod.hgetall("duogen:result:rot-1") or None, timeout=20, what="a job after it")
        assert res[b"status"] == b"done" and res[b"worker"] == b"rot-new"
    finally:
        old_w.kill()
        if new_w:
            new_w.kill()
        srv.proc.kill()
        srv.proc.wait(10)


def test_worker_with_wrong_credentials_or_rights_stops_with_a_clear_error(acl_redis, tmpdir_path):
    srv, pw, client = acl_redis
    wrong = write(os.path.join(tmpdir_path, "wrong.pw"), "not-the-password\n")
    w = worker_as(tmpdir_path, srv, "worker", wrong, "wrongpw")
    assert w.proc.wait(20) == 78
    assert "AUTH refused" in w.logs() and "WRONGPASS" in w.logs()
    # the producer's rights are not enough to be a worker: exit 78 naming the refusal (the
    # first command it needs that a producer may not run: the heartbeat hash's HGET)
    w2 = worker_as(tmpdir_path, srv, "producer", pw["producer"], "asproducer")
    assert w2.proc.wait(20) == 78
    log = w2.logs()
    assert "Redis refuses this worker a command it needs" in log and "NOPERM" in log
    assert log.count("NOPERM") < 5   # said once or twice, not a loop


def refused_at_start(tmpdir_path, edit, stream, job_id):
    """A worker under the ACL edit() makes, with a job waiting on `stream`: it stops with 78
    naming the refusal before it takes the job (whose hash an attempt would have marked).
    Returns its log."""
    srv, pw, client = start_acl_redis(tmpdir_path, edit)
    w = None
    try:
        client("producer").xadd(stream, {"id": job_id, "job": make_job(job_id).SerializeToString()})
        w = worker_as(tmpdir_path, srv, "worker", pw["worker"], f"w-{job_id}")
        assert w.proc.wait(30) == 78
        log = w.logs()
        assert "Redis refuses this worker a command it needs" in log and "NOPERM" in log, log
        assert not client("producer").exists(f"duogen:job:{job_id}")
        assert not client("producer").exists(f"duogen:result:{job_id}")
        return log
    finally:
        if w:
            w.kill()
        srv.proc.kill()
        srv.proc.wait(10)


def test_a_worker_acl_of_the_last_version_is_refused_at_start(tmpdir_path):
    """This version's worker also holds its id's lease in its heartbeat hash and keeps the
    job streams' :taken indexes. Under the last version's ACL those commands were refused
    only inside a result's transaction, after a job had run (EXECABORT: exit 78 after the
    first job, found by review); now the worker says what to add before taking any."""
    def last_version(acl):
        acl = re.sub(r" \(\+hset \+hget \+hdel \+hscan ~duogen:jobs:taken ~duogen:jobs:high:taken\)", "", acl)
        return acl.replace("(+hset +hsetnx +hget +hdel +pexpire ~duogen:worker:*)", "(+hset +pexpire ~duogen:worker:*)")
    log = refused_at_start(tmpdir_path, last_version, "duogen:jobs", "waiting")
    assert "HSCAN on the job streams' :taken indexes" in log


def test_an_acl_without_the_high_streams_index_is_refused_at_start(tmpdir_path):
    """The start's check asked only the normal stream's :taken key: an ACL that left out the
    high one's let the worker take a high job and stop at its result (found by review)."""
    def no_high_index(acl):
        return acl.replace("~duogen:jobs:taken ~duogen:jobs:high:taken", "~duogen:jobs:taken")
    refused_at_start(tmpdir_path, no_high_index, "duogen:jobs:high", "hi")


def test_worker_under_the_shipped_acl_stops_a_run_acknowledged_elsewhere(acl_redis, tmpdir_path):
    """The shipped ACL must give the worker every command its lease fence uses: an entry
    acknowledged by another attempt while this one runs (here the operator's XACK) stops the
    run, which writes no result. The ACL lacked XRANGE, the keeper took the refusal for "gone
    from the stream", and the stale run went on and committed."""
    srv, pw, client = acl_redis
    prod, op = client("producer"), client("operator")
    w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "aclfence")
    try:
        job = make_job("acl-fence", " ".join(["w"] * 80), meta={"fake.step_ms": 100})
        prod.hsetnx("duogen:job:acl-fence", "state", "queued")
        prod.xadd("duogen:jobs", {"id": "acl-fence", "job": job.SerializeToString()})
        wait_until(lambda: len(prod.xrange("duogen:events:acl-fence")) >= 3, timeout=20, what="text events")
        entry = op.xpending_range("duogen:jobs", "duogen", "-", "+", 1)[0]["message_id"]
        op.xack("duogen:jobs", "duogen", entry)
        # without XRANGE the keeper took the refusal for "gone from the stream": never fenced
        wait_until(lambda: "its lease was lost" in w.logs(), timeout=10, what="the run fenced")
        n_events = len(prod.xrange("duogen:events:acl-fence"))
        time.sleep(1.5)   # 15 more steps of the fake engine had it gone on
        assert len(prod.xrange("duogen:events:acl-fence")) <= n_events + 1, "the stale run kept writing"
        assert not prod.hgetall("duogen:result:acl-fence"), "the stale run wrote a result"
        assert "cannot tell whether" not in w.logs()
        assert w.alive()
    finally:
        w.kill()


def test_an_engine_failure_is_noted_under_the_shipped_acl(acl_redis, tmpdir_path):
    """The worker's note of an engine failure in the job hash uses only commands the shipped
    ACL grants it (it read the hash with HMGET, refused: the note was never written)."""
    srv, pw, client = acl_redis
    prod = client("producer")
    w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "aclf")
    try:
        wait_until(lambda: "ready" in w.logs(), timeout=20, what="the worker ready")
        job = make_job("acl-fault", "x", meta={"fake.fail": "fatal"}, max_attempts=2)
        prod.xadd("duogen:jobs", {"id": "acl-fault", "job": job.SerializeToString()})
        assert w.proc.wait(20) == 75
        h = prod.hgetall("duogen:job:acl-fault")
        assert h.get(b"state") == b"retrying", h
        assert b'worker "aclf": engine failure: fake engine: device lost' in h.get(b"error", b""), h
    finally:
        w.kill()


def test_worker_refused_by_redis_exits_78_naming_it(tmpdir_path):
    """A refusal that no retry mends exits 78 (systemd does not restart it) with its reason:
    no password for a server that wants one (NOAUTH on every command: the worker used to log
    "cannot create consumer group" some 17000 times a second and run on), a password for a
    server that has none, a database index it does not have."""
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model, exist_ok=True)
    pwfile = write(os.path.join(tmpdir_path, "pw"), "sesame\n")
    cases = [(["--requirepass", "sesame"], "/0", [], "NOAUTH"),
             ([], "/0", ["--password-file", pwfile], "without any password configured"),
             ([], "/99", [], "DB index is out of range")]
    for i, (server_args, db, worker_args, said) in enumerate(cases):
        port = free_port()
        srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"] + server_args,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        w = None
        try:
            wait_until(lambda: _ping(redis.Redis(port=port, password="sesame" if server_args else None)),
                       what="redis")
            w = Worker(tmpdir_path, f"redis://127.0.0.1:{port}{db}", f"refused{i}", model, args=worker_args)
            assert w.proc.wait(20) == 78, w.logs()
            log = w.logs()
            assert said in log and "Redis refused this worker" in log, log
            assert len(log.splitlines()) < 40, log   # said, not looped on
        finally:
            if w:
                w.kill()
            srv.kill()
            srv.wait(10)


def test_a_passing_refusal_is_waited_out(tmpdir_path):
    """Not every error reply to AUTH is for good: a server at maxclients answers "ERR max
    number of clients reached" to whoever connects (a reconnect storm, a Redis restarting).
    The worker waits it out and starts; it took it for a refusal and exited 78, which
    systemd does not restart: one spike would have stopped a fleet for good."""
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model, exist_ok=True)
    pwfile = write(os.path.join(tmpdir_path, "pw"), "sesame\n")
    port = free_port()
    srv = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                            "--requirepass", "sesame", "--maxclients", "1"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    w = None
    try:
        holder = redis.Redis(port=port, password="sesame")
        wait_until(lambda: _ping(holder), what="redis")
        w = Worker(tmpdir_path, f"redis://127.0.0.1:{port}/0", "maxcl", model, args=["--password-file", pwfile])
        wait_until(lambda: "max number of clients" in w.logs(), timeout=10, what="the refusal")
        time.sleep(1)
        assert w.alive(), w.logs()
        holder.config_set("maxclients", "100")   # room again: the worker gets in (its keeper too)
        wait_until(lambda: "ready" in w.logs() and redis.Redis(port=port, password="sesame").exists("duogen:jobs"),
                   timeout=20, what="the worker in")
        assert w.alive()
    finally:
        if w:
            w.kill()
        srv.kill()
        srv.wait(10)


def master_and_sentinel(tmpdir_path):
    """A master, a Sentinel monitoring it as "dq", and a model directory: (master, the
    Sentinel's process, its port, the model directory)."""
    d1, ds = os.path.join(tmpdir_path, "m"), os.path.join(tmpdir_path, "s")
    os.makedirs(d1)
    os.makedirs(ds)
    master = RedisServer(d1)
    sport = free_port()
    sconf = write(os.path.join(ds, "sentinel.conf"),
                  f"port {sport}\nbind 127.0.0.1\ndir {ds}\nsentinel monitor dq 127.0.0.1 {master.port} 1\n")
    sentinel = subprocess.Popen(["redis-server", sconf, "--sentinel"], stdout=subprocess.DEVNULL)
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model)
    return master, sentinel, sport, model


def test_a_sentinel_user_without_role_exits_78(tmpdir_path):
    """Under Sentinel the worker checks the master's ROLE; an ACL without it was reported as
    "not a master (yet)" for ever. It is a refusal no retry mends: exit 78 naming it."""
    master, sentinel, sport, model = master_and_sentinel(tmpdir_path)
    master.client().execute_command("ACL", "SETUSER", "w", "on", ">pw", "~*", "&*", "+@all", "-role")
    pwfile = write(os.path.join(tmpdir_path, "w.pw"), "pw\n")
    w = None
    try:
        wait_until(lambda: _ping(redis.Redis(port=sport, socket_timeout=5)), what="sentinel")
        w = Worker(tmpdir_path, "redis://w@127.0.0.1:1/0", "norole", model,
                   args=["--sentinel", f"127.0.0.1:{sport}", "--master-name", "dq", "--password-file", pwfile])
        assert w.proc.wait(20) == 78, w.logs()
        assert "ROLE refused" in w.logs() and "NOPERM" in w.logs()
    finally:
        stop_all(w, sentinel, master)


def test_a_master_at_its_maxclients_is_named_under_sentinel(tmpdir_path):
    """Under Sentinel with no password, ROLE is the first command: a master at its
    maxclients answers it with its refusal, and the worker said "not a master (yet)"."""
    master, sentinel, sport, model = master_and_sentinel(tmpdir_path)
    w = None
    admin = redis.Redis(port=master.port, single_connection_client=True)
    try:
        wait_until(lambda: _ping(redis.Redis(port=sport, socket_timeout=5)), what="sentinel")
        wait_until(lambda: len(admin.client_list()) >= 2, what="the sentinel's connections to the master")
        admin.config_set("maxclients", str(len(admin.client_list())))
        w = Worker(tmpdir_path, "redis://127.0.0.1:1/0", "full", model,
                   args=["--sentinel", f"127.0.0.1:{sport}", "--master-name", "dq"])
        wait_until(lambda: "turned the connection away: ERR max number of clients reached" in w.logs(), timeout=20,
                   what="the refusal named")
        assert "not a master" not in w.logs(), w.logs()
        admin.config_set("maxclients", "10000")
        wait_until(lambda: "reconnected to Redis" in w.logs(), timeout=20, what="the worker connected")
        assert w.alive()
    finally:
        admin.close()
        stop_all(w, sentinel, master)


def test_bad_redis_settings_fail_before_the_model_loads(tmpdir_path):
    """A typo in the Redis URL or a password file that cannot be read is said at once, exit
    78, before the model is opened (with a published package that load takes minutes; the
    worker used to load first and only then read its Redis settings)."""
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model, exist_ok=True)
    for i, (url, args, said) in enumerate([
            ("http://127.0.0.1:1/0", [], "redis_url"),
            ("redis://127.0.0.1:1/0", ["--password-file", os.path.join(tmpdir_path, "nonexistent.pw")],
             "nonexistent.pw")]):
        w = Worker(tmpdir_path, url, f"badset{i}", model, args=args)
        try:
            assert w.proc.wait(20) == 78
        finally:
            w.kill()
        log = w.logs()
        assert said in log, log
        assert "model loaded" not in log, log


def test_an_evicting_redis_is_warned_of_at_every_connection(cluster):
    """A Redis that deletes keys when full (maxmemory-policy other than noeviction) would lose
    jobs and results without a word: the worker reads the policy on every new connection (a
    failover or a restart brings another server), warns when it is not noeviction and when
    it changes, and shows it in duogen_redis_evicts; it goes on taking jobs."""
    port = free_port()
    w = cluster.worker("ev", args=["--metrics-port", str(port)])
    evicts = lambda: exposition(scrape_metrics(port) or "").get('duogen_redis_evicts{worker="ev"}')  # noqa: E731
    wait_until(lambda: evicts() == 0, what="noeviction read")   # redis-server's default
    assert "evicts keys" not in w.logs()

    def reconnect():
        before = w.logs().count("reconnected to Redis") + w.logs().count("Redis connection lost")
        for c in cluster.r.client_list():
            if c["name"] == "ev":
                cluster.r.client_kill_filter(_id=c["id"])
        wait_until(lambda: w.logs().count("reconnected to Redis") + w.logs().count("Redis connection lost") > before,
                   what="the worker's reconnect")
    cluster.r.config_set("maxmemory", "100mb")
    cluster.r.config_set("maxmemory-policy", "allkeys-lru")
    reconnect()
    wait_until(lambda: evicts() == 1, what="the evicting policy read")
    warning = ("Redis evicts keys when full (maxmemory-policy allkeys-lru, maxmemory 104857600 bytes): a job's stream "
               "entry, pending list or result can be deleted, and the job lost without a word; set maxmemory-policy "
               "noeviction")
    assert warning in w.logs(), w.logs()
    # and operators see it, who may not run INFO: the heartbeat carries it to duogenctl
    said = "warning: Redis evicts keys when full"
    ctl = lambda *a: subprocess.run([os.path.join(BUILD, "duogenctl"), "--redis", cluster.server.url] + list(a),  # noqa: E731
                                    capture_output=True, text=True, timeout=20).stdout
    wait_until(lambda: cluster.r.hget("duogen:worker:ev", "redis_evicts") == b"1", what="the heartbeat's word")
    assert "worker ev read" in ctl("stats") and said in ctl("stats") and said in ctl("top", "--once")
    cluster.enqueue("ev-1", "still working")
    assert cluster.wait_result("ev-1")["status"] == b"done"
    reconnect()   # the same policy again: not said again
    cluster.enqueue("ev-2", "after the reconnect")
    assert cluster.wait_result("ev-2")["status"] == b"done"
    assert w.logs().count("Redis evicts keys when full") == 1, w.logs()
    cluster.r.config_set("maxmemory-policy", "noeviction")
    reconnect()
    wait_until(lambda: evicts() == 0, what="noeviction read again")
    assert "Redis's maxmemory-policy is noeviction now (was allkeys-lru)" in w.logs()
    wait_until(lambda: cluster.r.hget("duogen:worker:ev", "redis_evicts") == b"0", what="the heartbeat's word")
    assert said not in ctl("stats") and said not in ctl("top", "--once")


def test_an_acl_without_info_leaves_the_eviction_policy_unknown(tmpdir_path):
    """A worker ACL of an earlier version (no INFO): said once, the figure -1, jobs run."""
    srv, pw, client = start_acl_redis(tmpdir_path, lambda acl: acl.replace(" +info ", " "))
    port = free_port()
    w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "noinfo", args=["--metrics-port", str(port)])
    try:
        prod = client("producer")
        prod.xadd("duogen:jobs", {"id": "ni-1", "job": make_job("ni-1", "hello").SerializeToString()})
        res = wait_until(lambda: prod.hgetall("duogen:result:ni-1") or None, timeout=20, what="result")
        assert res[b"status"] == b"done"
        assert exposition(scrape_metrics(port))['duogen_redis_evicts{worker="noinfo"}'] == -1
        log = w.logs()
        assert log.count("Redis's eviction policy is not known (INFO memory: NOPERM") == 1, log
    finally:
        w.kill()
        srv.proc.kill()
        srv.proc.wait(10)


def test_a_claim_idle_time_too_short_for_a_slow_redis_is_warned_of(cluster):
    """Renewals come every renew_ms, later by a keeper command that timed out (5 s) and
    their own: a claim_idle_ms below renew_ms + 10 s lets a slow Redis hand running jobs to
    other workers, which the worker says at start (the tests' 1500 ms does)."""
    short, default = cluster.worker("wshort"), cluster.worker("wlong", args=["--claim-idle-ms", "60000"])
    # said when the keeper starts, after the worker id's claim (a heartbeat after ready)
    wait_until(lambda: "running jobs may be taken over" in short.logs(), what="the warning")
    wait_until(lambda: cluster.r.hget("duogen:worker:wlong", "state") == b"idle", what="wlong's keeper")
    assert "running jobs may be taken over" not in default.logs()


def test_a_job_stream_key_of_another_type_is_waited_out(cluster):
    """A producer's mistake (LPUSH to the job stream's key): the groups cannot be made
    (WRONGTYPE). The worker says so, tries again after a doubling wait instead of in a tight
    loop (it wrote 35000 lines in 4 s), stays up, and takes jobs once the key is mended; and
    the same when the key is replaced under a running worker (its reads failed 36000 times
    a second: they go back to making the groups, which backs off)."""
    cluster.r.lpush(cluster.key("jobs"), "oops")
    w = cluster.worker("wtype")
    time.sleep(4)
    log = w.logs()
    assert "WRONGTYPE" in log and w.alive()
    assert log.count("cannot create consumer group") <= 3, log.count("cannot create consumer group")
    cluster.r.delete(cluster.key("jobs"))
    cluster.enqueue("after-mend", "hello there")
    res = cluster.wait_result("after-mend", timeout=30)
    assert res["status"] == b"done", res
    assert "consumer group \"duogen\" made after" in w.logs()
    # under the running worker
    before = len(w.logs().splitlines())
    cluster.r.delete(cluster.key("jobs"))
    cluster.r.lpush(cluster.key("jobs"), "oops")
    time.sleep(4)
    lines = w.logs().splitlines()[before:]
    assert any("WRONGTYPE" in line for line in lines) and w.alive()
    assert len(lines) < 60, len(lines)
    cluster.r.delete(cluster.key("jobs"))
    cluster.enqueue("after-mend-2", "hello again")
    assert cluster.wait_result("after-mend-2", timeout=30)["status"] == b"done"


def test_an_ack_on_a_replaced_stream_does_not_stop_the_worker(cluster):
    """A run ends whose result another attempt wrote: the worker acknowledges its entry
    alone (an XACK outside the transaction). If the stream's key was replaced meanwhile
    (DEL, then a producer's LPUSH), that XACK gets WRONGTYPE: it was taken for the ACL's
    refusal and the worker exited 78, which systemd does not restart."""
    w = cluster.worker("wack")
    cluster.wait_groups()
    cluster.enqueue("slow", " ".join(["w"] * 30), meta={"fake.step_ms": 150})
    wait_until(lambda: cluster.r.hget("duogen:job:slow", "state") == b"running", what="running")
    cluster.r.hset("duogen:result:slow", mapping={"status": "done", "text": "from elsewhere"})
    cluster.r.delete(cluster.key("jobs"))
    cluster.r.lpush(cluster.key("jobs"), "oops")
    wait_until(lambda: "could not acknowledge" in w.logs(), timeout=20, what="the XACK refused")
    time.sleep(1)
    assert w.alive(), w.logs()
    assert cluster.r.hget("duogen:result:slow", "text") == b"from elsewhere"
    cluster.r.delete(cluster.key("jobs"))
    cluster.enqueue("after", "hello there")
    assert cluster.wait_result("after", timeout=30)["status"] == b"done"


def test_metrics_scraped(cluster):
    port = free_port()
    cluster.worker("mw", args=["--metrics-port", str(port), "--max-inflight", "1"])
    cluster.wait_groups()
    # 2 ms a step: the job lasts more than the millisecond the phase seconds are counted in
    cluster.enqueue("m1", "one two three", meta={"fake.images": 1, "fake.step_ms": 2}, steps=3)
    # two words, then the failure: its tokens count, but not in the rate (its decode time is
    # not known: the rate was 6 tokens over m1's time)
    cluster.enqueue("m2", "x y z", meta={"fake.fail": "error", "fake.fail_step": 3, "fake.step_ms": 2})
    cluster.wait_result("m1")
    cluster.wait_result("m2")

    scrape = lambda: scrape_metrics(port)   # noqa: E731
    text = wait_until(lambda: (lambda t: t if t and 'outcome="failed"} 1' in t else None)(scrape()),
                      what="metrics after two jobs")
    values = exposition(text)
    assert values['duogen_jobs_total{worker="mw",outcome="done"}'] == 1
    assert values['duogen_jobs_total{worker="mw",outcome="failed"}'] == 1
    assert values['duogen_jobs_total{worker="mw",outcome="dead_lettered"}'] == 1
    assert values['duogen_tokens_total{worker="mw"}'] == 6
    assert values['duogen_images_total{worker="mw"}'] == 1
    assert values['duogen_denoise_steps_total{worker="mw"}'] == 3
    # the engine's phases cover the job it finished; queue and total both
    assert values['duogen_phase_seconds_count{worker="mw",phase="decode"}'] == 1
    assert values['duogen_phase_seconds_count{worker="mw",phase="total"}'] == 2
    assert values['duogen_phase_seconds_sum{worker="mw",phase="total"}'] > 0
    decode_s = values['duogen_phase_seconds_sum{worker="mw",phase="decode"}']
    rate = values['duogen_tokens_per_second{worker="mw"}']
    # m1's 4 tokens over m1's decode time: 1% for the figures' printed digits
    assert decode_s > 0 and abs(rate * decode_s - 4) < 0.04, (rate, decode_s)
    assert values['duogen_redis_up{worker="mw"}'] == 1
    for cache in ("prefix_kv", "latent", "vision"):
        assert f'duogen_cache_hit_ratio{{worker="mw",cache="{cache}"}}' in values
        assert f'duogen_cache_bytes{{worker="mw",cache="{cache}"}}' in values
    assert 'duogen_kv_pool_bytes{worker="mw"}' in values
    # the phase a result waits in is its own (it was the last engine phase's, and a Redis
    # outage after a job's end made the job look stuck in decode)
    assert values['duogen_job_phase_seconds{worker="mw",phase="writing"}'] == 0
    for stream in ("duogen:jobs", "duogen:jobs:high"):
        wait_until(lambda: f'duogen_queue_lag_entries{{worker="mw",stream="{stream}"}} 0' in (scrape() or ""),
                   what=f"lag figure of {stream}")
    # a backlog on the high stream shows there (the gauges used to cover the normal stream only)
    cluster.enqueue("busy", " ".join(["w"] * 30), meta={"fake.step_ms": 100})
    wait_until(lambda: cluster.r.hget("duogen:job:busy", "state") == b"running", what="busy running")
    for i in range(3):
        cluster.enqueue(f"h{i}", "x", stream="jobs:high")
    wait_until(lambda: 'duogen_queue_lag_entries{worker="mw",stream="duogen:jobs:high"} 3' in (scrape() or ""),
               what="lag of the high stream")
    assert "# TYPE duogen_jobs_total counter" in text


def test_metrics_escape_label_values(cluster):
    """A worker id may hold a double quote or a backslash: the label value is escaped (it was
    written as it is, and the scrape did not parse)."""
    port = free_port()
    wid = 'gpu"0\\a'
    cluster.worker(wid, args=["--metrics-port", str(port)])
    line = 'duogen_worker_ready{worker="gpu\\"0\\\\a"} 1'
    text = wait_until(lambda: (lambda t: t if t and line in t else None)(scrape_metrics(port)), timeout=10,
                      what="the ready line, its worker label escaped")
    exposition(text)


def test_progress_counts_against_the_package_default(cluster):
    """A job that leaves max_new_tokens to the package had progress 0 to its end: the
    denominator is the package's default (the test engine's is 4096)."""
    cluster.worker("pw")
    cluster.wait_groups()
    cluster.enqueue("p1", " ".join(["w"] * 40), meta={"fake.step_ms": 50})
    wait_until(lambda: int(cluster.r.hget("duogen:job:p1", "tokens") or 0) >= 5, what="a few tokens")
    job = cluster.r.hgetall("duogen:job:p1")
    tokens, progress = int(job[b"tokens"]), float(job[b"progress"])
    # progress is written with the tokens of the same flush, at 3 decimals
    assert progress > 0 and abs(progress - tokens / 4096) < 0.0011, job
    assert cluster.wait_result("p1")["status"] == b"done"


def test_metrics_answer_while_loading_and_a_taken_port_fails_the_start(cluster):
    """The metrics endpoint used to start after the model's load and warm-up: a loading
    worker did not answer (DuogenWorkerDown during every long load), and a port that could
    not be bound stopped the worker (exit 78) only once it had loaded."""
    port = free_port()
    cluster.worker("lw", env={"DG_FAKE_LOAD_MS": "3000"}, args=["--metrics-port", str(port)])

    def scrape():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None
    text = wait_until(scrape, timeout=2.5, what="metrics while loading")
    assert 'duogen_worker_ready{worker="lw"} 0' in text and 'duogen_worker_busy{worker="lw"} 0' in text
    wait_until(lambda: 'duogen_worker_ready{worker="lw"} 1' in (scrape() or ""), timeout=15, what="ready")

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        w2 = cluster.worker("pw", env={"DG_FAKE_LOAD_MS": "20000"},
                            args=["--metrics-port", str(taken.getsockname()[1])])
        assert w2.proc.wait(10) == 78, "a taken metrics port was found only after the load"
        assert "metrics: cannot listen" in w2.logs()
    finally:
        taken.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.read().decode()
    except OSError:
        return None


def test_metrics_listen_on_the_address_given(cluster):
    """metrics_address: 127.0.0.1 by default; an interface's address (IPv4 or IPv6) or every
    interface where a central Prometheus scrapes the hosts; anything but an address is
    refused at start."""
    port = free_port()
    cluster.worker("ma0", args=["--metrics-port", str(port), "--metrics-address", "0.0.0.0"])
    text = wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), what="metrics on 0.0.0.0")
    assert 'duogen_worker_ready{worker="ma0"}' in text
    assert f"metrics on http://0.0.0.0:{port}/metrics" in cluster.workers[-1].logs()
    for i, bad in enumerate(["localhost", "[::1]", "10.0.0.300", ""]):
        w = cluster.worker(f"mab{i}", args=["--metrics-port", str(free_port()), "--metrics-address", bad])
        assert w.proc.wait(10) == 78, bad
        assert f'metrics_address: "{bad}" is not an IPv4 or IPv6 address' in w.logs(), w.logs()


def test_metrics_are_served_beside_idle_connections(cluster):
    """Connections were served one after another, each given a second for its request: a
    dozen idle ones (a port scan, a load balancer's TCP check) held a scrape 12 s, past
    Prometheus's 10 s timeout (DuogenWorkerDown on a healthy worker). Now side by side: a
    scrape with 20 idle connections open answers at once. HEAD gets the headers only; a
    worker id that is not UTF-8 is refused at start (it made every scrape unparseable)."""
    port = free_port()
    cluster.worker("mi", args=["--metrics-port", str(port)])
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), what="metrics")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            assert 'duogen_worker_ready{worker="mi"} 1' in r.read().decode()
    finally:
        for c in idle:
            c.close()
    h = socket.create_connection(("127.0.0.1", port))
    h.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while True:
        chunk = h.recv(65536)
        if not chunk:
            break
        got += chunk
    h.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: " in head and body == b"", got[:300]
    bad = cluster.worker("gpu\udcff0")   # the byte 0xff in argv (surrogateescape)
    assert bad.proc.wait(10) == 78
    assert "worker_id: not UTF-8 at byte 3" in bad.logs(), bad.logs()


def test_metrics_listen_on_an_ipv6_address(cluster):
    why = ipv6_missing()
    if why:
        pytest.skip(why)
    port = free_port()
    w = cluster.worker("ma6", args=["--metrics-port", str(port), "--metrics-address", "::1"])
    text = wait_until(lambda: _get(f"http://[::1]:{port}/metrics"), what="metrics on ::1")
    assert 'duogen_worker_ready{worker="ma6"}' in text
    assert _get(f"http://127.0.0.1:{port}/metrics") is None   # there only
    assert f"metrics on http://[::1]:{port}/metrics" in w.logs()


def test_sentinel_failover_mid_job(tmpdir_path):
    d1, d2, ds = (os.path.join(tmpdir_path, n) for n in ("m", "r", "s"))
    for d in (d1, d2, ds):
        os.makedirs(d)
    master = RedisServer(d1, appendonly=True)
    replica = RedisServer(d2, appendonly=True, extra=["--replicaof", "127.0.0.1", str(master.port)])
    sport = free_port()
    sconf = write(os.path.join(ds, "sentinel.conf"),
                  f"port {sport}\nbind 127.0.0.1\ndir {ds}\n"
                  f"sentinel monitor dq 127.0.0.1 {master.port} 1\n"
                  "sentinel down-after-milliseconds dq 1000\nsentinel failover-timeout dq 5000\n")
    sentinel = subprocess.Popen(["redis-server", sconf, "--sentinel"], stdout=subprocess.DEVNULL)
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model)
    w = None
    try:
        s = redis.Redis(port=sport, socket_timeout=5)
        wait_until(lambda: _ping(s), what="sentinel")
        wait_until(lambda: master.client().info("replication")["connected_slaves"] == 1, what="replica")
        w = Worker(tmpdir_path, "redis://127.0.0.1:1/0", "sw", model,
                   args=["--sentinel", f"127.0.0.1:{sport}", "--master-name", "dq"])
        r = master.client()
        wait_until(lambda: r.exists("duogen:jobs"), what="group on the master")
        words = " ".join(f"w{i}" for i in range(40))
        r.xadd("duogen:jobs", {"id": "fo", "job": make_job("fo", words, meta={"fake.step_ms": 100}).SerializeToString()})
        wait_until(lambda: r.hget("duogen:job:fo", "state") == b"running", what="job running")
        time.sleep(0.5)
        # what the master acknowledged has reached the replica (replication is asynchronous:
        # without this a loaded machine can lose the job with the master, see deploy/README.md)
        assert r.execute_command("WAIT", 1, 10000) == 1
        rc = replica.client()
        wait_until(lambda: rc.hget("duogen:job:fo", "state") in (b"running", b"done"), what="the job on the replica")
        master.stop(hard=True)          # the master dies in the middle of the job

        def new_master():
            addr = s.execute_command("SENTINEL", "get-master-addr-by-name", "dq")
            return addr and int(addr[1]) == replica.port
        wait_until(new_master, timeout=30, what="failover to the replica")
        r2 = replica.client()
        res = wait_until(lambda: r2.hgetall("duogen:result:fo") or None, timeout=40, what="result on the new master")
        assert res[b"status"] == b"done"
        assert res[b"text"].decode() == "Echo: " + words
        assert [f[b"id"] for _, f in r2.xrange("duogen:done")] == [b"fo"]
        assert r2.xpending("duogen:jobs", "duogen")["pending"] == 0
        assert w.alive()
        # and new jobs go on through the new master
        r2.xadd("duogen:jobs", {"id": "after-fo", "job": make_job("after-fo", "hi").SerializeToString()})
        assert wait_until(lambda: r2.hgetall("duogen:result:after-fo") or None, timeout=20)[b"status"] == b"done"
    finally:
        stop_all(w, sentinel, master, replica)


def test_systemd_units_verify_and_make_install(tmpdir_path):
    dest = os.path.join(tmpdir_path, "dest")
    p = subprocess.run(["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/duogen"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    root = os.path.join(dest, "opt", "duogen")
    for f in ("bin/duogend", "bin/duogenctl", "lib/systemd/system/duogend@.service",
              "lib/systemd/system/duogend.target", "lib/sysusers.d/duogen.conf", "lib/tmpfiles.d/duogen.conf",
              "share/duogen/examples/duogend.conf.example", "share/duogen/examples/users.acl.example"):
        assert os.path.exists(os.path.join(root, f)), f
    unit = open(os.path.join(root, "lib/systemd/system/duogend@.service")).read()
    assert "ExecStart=/opt/duogen/bin/duogend " in unit
    for must in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure",
                 "RestartPreventExitStatus=78", "KillMode=mixed", "TimeoutStopSec=", "DevicePolicy=closed",
                 "DeviceAllow=char-nvidia-uvm rw", "LoadCredential=redis-password:"):
        assert must in unit, must
    assert "PrivateDevices" not in unit.replace("# Hardening that still reaches the GPU: no PrivateDevices= (it hides /dev/nvidia*)", "")
    assert "--password-file ${CREDENTIALS_DIRECTORY}/redis-password" in unit
    assert not re.search(r"ExecStart=.*(password|secret)\s*=", unit)

    # systemd-analyze verify: the installed units, with the built binary in place
    vdir = os.path.join(tmpdir_path, "units")
    os.makedirs(vdir)
    shutil.copy(os.path.join(root, "lib/systemd/system/duogend.target"), vdir)
    with open(os.path.join(vdir, "duogend@.service"), "w") as f:
        f.write(unit.replace("/opt/duogen/bin/duogend", os.path.join(root, "bin", "duogend")))
    os.symlink("duogend@.service", os.path.join(vdir, "duogend@0.service"))
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", "./duogend@0.service", "./duogend.target"],
                       cwd=vdir, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr

    # `systemctl enable duogend@0` must make the worker start at boot: its target enabled too
    # (it used to link the worker into duogend.target only, which nothing started)
    sroot = os.path.join(tmpdir_path, "sroot")
    os.makedirs(os.path.join(sroot, "etc/systemd/system"))
    for u in ("duogend@.service", "duogend.target"):
        shutil.copy(os.path.join(root, "lib/systemd/system", u), os.path.join(sroot, "etc/systemd/system"))
    p = subprocess.run(["systemctl", f"--root={sroot}", "enable", "duogend@0"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(["systemctl", f"--root={sroot}", "is-enabled", "duogend.target"], capture_output=True,
                       text=True, timeout=60)
    assert p.stdout.strip() == "enabled", p.stdout + p.stderr
    assert os.path.islink(os.path.join(sroot, "etc/systemd/system/multi-user.target.wants/duogend.target"))
    # the current drivers' device names are allowed (the unit had only the pre-545 one)
    for dev in ("char-nvidia rw", "char-nvidiactl rw", "char-nvidia-frontend rw"):
        assert f"DeviceAllow={dev}\n" in unit, dev

    # make uninstall takes back every file install wrote (there was no such target)
    p = subprocess.run(["make", "-s", "uninstall", f"DESTDIR={dest}", "PREFIX=/opt/duogen"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    left = [os.path.join(d, f) for d, _, fs in os.walk(dest) for f in fs]
    assert left == [], left


def test_metrics_connections_leave_the_jobs_their_files(cluster, tmpdir_path):
    """Under a low open-file limit the endpoint served 32 connections at once, and clients
    that held them open took the descriptors the next image's file needed (the job was
    dead-lettered EMFILE); when accept() itself failed the listener stayed readable and the
    metrics thread spun a core. Now a quarter of the limit above 64 (here: 1), and a failed
    accept waits a second."""
    import resource
    port, root = free_port(), os.path.join(tmpdir_path, "root")
    os.makedirs(root)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # inherited by the worker started now; room for what this test process holds open (a
    # failed test before it keeps its sockets): the cap stays 1 up to 68, 2 at 72
    limit = max(40, len(os.listdir("/proc/self/fd")) + 16)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        w = cluster.worker("fd", args=["--metrics-port", str(port), "--output-root", root])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), what="metrics")
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
    try:
        time.sleep(0.5)
        open_fds = len(os.listdir(f"/proc/{w.proc.pid}/fd"))
        assert open_fds < 20, open_fds   # the 40 clients wait in the backlog, not in the worker
        for i in range(3):
            cluster.r.xadd(cluster.key("jobs"), {"id": f"fd{i}", "job": make_job(
                f"fd{i}", "draw", meta={"fake.images": 2}).SerializeToString()})
        for i in range(3):
            res = cluster.wait_result(f"fd{i}")
            assert res["status"] == b"done", res
            assert sorted(os.listdir(os.path.join(root, f"fd{i}"))) == ["1.png", "2.png"]
    finally:
        for c in idle:
            c.close()
    wait_until(lambda: _get(f"http://127.0.0.1:{port}/metrics"), timeout=60, what="metrics after the clients left")
    assert "Too many open files" not in w.logs()


def test_an_acl_or_a_server_without_the_lease_commands_is_refused_at_start(tmpdir_path):
    """XCLAIM renews a running job's lease and XAUTOCLAIM takes over a dead worker's jobs.
    Refused (an ACL without them, or renamed away by rename-command) they were never said: the
    keeper's renewals failed in silence, two live workers took a long job from each other and
    it was dead-lettered as "the worker died". Now the start's check asks both."""
    log = refused_at_start(tmpdir_path, lambda acl: acl.replace(" +xclaim ", " "), "duogen:jobs", "noclaim")
    assert "XCLAIM, which renews a running job's lease" in log
    d = os.path.join(tmpdir_path, "renamed")
    os.makedirs(d)
    c = Cluster(d, extra=["--rename-command", "XAUTOCLAIM", ""])
    try:
        w = c.worker("renamed")
        assert w.proc.wait(30) == 78
        assert "Redis refuses this worker a command it needs (ERR unknown command" in w.logs(), w.logs()
    finally:
        c.close()


def test_renewals_refused_at_runtime_are_said(tmpdir_path):
    """XCLAIM taken from the worker's ACL while a job runs: the keeper says it (the lease
    lapses and another worker may take the job over), and says when renewals go through
    again; the job still gets its one result."""
    lines = {}
    def with_admin(acl):
        lines["worker"] = next(l for l in acl.splitlines() if l.startswith("user duogen-worker "))
        return acl + "user admin on >admin-pw ~* &* +@all\n"
    srv, pw, client = start_acl_redis(tmpdir_path, with_admin)
    selectors = re.findall(r"\([^)]*\)", lines["worker"])   # XCLAIM is granted in the streams' selector
    assert any(" +xclaim " in s for s in selectors)
    w = None
    try:
        admin = redis.Redis(port=srv.port, username="admin", password="admin-pw", socket_timeout=10)
        w = worker_as(tmpdir_path, srv, "worker", pw["worker"], "renewer")
        client("producer").xadd("duogen:jobs", {"id": "long", "job": make_job(
            "long", " ".join(["w"] * 40), meta={"fake.step_ms": 100}).SerializeToString()})
        wait_until(lambda: client("producer").hget("duogen:job:long", "state") == b"running", what="the job running")
        admin.execute_command("ACL", "SETUSER", "duogen-worker", "clearselectors",
                              *[s.replace(" +xclaim ", " ") for s in selectors])
        wait_until(lambda: "Redis refuses to renew the lease of a running job" in w.logs(), what="the refusal said")
        admin.execute_command("ACL", "SETUSER", "duogen-worker", "clearselectors", *selectors)
        wait_until(lambda: "lease renewals go through again" in w.logs(), what="renewals again")
        res = wait_until(lambda: client("producer").hgetall("duogen:result:long") or None, timeout=30, what="result")
        assert res[b"status"] == b"done"
        assert "NOPERM" in w.logs()
    finally:
        if w:
            w.kill()
        srv.proc.kill()
        srv.proc.wait(10)
