"""deploy/rollout.sh against fake hosts: ssh, scp and duogenctl are stand-ins on PATH that
log what they were asked and answer as a host would (ssh reads its standard input unless
given -n, as the real one does)."""
import os
import subprocess

from conftest import BUILD, ROOT

FAKE_SSH = r"""#!/bin/sh
# fake ssh [-n] HOST COMMAND
if [ "$1" = -n ]; then shift; else cat >/dev/null; fi
host=$1; shift
printf '%s\t%s\n' "$host" "$(printf '%s' "$*" | tr '\n' ' ')" >> "$FAKE_LOG"
case "$*" in
  'mktemp -d') n=$(ls "$FAKE_ROOT" 2>/dev/null | wc -l); echo "/tmp/stage.$host.$n" ;;
  hostname) echo "$host.example" ;;   # the host's own name is not the hosts file's
  *list-units*) printf 'duogend@0.service loaded active running duogen worker on GPU 0\n'
                printf 'duogend@GPU-8932f937.service loaded active running duogen worker on GPU GPU-8932f937\n' ;;
esac
"""

FAKE_SCP = r"""#!/bin/sh
# fake scp -q -r SRC HOST:DIR/ : copies SRC into $FAKE_ROOT/HOST/DIR
while [ "${1#-}" != "$1" ]; do shift; done
dst=$2; host=${dst%%:*}; path=${dst#*:}
printf '%s\tscp %s\n' "$host" "$path" >> "$FAKE_LOG"
mkdir -p "$FAKE_ROOT/$host$path" && cp -R "$1" "$FAKE_ROOT/$host$path"
"""

# The fleet's heartbeats: both workers of gpu-a and gpu-b; gpu-c never comes back.
FAKE_CTL = r"""#!/bin/sh
cat <<EOF
queue duogen
workers:
  id                           state     done     failed   dead    heartbeat job
  gpu-a.example:gpu0           idle      0        0        0          0.1s ago
  gpu-a.example:gpuGPU-8932f937 running  0        0        0          0.1s ago j1
  gpu-b.example:gpu0           running   0        0        0          0.1s ago j2
  gpu-b.example:gpuGPU-8932f937 idle     0        0        0          0.1s ago
  gpu-c.example:gpu0           stopped   0        0        0          0.1s ago
EOF
"""


def script(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def test_rollout_goes_host_by_host_and_stops_at_an_unhealthy_one(tmpdir_path):
    bindir = os.path.join(tmpdir_path, "bin")
    os.makedirs(bindir)
    script(os.path.join(bindir, "ssh"), FAKE_SSH)
    script(os.path.join(bindir, "scp"), FAKE_SCP)
    ctl = script(os.path.join(tmpdir_path, "duogenctl"), FAKE_CTL)
    fake_root, log = os.path.join(tmpdir_path, "hosts"), os.path.join(tmpdir_path, "log")
    os.makedirs(fake_root)
    hosts = os.path.join(tmpdir_path, "hosts.txt")
    with open(hosts, "w") as f:
        f.write("# the fleet\ngpu-a\n\ngpu-b\ngpu-c\n")
    env = dict(os.environ, PATH=bindir + ":" + os.environ["PATH"], FAKE_ROOT=fake_root, FAKE_LOG=log,
               DUOGEN_REDIS="redis://duogen-operator@redis:6379/0", DUOGENCTL=ctl, ROLLOUT_POLL_S="0")
    p = subprocess.run([os.path.join(ROOT, "deploy", "rollout.sh"), hosts, BUILD], env=env,
                       capture_output=True, text=True, timeout=300)
    print(p.stdout, p.stderr)
    lines = [line.split("\t") for line in open(log).read().splitlines()]
    # every host in turn (ssh used to read the rest of the list as its input: gpu-a only)
    restarted = [h for h, cmd in lines if "systemctl restart" in cmd]
    assert restarted == ["gpu-a", "gpu-b", "gpu-c"], restarted
    assert "gpu-a: 2 worker(s) healthy" in p.stdout and "gpu-b: 2 worker(s) healthy" in p.stdout
    # gpu-c's workers never heartbeat: the rollout stops there, failing
    assert p.returncode == 1 and "gpu-c: 0 of 2 workers healthy" in p.stderr
    # what travels: make install's tree, the daemon with its units, into a private directory
    for h in ("gpu-a", "gpu-b", "gpu-c"):
        stage = [cmd.split(" ", 1)[1] for host, cmd in lines if host == h and cmd.startswith("scp ")]
        assert len(stage) == 1 and stage[0].startswith("/tmp/stage."), stage
        tree = os.path.join(fake_root, h + stage[0].rstrip("/"))
        for f in ("usr/local/bin/duogend", "usr/local/bin/duogenctl", "usr/local/lib/systemd/system/duogend@.service"):
            assert os.path.exists(os.path.join(tree, f)), f
    cmds = [cmd for h, cmd in lines if h == "gpu-a"]
    install = next(c for c in cmds if "systemctl restart" in c)
    assert "daemon-reload" in install and "reset-failed" in install
    assert install.index("reset-failed") < install.index("systemctl restart")


def test_rollout_says_its_usage_and_checks_the_hosts_file_before_building(tmpdir_path):
    """--help ran a staged `make install` (on an unbuilt checkout, a whole build) and then
    failed on a hosts file named "--help"; no argument said "1: parameter not set"."""
    script = os.path.join(ROOT, "deploy", "rollout.sh")
    env = dict(os.environ, DUOGEN_REDIS="redis://duogen-operator@redis:6379/0", BUILD="/nonexistent-build")
    p = subprocess.run([script, "--help"], env=env, capture_output=True, text=True, timeout=20)
    assert p.returncode == 0 and p.stdout.startswith("Rolling upgrade of a duogen fleet"), p
    p = subprocess.run([script], env=env, capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and "deploy/rollout.sh HOSTS_FILE [BUILD_DIR]" in p.stderr, p
    p = subprocess.run([script, os.path.join(tmpdir_path, "no-hosts")], env=env, capture_output=True, text=True,
                       timeout=20)
    assert p.returncode == 2 and "no-hosts\" cannot be read" in p.stderr and "make" not in p.stderr, p
