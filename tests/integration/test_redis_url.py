"""Redis URLs as operators write them: an IPv6 address in brackets, a password with the
characters a URL reserves written %XX, Sentinels at IPv6 addresses. The worker, duogenctl and
every example producer read the same URL the same way, and no log or error shows the password
a URL holds."""
import os
import re
import subprocess
import sys

import pytest
import redis

from conftest import ROOT, Cluster, RedisServer, Worker, free_port, ipv6_missing, make_job, wait_until
from test_fleet_ops import _ping, stop_all
from test_producers import LANGS, png, producer
from test_tls import ctl

sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
from certs import have_openssl, make_ca, make_cert  # noqa: E402  (tools/bench/certs.py: openssl)

# '@', ':' and '/' end the user information, the host and the authority in a URL; '%' starts
# an escape: a password holding them is written %40, %3A, %2F, %25 (RFC 3986 2.1)
PASSWORD = "s3cr@t:pa/ss%w0rd"
ESCAPED = "s3cr%40t%3Apa%2Fss%25w0rd"


@pytest.fixture
def v6_cluster(cluster):
    """The cluster's Redis listening on ::1 too, with PASSWORD required."""
    why = ipv6_missing()
    if why:
        pytest.skip(why)
    cluster.r.config_set("bind", "127.0.0.1 ::1")
    cluster.r.config_set("requirepass", PASSWORD)
    cluster.r = cluster.server.client(password=PASSWORD)
    cluster.url = f"redis://:{ESCAPED}@[::1]:{cluster.server.port}/0"
    return cluster


def test_worker_and_duogenctl_over_ipv6_with_an_escaped_password(v6_cluster, tmpdir_path):
    c = v6_cluster
    w = c.worker("v6w", redis_url=c.url)
    c.wait_heartbeat("v6w", "idle")
    # the worker's connection comes from ::1, and it authenticated with the decoded password
    clients = c.r.client_list()
    assert any(cl["name"] == "v6w" and cl["addr"].startswith("[::1]:") for cl in clients), clients
    out = os.path.join(tmpdir_path, "out")
    p = ctl(c.url, "enqueue", "--id", "v6-1", "--param", "meta.fake.images=1", "--out", out, "make", "soup")
    assert p.returncode == 0, p.stderr
    assert c.result("v6-1")["status"] == b"done"
    assert open(os.path.join(out, "image-1.png"), "rb").read() == c.r.get("duogen:image:v6-1:1")
    p = ctl(c.url, "top", "--once")
    assert p.returncode == 0, p.stderr
    assert f"[::1]:{c.server.port}/0" in p.stdout.splitlines()[0] and "v6w" in p.stdout, p.stdout
    # the start line shows the URL with its password as ***
    log = w.logs()
    assert f"Redis redis://:***@[::1]:{c.server.port}/0" in log, log
    assert PASSWORD not in log and ESCAPED not in log


@pytest.mark.parametrize("lang", LANGS)
def test_producers_read_the_same_url(v6_cluster, tmpdir_path, lang):
    argv, env = producer(lang)
    c = v6_cluster
    c.worker("v6p", redis_url=c.url)
    image = os.path.join(tmpdir_path, "in.png")
    with open(image, "wb") as f:
        f.write(png(8, 8, 3))
    out = os.path.join(tmpdir_path, "out")
    p = subprocess.run(argv + ["--redis", c.url, "--id", f"v6-{lang}", "--image", image, "--out", out,
                               "--meta", "fake.images=1", "make", "soup"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
    assert p.returncode == 0, p.stdout + p.stderr
    assert c.result(f"v6-{lang}")["status"] == b"done"
    assert open(os.path.join(out, "image-1.png"), "rb").read() == c.r.get(f"duogen:image:v6-{lang}:1")
    # a wrong password: refused, said, and not shown
    bad = c.url.replace(ESCAPED, "wrong%40pass")
    p = subprocess.run(argv + ["--redis", bad, "--id", f"v6-{lang}-2", "--image", image, "--out", out, "x"],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))
    assert p.returncode == 3, p.stdout + p.stderr
    assert "wrong@pass" not in p.stderr and "wrong%40pass" not in p.stderr, p.stderr


@pytest.mark.parametrize("url, said", [
    ("redis://::1:6379/0", "more than one ':' (an IPv6 address goes in brackets: [::1]:6379)"),
    ("redis://[::1:6379/0", "'[' without ']'"),
    ("redis://[::g]:6379/0", "not an IPv6 address in brackets"),
    ("redis://[::1]6379/0", "text after ']' that is not :port"),
    ("redis://:hunter%2@[::1]:6379/0", "a password too long, or with a '%' not followed by two hex digits"),
    ("redis://:hunter2@[::1]:0/0", "a port that is not 1..65535"),
    ("redis://:hunter2@127.0.0.1:6379/zero", "a database that is not a number"),
    ("redis://:hunter2@127.0.0.1:6379?db=1", "a query (?...) or fragment (#...)"),
    ("unix:///run/redis.sock?db=one", "a query that is not ?db=N"),
])
def test_a_bad_url_says_what_is_wrong_and_never_the_password(tmpdir_path, url, said):
    """Exit 78 (the worker) and 2 (duogenctl, a usage error), the reason named; a password
    in the URL is shown as ***."""
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model, exist_ok=True)
    w = Worker(tmpdir_path, url, "badurl", model)
    try:
        assert w.proc.wait(20) == 78
    finally:
        w.kill()
    p = ctl(url, "stats")
    for text in (w.logs(), p.stderr):
        assert f"redis_url \"{re.sub(':hunter[^@]*@', ':***@', url)}\": {said}" in text, text
        assert "hunter" not in text
    assert p.returncode == 2, p.stderr


def test_a_sentinel_at_an_ipv6_address_names_an_ipv6_master(tmpdir_path):
    """The Sentinel listens on ::1 ([::1]:port in the list) and names the master by its IPv6
    address: the worker asks it, connects to the master there and runs a job."""
    why = ipv6_missing()
    if why:
        pytest.skip(why)
    dm, ds = os.path.join(tmpdir_path, "m"), os.path.join(tmpdir_path, "s")
    os.makedirs(dm)
    os.makedirs(ds)
    master = RedisServer(dm, extra=["--bind", "127.0.0.1 ::1"])
    sport = free_port()
    with open(os.path.join(ds, "sentinel.conf"), "w") as f:
        f.write(f"port {sport}\nbind ::1\ndir {ds}\nsentinel monitor m6 ::1 {master.port} 1\n")
    sentinel = subprocess.Popen(["redis-server", os.path.join(ds, "sentinel.conf"), "--sentinel"],
                                stdout=subprocess.DEVNULL)
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model)
    w = None
    try:
        s = redis.Redis(host="::1", port=sport, socket_timeout=5)
        wait_until(lambda: _ping(s), what="the Sentinel")
        w = Worker(tmpdir_path, "redis://127.0.0.1:1/0", "s6", model,
                   args=["--sentinel", f"[::1]:{sport}", "--master-name", "m6"])
        r = master.client()
        wait_until(lambda: r.exists("duogen:jobs"), what="the group on the master")
        r.xadd("duogen:jobs", {"id": "s6-1", "job": make_job("s6-1", "hello").SerializeToString()})
        res = wait_until(lambda: r.hgetall("duogen:result:s6-1") or None, timeout=20, what="the result")
        assert res[b"status"] == b"done"
        assert any(cl["name"] == "s6" and cl["addr"].startswith("[::1]:") for cl in r.client_list())
    finally:
        stop_all(w, sentinel, master)


def test_a_bad_sentinel_list_says_what_is_wrong(tmpdir_path):
    model = os.path.join(tmpdir_path, "model")
    os.makedirs(model, exist_ok=True)
    for i, (lst, said) in enumerate([("::1:26379", "more than one ':'"), ("[::1]", "a Sentinel without its :port"),
                                     ("[::1]:26379,,[::1]:26380", "no host"),
                                     ("[fe80::1%eth0]:26379", "not an IPv6 address in brackets")]):
        w = Worker(tmpdir_path, "redis://127.0.0.1:1/0", f"s6bad{i}", model,
                   args=["--sentinel", lst, "--master-name", "m"])
        try:
            assert w.proc.wait(20) == 78
        finally:
            w.kill()
        assert f"sentinel \"{lst}\": {said}" in w.logs(), w.logs()


def test_tls_to_an_ipv6_address_checks_the_certificates_ip_entries(tmpdir_path):
    """rediss://[::1]:port: the server's certificate must carry IP ::1 (checked as an address,
    no SNI); one that names only localhost and 127.0.0.1 is refused, saying so."""
    why = ipv6_missing()
    if why:
        pytest.skip(why)
    if not have_openssl():
        pytest.skip("no openssl command here (tools/deps.sh installs it)")
    d = os.path.join(tmpdir_path, "pki")
    os.makedirs(d)
    make_ca(d, "ca")
    make_cert(d, "ca", "v6", "DNS:localhost,IP:127.0.0.1,IP:::1")
    make_cert(d, "ca", "v4", "DNS:localhost,IP:127.0.0.1")
    clusters = []
    try:
        for name in ("v6", "v4"):
            port = free_port()
            sub = os.path.join(tmpdir_path, name)
            os.makedirs(sub)
            c = Cluster(sub, extra=["--bind", "127.0.0.1 ::1", "--tls-port", str(port),
                                    "--tls-cert-file", os.path.join(d, f"{name}.pem"),
                                    "--tls-key-file", os.path.join(d, f"{name}.key"),
                                    "--tls-ca-cert-file", os.path.join(d, "ca.pem"), "--tls-auth-clients", "no"])
            c.tls_url = f"rediss://[::1]:{port}/0"
            clusters.append(c)
        ok, refused = clusters
        ca = ["--tls-ca-file", os.path.join(d, "ca.pem")]
        ok.worker("v6t", redis_url=ok.tls_url, args=ca)
        p = ctl(ok.tls_url, *ca, "enqueue", "--id", "v6-tls", "--wait", "over", "tls")
        assert p.returncode == 0 and "Echo: over tls" in p.stdout, p
        assert any(cl["name"] == "v6t" and cl["addr"].startswith("[::1]:") for cl in ok.r.client_list())
        p = ctl(refused.tls_url, *ca, "stats")
        assert p.returncode == 3, p
        assert "the server's certificate for \"::1\" was refused: IP address mismatch" in p.stderr, p.stderr
    finally:
        for c in clusters:
            c.close()
