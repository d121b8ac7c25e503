"""Redis over TLS (rediss://, daemon/tls.c): workers and duogenctl through a redis-server that
speaks TLS, with certificates this test makes with openssl. The checks a TLS client owes (the
server's certificate against the CA and the host name; a client certificate where the server
asks for one) and their refusals said plainly; a connection that heals over TLS as over TCP,
with no relay thread left behind; certificate files read again at every connect."""
import os
import random
import re
import subprocess
import sys

import pytest

from conftest import BUILD, ROOT, Cluster, free_port, png_bytes, wait_until

sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
from certs import make_ca, make_cert  # noqa: E402  (tools/bench/certs.py: openssl)

CTL = os.path.join(BUILD, "duogenctl")


@pytest.fixture
def pki(tmpdir_path):
    d = os.path.join(tmpdir_path, "pki")
    os.makedirs(d)
    make_ca(d, "ca")
    make_ca(d, "other")   # a CA that signed nothing the server shows
    make_cert(d, "ca", "server", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "other", "server2", "DNS:localhost,IP:127.0.0.1")   # the same names, another CA
    make_cert(d, "ca", "client", None)
    make_cert(d, "other", "client2", None)   # a client certificate the server does not trust
    return lambda name: os.path.join(d, name)


def tls_cluster(tmpdir_path, pki, auth_clients="optional"):
    """A cluster whose Redis takes TLS on a port of its own beside the plain one the harness
    reads with; auth_clients: redis' tls-auth-clients (optional: it asks for a client
    certificate and takes a connection without one)."""
    port = free_port()
    c = Cluster(tmpdir_path, extra=["--tls-port", str(port), "--tls-cert-file", pki("server.pem"),
                                    "--tls-key-file", pki("server.key"), "--tls-ca-cert-file", pki("ca.pem"),
                                    "--tls-auth-clients", auth_clients])
    c.tls_port = port
    return c


def ctl(url, *args, timeout=60):
    return subprocess.run([CTL, "--redis", url] + list(args), capture_output=True, text=True, timeout=timeout)


def threads_of(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def clients_on(cluster):
    """The named clients (workers, keepers, duogenctl) and the port each reached the server on."""
    return [(c["name"], int(c["laddr"].rsplit(":", 1)[1])) for c in cluster.r.client_list() if c["name"]]


def test_jobs_and_duogenctl_over_tls(tmpdir_path, pki):
    c = tls_cluster(tmpdir_path, pki)
    try:
        url = f"rediss://localhost:{c.tls_port}/0"
        w = c.worker("t1", redis_url=url, args=["--tls-ca-file", pki("ca.pem")])
        c.wait_heartbeat("t1", "idle")
        # every connection of the worker (its own, its keeper's) reached the TLS port
        wait_until(lambda: {"t1", "t1:keeper"} <= {n for n, _ in clients_on(c)}, what="the worker's connections")
        assert {p for n, p in clients_on(c) if n.startswith("t1")} == {c.tls_port}, clients_on(c)

        # a picture of random bytes (no compression: ~3 MB) up through duogenctl's relay and
        # down through the worker's; two drawn ones back up
        rng = random.Random(7)
        img = os.path.join(tmpdir_path, "big.png")
        with open(img, "wb") as f:
            f.write(png_bytes(1024, 1024, lambda y: [rng.randrange(256) for _ in range(1024 * 3)]))
        assert os.path.getsize(img) > 3_000_000
        out = os.path.join(tmpdir_path, "out")
        p = ctl(url, "--tls-ca-file", pki("ca.pem"), "enqueue", "--id", "tls-1", "--image", img,
                "--param", "meta.fake.images=2", "--param", "width=512", "--param", "height=512",
                "--out", out, "over", "tls")
        assert p.returncode == 0, p.stderr
        assert "Echo: over tls" in re.sub(r"\n\[image \d: [^\]]*\]\n", "", p.stdout), p.stdout
        assert open(os.path.join(out, "image-2.png"), "rb").read()[:4] == b"\x89PNG"
        assert c.result("tls-1")["status"] == b"done"
        # the files from the environment, as the URL (an operator's shell, rollout.sh); an
        # option still wins over them
        env = dict(os.environ, DUOGEN_REDIS=url, DUOGEN_TLS_CA_FILE=pki("ca.pem"))
        p = subprocess.run([CTL, "result", "tls-1"], env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "status: done" in p.stdout, p
        p = subprocess.run([CTL, "--tls-ca-file", pki("other.pem"), "result", "tls-1"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 3 and "was refused" in p.stderr, p
        # an address in the URL is checked against the certificate's IP entry
        p = ctl(f"rediss://127.0.0.1:{c.tls_port}/0", "--tls-ca-file", pki("ca.pem"), "result", "tls-1")
        assert p.returncode == 0 and "status: done" in p.stdout, p
        assert w.alive()
    finally:
        c.close()


def test_refusals_are_said_and_the_worker_waits(tmpdir_path, pki):
    c = tls_cluster(tmpdir_path, pki)
    try:
        url = f"rediss://localhost:{c.tls_port}/0"
        # a CA that did not sign the server's certificate: refused, said, retried (not fatal:
        # a CA file rotated on disk is read at the next connect)
        w = c.worker("t2", redis_url=url, args=["--tls-ca-file", pki("other.pem")])
        wait_until(lambda: "was refused" in w.logs(), what="the refusal in the log")
        assert 'the server\'s certificate for "localhost" was refused: self-signed certificate in certificate ' \
               'chain: no CA of tls_ca_file' in w.logs(), w.logs()
        assert w.alive() and not c.r.exists(c.key("worker", "t2"))

        p = ctl(url, "--tls-ca-file", pki("other.pem"), "stats")
        assert p.returncode == 3 and "was refused: self-signed certificate in certificate chain" in p.stderr, p
        # a name the certificate does not carry
        p = ctl(url, "--tls-ca-file", pki("ca.pem"), "--tls-server-name", "redis.example", "stats")
        assert p.returncode == 3 and 'certificate for "redis.example" was refused: hostname mismatch' in p.stderr, p
        # plain RESP to the TLS port; TLS to the plain one
        p = ctl(f"redis://localhost:{c.tls_port}/0", "stats")
        assert p.returncode == 3 and "is it a TLS port? rediss:// speaks TLS" in p.stderr, p
        p = ctl(f"rediss://localhost:{c.server.port}/0", "--tls-ca-file", pki("ca.pem"), "stats")
        assert p.returncode == 3 and "TLS handshake: " in p.stderr, p
        # files: missing, not of their kind, a key that is not the certificate's; TLS
        # settings with a plain URL
        p = ctl(url, "--tls-ca-file", pki("nope.pem"), "stats")
        assert p.returncode == 3 and "--tls-ca-file" in p.stderr and "No such file or directory" in p.stderr, p
        p = ctl(url, "--tls-ca-file", pki("ca.key"), "stats")
        assert p.returncode == 2 and 'tls_ca_file "' in p.stderr and "no certificate or crl found" in p.stderr, p
        p = ctl(url, "--tls-ca-file", pki("ca.pem"), "--tls-cert-file", pki("client.pem"),
                "--tls-key-file", pki("server.key"), "stats")
        assert p.returncode == 2 and "is not the key of tls_cert_file" in p.stderr, p
        p = ctl(c.server.url, "--tls-ca-file", pki("ca.pem"), "stats")
        assert p.returncode == 2 and "is not rediss://" in p.stderr, p
        # an encrypted key: said as such, with no pass phrase asked for (on a terminal, as
        # OpenSSL's default did, twice over, before "no PEM private key read")
        subprocess.run(["openssl", "pkey", "-in", pki("client.key"), "-aes128", "-passout", "pass:secret",
                        "-out", pki("client-enc.key")], check=True, capture_output=True)
        p = ctl(url, "--tls-ca-file", pki("ca.pem"), "--tls-cert-file", pki("client.pem"),
                "--tls-key-file", pki("client-enc.key"), "stats")
        assert p.returncode == 2 and 'client-enc.key" is encrypted: the key must be readable without a pass ' \
            'phrase' in p.stderr, p
        for args, said in ((["--tls-ca-file", pki("nope.pem")], "tls_ca_file"),
                           (["--tls-key-file", pki("client.key")], "tls_key_file"),
                           (["--tls-cert-file", pki("client.pem"), "--tls-key-file", pki("client-enc.key")],
                            "is encrypted")):
            bad = c.worker(redis_url=url, args=args)
            assert bad.proc.wait(30) == 78, bad.logs()
            assert said in bad.logs(), bad.logs()
        bad = c.worker(redis_url=c.server.url, args=["--tls-server-name", "localhost"])
        assert bad.proc.wait(30) == 78 and "is not rediss://" in bad.logs(), bad.logs()

        # the right CA written over the file the worker reads: taken at its next connect
        with open(pki("other.pem"), "wb") as f:
            f.write(open(pki("ca.pem"), "rb").read())
        c.wait_heartbeat("t2", "idle")
        c.enqueue("tls-2", text="rotated")
        assert c.wait_result("tls-2")["status"] == b"done"
    finally:
        c.close()


def test_client_certificates(tmpdir_path, pki):
    c = tls_cluster(tmpdir_path, pki, auth_clients="yes")
    try:
        url = f"rediss://localhost:{c.tls_port}/0"
        # TLS 1.3: the server refuses the missing certificate after the handshake, when the
        # first command may be on its way, through a relay whose server side has ended: said,
        # every time (duogenctl once died of SIGPIPE writing it, 2 runs in 12); 25 tries
        for _ in range(25):
            p = ctl(url, "--tls-ca-file", pki("ca.pem"), "stats")
            assert p.returncode == 3, p
            assert "the server asked for a client certificate, and none is set: tls_cert_file and tls_key_file" \
                in p.stderr, p.stderr
        # a certificate of a CA the server does not trust: the alert, or the reset that often
        # overtakes it (7 runs in 10 said only "Connection reset by peer"), said as a refusal
        for _ in range(10):
            p = ctl(url, "--tls-ca-file", pki("ca.pem"), "--tls-cert-file", pki("client2.pem"), "--tls-key-file",
                    pki("client2.key"), "stats")
            assert p.returncode == 3, p
            assert "unknown ca" in p.stderr or "the server may have refused the client certificate" in p.stderr, \
                p.stderr
        mine = ["--tls-ca-file", pki("ca.pem"), "--tls-cert-file", pki("client.pem"), "--tls-key-file",
                pki("client.key")]
        p = ctl(url, *mine, "stats")
        assert p.returncode == 0, p
        c.worker("t3", redis_url=url, args=mine)
        p = ctl(url, *mine, "enqueue", "--id", "tls-3", "--wait", "with", "a", "certificate")
        assert p.returncode == 0 and "Echo: with a certificate" in p.stdout, p
    finally:
        c.close()


def test_connections_heal_over_tls_without_leaving_threads(tmpdir_path, pki):
    """Redis killed and started again on the same ports, twice: the worker reconnects over
    TLS and runs jobs; each relay thread of a lost connection was joined (the worker's
    thread count is what it was). Then Redis comes back with a certificate of another CA:
    refused until the worker's CA file names that CA."""
    c = tls_cluster(tmpdir_path, pki)
    try:
        url = f"rediss://localhost:{c.tls_port}/0"
        ca = os.path.join(tmpdir_path, "ca-bundle.pem")
        with open(ca, "wb") as f:
            f.write(open(pki("ca.pem"), "rb").read())
        w = c.worker("t4", redis_url=url, args=["--tls-ca-file", ca])
        c.wait_heartbeat("t4", "idle")
        c.enqueue("heal-0")
        assert c.wait_result("heal-0")["status"] == b"done"
        before = threads_of(w.proc.pid)
        for i in (1, 2):
            c.server.stop(hard=True)
            c.server.start()
            c.r = c.server.client()
            c.wait_heartbeat("t4", "idle")
            c.enqueue(f"heal-{i}")
            assert c.wait_result(f"heal-{i}", timeout=30)["status"] == b"done"
            wait_until(lambda: threads_of(w.proc.pid) == before, what=f"the worker's threads back to {before}")
        assert w.logs().count("Redis connection lost") >= 2, w.logs()

        c.server.stop(hard=True)
        c.server.extra = [a.replace("server.", "server2.") for a in c.server.extra]
        c.server.start()
        c.r = c.server.client()
        wait_until(lambda: "unable to get local issuer certificate: no CA of tls_ca_file" in w.logs(),
                   what="the refusal")
        with open(ca, "ab") as f:   # the bundle now holds both CAs
            f.write(open(pki("other.pem"), "rb").read())
        c.wait_heartbeat("t4", "idle")
        c.enqueue("heal-3")
        assert c.wait_result("heal-3", timeout=30)["status"] == b"done"
        assert w.alive()
    finally:
        c.close()


def test_sentinel_over_tls(tmpdir_path, pki):
    """With Sentinels and a rediss:// URL the worker asks the Sentinel over TLS (its TLS port
    only) for the master, then reaches the master's TLS port, the certificate checked
    against the address the Sentinel named."""
    c = tls_cluster(tmpdir_path, pki)
    ds = os.path.join(tmpdir_path, "s")
    os.makedirs(ds)
    sport = free_port()
    tls = (f"tls-cert-file {pki('server.pem')}\ntls-key-file {pki('server.key')}\n"
           f"tls-ca-cert-file {pki('ca.pem')}\ntls-auth-clients no\ntls-replication yes\n")
    with open(os.path.join(ds, "sentinel.conf"), "w") as f:
        f.write(f"port 0\ntls-port {sport}\nbind 127.0.0.1\ndir {ds}\n{tls}"
                f"sentinel monitor dq 127.0.0.1 {c.tls_port} 1\n")
    sentinel = subprocess.Popen(["redis-server", os.path.join(ds, "sentinel.conf"), "--sentinel"],
                                stdout=subprocess.DEVNULL)
    try:
        w = c.worker("ts", redis_url="rediss://127.0.0.1:1/0",
                     args=["--sentinel", f"localhost:{sport}", "--master-name", "dq", "--tls-ca-file", pki("ca.pem")])
        c.wait_heartbeat("ts", "idle")
        # the keeper's beat can come before the main loop's connect: wait for both
        wait_until(lambda: {"ts", "ts:keeper"} <= {n for n, _ in clients_on(c)}, what="the worker's connections")
        assert {p for n, p in clients_on(c) if n.startswith("ts")} == {c.tls_port}, clients_on(c)
        c.enqueue("tls-s", text="through a sentinel")
        assert c.wait_result("tls-s")["text"] == b"Echo: through a sentinel"
        assert w.alive()
    finally:
        sentinel.kill()
        sentinel.wait(10)
        c.close()


@pytest.mark.parametrize("lang", ["python", "ruby", "go"])
def test_example_producers_over_tls(tmpdir_path, pki, lang):
    """The example producers with a rediss:// URL and --tls-ca-file (their clients' own TLS):
    the job runs on a worker over TLS and the answer comes back. (The C one is plain TCP:
    hiredis 0.14 has no TLS.)"""
    from test_producers import producer
    cmd, env = producer(lang)
    c = tls_cluster(tmpdir_path, pki)
    try:
        url = f"rediss://localhost:{c.tls_port}/0"
        c.worker("tp", redis_url=url, args=["--tls-ca-file", pki("ca.pem")])
        img = os.path.join(tmpdir_path, "in.png")
        with open(img, "wb") as f:
            f.write(png_bytes(8, 8, lambda y: [y * 30] * 24))
        out = os.path.join(tmpdir_path, "out")
        p = subprocess.run(cmd + ["--redis", url, "--tls-ca-file", pki("ca.pem"), "--id", f"tls-{lang}",
                                  "--image", img, "--out", out, "hello", "tls"],
                           env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, (p.stdout, p.stderr)
        assert p.stdout.splitlines()[0] == f"enqueued tls-{lang}" and "done" in p.stdout.splitlines(), p.stdout
        assert "Echo: hello tls" in open(os.path.join(out, "answer.md")).read()
        # and without the CA, the server's certificate is refused by the client's own check
        p = subprocess.run(cmd + ["--redis", url, "--id", f"tls-{lang}-2", "--image", img, "--out", out, "x"],
                           env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
        assert p.returncode == 3 and "certificate" in p.stderr.lower(), (p.stdout, p.stderr)
    finally:
        c.close()
