#!/usr/bin/env bash
# make systemd-check: duogend@0 under a real systemd, booted in a systemd-nspawn container
# (a Debian 12 root made by debootstrap), with the units, sysusers and tmpfiles files of
# systemd/ exactly as they ship. A drop-in adapts what a CPU machine and a short check need
# (shown below); everything else is the shipped unit. It checks, in order:
#   ready     `systemctl start duogend@0` returns once the worker sends READY=1 (Type=notify),
#             the unit is active with the worker's STATUS= line
#   kill -9   SIGKILL of the main process: the unit is restarted (Restart=on-failure)
#   watchdog  SIGSTOP of the main process: no WATCHDOG=1 comes, systemd aborts it and
#             restarts the unit (Result=watchdog)
#   drain     `systemctl stop` while a job runs: the job ends with its result (finish
#             "length": it ran to max_new_tokens, 1500), the worker exits 0, the unit is
#             inactive, not failed
#   boot      `systemctl enable duogend@0` as the README says, the container powered off and
#             booted again: the worker starts at boot (its heartbeat is in Redis) with nobody
#             starting it
#   tls       Redis given a TLS port that asks for client certificates, the worker the
#             rediss:// URL, CA, certificate and key (0640, group duogen) as deploy/README.md
#             says: the shipped unit, under its user and sandbox, restarts, takes a job and
#             writes its result over TLS
# Needs root, systemd-container and debootstrap (tools/deps.sh does not install them: this
# check is not part of `make test`), and Debian's mirror the first time (the root is kept
# in $DG_NSPAWN_ROOT, default build/nspawn/root). Prints one line per check; exit 0 when
# all pass. `make` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=${DG_NSPAWN_ROOT:-$PWD/build/nspawn/root}
MACHINE=dgcheck
PASS=0; FAIL=0; SKIP=0
say() { printf '%s\n' "$*"; }
check() {   # check NAME CONDITION-COMMAND...
    local name=$1; shift
    if "$@"; then say "ok    $name"; PASS=$((PASS + 1)); else say "FAIL  $name"; FAIL=$((FAIL + 1)); fi
}

for tool in systemd-nspawn debootstrap nsenter; do
    command -v "$tool" >/dev/null || { say "systemd-check: $tool is missing (apt-get install systemd-container debootstrap)"; exit 2; }
done
[ -x build/duogend ] && [ -x build/mkmodel ] || { say "systemd-check: run make first"; exit 2; }

# ---- the root: Debian 12 with systemd, Redis and duogend's runtime libraries --------------
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
    mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,redis-server,libhiredis0.14,\
libprotobuf-c1,libpng16-16,libturbojpeg0,libjpeg62-turbo,libsystemd0,libopenblas0-openmp,libpcre2-8-0,\
libutf8proc2,libjansson4,libgomp1 bookworm "$ROOT" http://deb.debian.org/debian >"$ROOT.log" 2>&1 \
        || { say "systemd-check: debootstrap failed (see $ROOT.log)"; exit 2; }
fi
echo "$MACHINE" >"$ROOT/etc/hostname"
# debootstrap's minbase writes no /etc/hosts: "localhost" (the TLS check's host) as on any machine
[ -e "$ROOT/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$ROOT/etc/hosts"
install -m 0755 build/duogend "$ROOT/usr/local/bin/duogend"
install -m 0644 systemd/duogend@.service systemd/duogend.target "$ROOT/etc/systemd/system/"
install -D -m 0644 systemd/duogen.sysusers "$ROOT/usr/lib/sysusers.d/duogen.conf"
install -D -m 0644 systemd/duogen.tmpfiles "$ROOT/usr/lib/tmpfiles.d/duogen.conf"
rm -rf "$ROOT/srv/duogen/model"
mkdir -p "$ROOT/srv/duogen"
build/mkmodel --preset tiny --seed 3 --out "$ROOT/srv/duogen/model" >/dev/null
mkdir -p "$ROOT/etc/duogen"
password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$password" >"$ROOT/etc/duogen/redis-password"
chmod 0600 "$ROOT/etc/duogen/redis-password"
sed -i '/^requirepass /d; /^tls-/d' "$ROOT/etc/redis/redis.conf"   # an earlier run's TLS port too
echo "requirepass $password" >>"$ROOT/etc/redis/redis.conf"
cat >"$ROOT/etc/duogen/duogend.conf" <<EOF
redis_url = redis://127.0.0.1:6379/0
model = /srv/duogen/model
threads = 1
drain_ms = 60000
claim_idle_ms = 60000
EOF
# The check's drop-in: the CPU instead of cuda:0, and short waits (watchdog 6 s instead of
# 120, 2 s restart delay instead of 10, 5 s for an aborted process instead of 60).
mkdir -p "$ROOT/etc/systemd/system/duogend@.service.d"
rm -rf "$ROOT/etc/systemd/system/duogend@0.service.d"   # an earlier run's MemoryMax=, where it stopped
cat >"$ROOT/etc/systemd/system/duogend@.service.d/check.conf" <<'EOF'
[Service]
ExecStart=
ExecStart=/usr/local/bin/duogend --config /etc/duogen/duogend.conf --worker-id %H:cpu%i --device cpu \
          --password-file ${CREDENTIALS_DIRECTORY}/redis-password $DUOGEND_ARGS
WatchdogSec=6
RestartSec=2
TimeoutAbortSec=5
EOF

# ---- boot ---------------------------------------------------------------------------------
# nothing enabled by an earlier run: the boot check below enables it itself
systemctl --root="$ROOT" --quiet disable duogend@0.service duogend.target 2>/dev/null || true
log=$(mktemp /tmp/duogen-nspawn.XXXXXX)
nspawn=""
cleanup() {   # the container stopped; its console log removed where every check passed, else named
    [ -z "$nspawn" ] || { kill "$nspawn" 2>/dev/null || true; wait "$nspawn" 2>/dev/null || true; }
    if [ "${PASS_ALL:-0}" = 1 ]; then rm -f "$log"; else say "the container's console: $log"; fi
}
trap cleanup EXIT
ctr() { nsenter -t "$leader" -m -u -i -n -p -r -w -- "$@"; }
boot() {    # starts the container and waits for its systemd to finish booting
    systemd-nspawn -D "$ROOT" --boot --register=no --keep-unit --private-network --machine="$MACHINE" \
        >>"$log" 2>&1 &
    nspawn=$!
    leader=""
    for _ in $(seq 100); do
        leader=$(pgrep -P "$nspawn" -x systemd || true)
        [ -n "$leader" ] && break
        sleep 0.2
    done
    [ -n "$leader" ] || { say "systemd-check: the container did not boot (log: $log)"; exit 2; }
    for _ in $(seq 150); do
        state=$(ctr systemctl is-system-running 2>/dev/null || true)
        case $state in running|degraded) break ;; esac
        sleep 0.2
    done
}
boot
say "booted: systemd in the container is $state"
rc() { ctr redis-cli -a "$password" --no-auth-warning "$@"; }
ctr systemctl restart redis-server      # it reads the password written above
rc FLUSHALL >/dev/null                  # nothing of an earlier run
prop() { ctr systemctl show -p "$1" --value duogend@0; }
# enqueue ID TEXT MAX_NEW_TOKENS [nostop]: a text-only job (greedy), XADDed inside the container
enqueue() {
    /usr/bin/python3 - "$ROOT/root/$1.job" "$@" <<'EOF'
import sys
sys.path.insert(0, "build/gen/python")
import duogen_pb2 as pb
path, job_id, text, tokens = sys.argv[1:5]
job = pb.Job(id=job_id, seed=1)
job.messages.add(role=pb.Message.USER).parts.add(text=text)
job.text.max_new_tokens = int(tokens)
job.text.temperature = 0
if sys.argv[5:] == ["nostop"]:
    for stop_id in (151643, 151645):      # <|endoftext|>, <|im_end|>
        job.text.logit_bias[stop_id] = float("-inf")
job.image.max_images = 0
open(path, "wb").write(job.SerializeToString())
EOF
    ctr sh -c "redis-cli -a '$password' --no-auth-warning -x XADD duogen:jobs '*' id $1 job </root/$1.job" >/dev/null
    rm -f "$ROOT/root/$1.job"
}

# ---- ready ----------------------------------------------------------------------------------
ctr systemctl start duogend@0 && started=1 || started=0
check "ready: systemctl start returned after READY=1 (active: $(prop ActiveState)/$(prop SubState), status \"$(prop StatusText)\")" \
    test "$started" = 1 -a "$(prop ActiveState)" = active -a "$(prop SubState)" = running
pid0=$(prop MainPID)

# ---- kill -9 ----------------------------------------------------------------------------------
ctr systemctl kill -s KILL duogend@0
for _ in $(seq 100); do
    pid=$(prop MainPID)
    [ "$(prop SubState)" = running ] && [ "$pid" != 0 ] && [ "$pid" != "$pid0" ] && break
    sleep 0.2
done
check "kill -9: restarted (main pid $pid0 -> $pid, NRestarts $(prop NRestarts))" \
    test "$(prop NRestarts)" = 1 -a "$(prop SubState)" = running -a "$pid" != "$pid0"

# ---- watchdog ---------------------------------------------------------------------------------
pid1=$pid
ctr sh -c "kill -STOP $pid1"
for _ in $(seq 150); do
    pid=$(prop MainPID)
    [ "$(prop NRestarts)" = 2 ] && [ "$(prop SubState)" = running ] && [ "$pid" != "$pid1" ] && break
    sleep 0.2
done
journal=$(ctr journalctl -u duogend@0 --no-pager -o cat 2>/dev/null | grep -i watchdog | head -n 1 || true)
check "watchdog: a stopped main loop is aborted and restarted (NRestarts $(prop NRestarts); journal: \"$journal\")" \
    test "$(prop NRestarts)" = 2 -a "$(prop SubState)" = running -a -n "$journal"

# ---- drain --------------------------------------------------------------------------------------
# a story with its stop tokens banned: it runs to max_new_tokens
enqueue drain "Tell me a long story." 1500 nostop
for _ in $(seq 100); do
    [ "$(rc HGET duogen:job:drain state)" = running ] && [ "$(rc HGET duogen:job:drain tokens)" -gt 0 ] 2>/dev/null && break
    sleep 0.1
done
tokens_at_stop=$(rc HGET duogen:job:drain tokens)
ctr systemctl stop duogend@0
status=$(rc HGET duogen:result:drain status); finish=$(rc HGET duogen:result:drain finish_reason)
tokens=$(rc HGET duogen:job:drain tokens)
check "drain: stop while the job ran ($tokens_at_stop tokens then) waited for it: result $status/$finish, $tokens tokens; unit $(prop ActiveState), exit status $(prop ExecMainStatus)" \
    test "$status" = done -a "$finish" = length -a "$tokens" -gt "$((tokens_at_stop + 100))" \
         -a "$(prop ActiveState)" = inactive -a "$(prop ExecMainStatus)" = 0

# ---- boot -----------------------------------------------------------------------------------------
# enabled as the README says, then a power cycle: multi-user.target must pull the worker in
rc DEL duogen:worker:"$MACHINE":cpu0 >/dev/null
ctr systemctl enable --quiet duogend@0
ctr systemctl poweroff || true
for _ in $(seq 150); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.2; done
wait "$nspawn" 2>/dev/null || true
nspawn=""
boot
for _ in $(seq 150); do
    [ "$(rc EXISTS duogen:worker:"$MACHINE":cpu0)" = 1 ] && break
    sleep 0.2
done
check "boot: an enabled worker starts at boot (system $state; duogend@0 $(prop ActiveState)/$(prop SubState), heartbeat $(rc HGET duogen:worker:"$MACHINE":cpu0 state))" \
    test "$(prop ActiveState)" = active -a "$(rc EXISTS duogen:worker:"$MACHINE":cpu0)" = 1
# ---- tls -----------------------------------------------------------------------------------------
tls=$(mktemp -d)
/usr/bin/python3 - "$tls" <<'EOF'
import sys
sys.path.insert(0, "tools/bench")
from certs import make_ca, make_cert
make_ca(sys.argv[1], "ca")
make_cert(sys.argv[1], "ca", "redis", "DNS:localhost,IP:127.0.0.1")
make_cert(sys.argv[1], "ca", "worker", None)
EOF
install -d -m 0755 "$ROOT/etc/redis/tls" "$ROOT/etc/duogen/tls"
install -m 0644 "$tls/ca.pem" "$tls/redis.pem" "$ROOT/etc/redis/tls/"
install -m 0600 "$tls/redis.key" "$ROOT/etc/redis/tls/"
install -m 0644 "$tls/ca.pem" "$tls/worker.pem" "$ROOT/etc/duogen/tls/"
install -m 0640 "$tls/worker.key" "$ROOT/etc/duogen/tls/"
rm -rf "$tls"
ctr chown redis:redis /etc/redis/tls/redis.key
ctr chown root:duogen /etc/duogen/tls/worker.key
cat >>"$ROOT/etc/redis/redis.conf" <<'EOF'
tls-port 6380
tls-cert-file /etc/redis/tls/redis.pem
tls-key-file /etc/redis/tls/redis.key
tls-ca-cert-file /etc/redis/tls/ca.pem
tls-auth-clients yes
EOF
ctr systemctl restart redis-server
sed -i 's|^redis_url = .*|redis_url = rediss://localhost:6380/0|' "$ROOT/etc/duogen/duogend.conf"
cat >>"$ROOT/etc/duogen/duogend.conf" <<'EOF'
tls_ca_file = /etc/duogen/tls/ca.pem
tls_cert_file = /etc/duogen/tls/worker.pem
tls_key_file = /etc/duogen/tls/worker.key
EOF
ctr systemctl restart duogend@0 && started=1 || started=0
enqueue tls "Hello over TLS." 8
for _ in $(seq 150); do
    [ -n "$(rc HGET duogen:result:tls status)" ] && break
    sleep 0.2
done
# the port the worker's connection reached, from the server's side
port=$(rc CLIENT LIST | sed -n "s/.* laddr=[^ ]*:\([0-9]*\) .* name=$MACHINE:cpu0 .*/\1/p")
check "tls: the unit over rediss:// with a client certificate (duogend@0 $(prop ActiveState)/$(prop SubState), its connection on port ${port:-none}, result $(rc HGET duogen:result:tls status), $(rc HGET duogen:job:tls tokens) tokens)" \
    test "$started" = 1 -a "$(prop SubState)" = running -a "$port" = 6380 -a "$(rc HGET duogen:result:tls status)" = done
[ "$(rc HGET duogen:result:tls status)" = done ] ||   # what the worker said, where it did not
    ctr journalctl -u duogend@0 --no-pager -o cat -n 15 2>/dev/null | sed 's/^/      /'

# ---- memory ---------------------------------------------------------------------------------------
# MemoryMax= in a drop-in, as deploy/README says: max_inflight 0 sizes itself within it. Only
# where the container's systemd has the memory controller (cgroup v2 with it delegated): on a
# host whose memory controller is v1 (bound outside the container), MemoryMax= is not
# enforced at all, and the host's free memory is the right figure
if ctr sh -c 'cat /sys/fs/cgroup/cgroup.controllers /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null' |
        grep -qw memory; then
    install -d "$ROOT/etc/systemd/system/duogend@0.service.d"
    printf '[Service]\nMemoryMax=1536M\n' >"$ROOT/etc/systemd/system/duogend@0.service.d/memory.conf"
    # (the check's duogend.conf leaves max_inflight at its default, 0: sized from the memory)
    ctr systemctl daemon-reload
    since=$(ctr date '+%Y-%m-%d %H:%M:%S')
    ctr systemctl restart duogend@0 && started=1 || started=0
    sized=$(ctr journalctl -u duogend@0 --since "$since" --no-pager -o cat 2>/dev/null |
            grep -o 'max_inflight [0-9]* (from the memory: [0-9.]* GiB' | tail -n 1 || true)
    free_gib=$(printf '%s\n' "$sized" | sed -n 's/.*from the memory: \([0-9.]*\) GiB/\1/p')
    check "memory: MemoryMax=1536M (the unit's MemoryMax $(prop MemoryMax)): the worker sized itself within it (\"${sized:-nothing said}\")" \
        awk -v ok="$started" -v f="${free_gib:-0}" 'BEGIN { exit !(ok == 1 && f > 0 && f < 1.5) }'
    rm -f "$ROOT/etc/systemd/system/duogend@0.service.d/memory.conf"
    ctr systemctl daemon-reload
else
    say "skip  memory: this container's systemd has no memory controller (cgroup v1 host), MemoryMax= is not enforced here"
    SKIP=$((SKIP + 1))
fi
ctr systemctl disable --quiet --now duogend@0 duogend.target

say "$PASS passed, $FAIL failed, $SKIP skipped"
[ "$FAIL" -eq 0 ] && PASS_ALL=1
[ "$FAIL" -eq 0 ]
