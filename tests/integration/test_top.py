"""duogenctl top against a real Redis and worker: the one-shot view, and the live view in a
real terminal (tmux): the worker, its job's phase and counts while it runs, the rates after
it ended, and q restoring the terminal and exiting 0."""
import os
import shutil
import subprocess

import pytest

from conftest import BUILD, wait_until

CTL = os.path.join(BUILD, "duogenctl")


def ctl(cluster, *args):
    return subprocess.run([CTL, "--redis", cluster.server.url] + list(args), capture_output=True, text=True,
                          timeout=30)


def worker_rows(view):
    """{worker: [columns]} of the rows under the WORKER heading."""
    lines = view.splitlines()
    head = next(i for i, l in enumerate(lines) if l.startswith("WORKER"))
    return {l.split()[0]: l.split() for l in lines[head + 1:] if l.strip()}


def test_top_once_shows_queue_rates_and_workers(cluster):
    cluster.worker()
    cluster.wait_heartbeat("w1", "idle")
    assert ctl(cluster, "enqueue", "--id", "a", "--wait", "x").returncode == 0
    assert ctl(cluster, "enqueue", "--id", "b", "--param", "meta.fake.fail=error", "--wait", "x").returncode == 1
    p = ctl(cluster, "top", "--once")
    assert p.returncode == 0, p.stderr
    assert "\033" not in p.stdout
    assert f"127.0.0.1:{cluster.server.port}/0" in p.stdout.splitlines()[0]
    assert "done 1  failed 1  cancelled 0  expired 0   dead letters 1" in p.stdout
    queue = [l for l in p.stdout.splitlines() if "duogen:jobs " in l][0].split()
    assert queue[queue.index("length") + 1] == "2" and queue[queue.index("pending") + 1] == "0"
    # state, beat age, done, failed, no job (the counts as of the next heartbeat)
    w1 = wait_until(lambda: (lambda r: r if r and r[3:5] == ["1", "1"] else None)(
        worker_rows(ctl(cluster, "top", "--once").stdout).get("w1")), what="w1's counts in top")
    assert w1[1] == "idle" and w1[5:] == ["-"] and float(w1[2].rstrip("s")) < 5
    assert ctl(cluster, "top", "--bogus").returncode == 2


def test_top_live_in_tmux(cluster, tmpdir_path):
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed (tools/deps.sh installs it: tmux)")
    cluster.worker()
    cluster.wait_heartbeat("w1", "idle")
    sock = f"duogen-top-{os.getpid()}"

    def tmux(*args):
        return subprocess.run(["tmux", "-L", sock, "-f", "/dev/null", *args], capture_output=True, text=True,
                              timeout=10)

    def screen():
        return tmux("capture-pane", "-p", "-t", "top").stdout

    try:
        rc_file = os.path.join(tmpdir_path, "top.rc")
        cmd = f"{CTL} --redis {cluster.server.url} top --interval 0.2; echo $? > {rc_file}"
        assert tmux("new-session", "-d", "-s", "top", "-x", "150", "-y", "30", cmd, ";",
                    "set-option", "-t", "top", "remain-on-exit", "on").returncode == 0
        wait_until(lambda: "(no live worker)" not in screen() and "w1" in screen(), what="w1 on the screen")

        # a long job: 40 words at 100 ms, one image of 4 steps after the first
        assert ctl(cluster, "enqueue", "--id", "long-1", "--param", "meta.fake.step_ms=100",
                   "--param", "meta.fake.images=1", *[f"w{i}" for i in range(40)]).returncode == 0
        row = wait_until(lambda: (lambda r: r if r and r[1] == "running" and r[5] == "long-1"
                                  and int(r[-3]) >= 5 else None)(worker_rows(screen()).get("w1")),
                         what="the running job with tokens on the screen")
        assert row[6] == "decode" and row[-2] == "1"   # phase; its one image drawn by then
        wait_until(lambda: "done 1  failed 0" in screen() and worker_rows(screen())["w1"][1] == "idle",
                   timeout=20, what="the job in the last minute's rates, the worker idle")

        tmux("send-keys", "-t", "top", "q")
        rc = wait_until(lambda: os.path.exists(rc_file) and open(rc_file).read().strip(), what="top to exit on q")
        assert rc == "0"
        assert "WORKER" not in screen()   # the alternate screen is gone: the terminal is as it was
    finally:
        tmux("kill-server")
        # tmux leaves its socket behind when its server is killed: one stale file in
        # /tmp/tmux-UID a run otherwise
        try:
            os.unlink(os.path.join(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", sock))
        except FileNotFoundError:
            pass
