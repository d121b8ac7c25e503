#!/bin/sh
# Rolling upgrade of a duogen fleet, one host at a time.
#   deploy/rollout.sh HOSTS_FILE [BUILD_DIR]
# For each host (one per line; '#' comments): install what `make install` installs (the
# binaries, the CUDA module beside them, the systemd units, the examples), reload systemd,
# restart its duogend@ workers (each drains its running jobs first), and wait until every
# worker of the host heartbeats again before moving to the next; a host that does not come
# back stops the rollout. Needs ssh access as a user that may run cp and systemctl through
# sudo, and duogenctl with DUOGEN_REDIS (and an operator password file) set for the check
# (a rediss:// one with DUOGEN_TLS_CA_FILE, which duogenctl reads itself).
# PREFIX (default /usr/local) is the hosts' install prefix; DUOGENCTL overrides the
# duogenctl that checks health (default BUILD_DIR/duogenctl).
set -eu
usage() { sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in
-h|--help) usage; exit 0 ;;
''|-*) usage >&2; exit 2 ;;
esac
hosts=$1
[ -r "$hosts" ] || { echo "rollout: hosts file \"$hosts\" cannot be read" >&2; exit 2; }
build=${2:-build}
prefix=${PREFIX:-/usr/local}
: "${DUOGEN_REDIS:?set DUOGEN_REDIS=redis://duogen-operator@host:6379/0}"
ctl="${DUOGENCTL:-$build/duogenctl} --redis $DUOGEN_REDIS ${DUOGEN_PASSWORD_FILE:+--password-file $DUOGEN_PASSWORD_FILE}"
repo=$(cd "$(dirname "$0")/.." && pwd)

# one staged tree for every host: the binary and the module it loads always travel together
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
make -s -C "$repo" install DESTDIR="$stage" PREFIX="$prefix" BUILD="$build" >/dev/null

# The hosts are read on descriptor 3: ssh and scp read their standard input, which would
# otherwise swallow the rest of the list after the first host.
while read -r host <&3; do
    case "$host" in ''|\#*) continue ;; esac
    echo "== $host"
    # a directory of the ssh user's own, not a fixed /tmp name another user could take
    rdir=$(ssh -n "$host" 'mktemp -d')
    scp -q -r "$stage/." "$host:$rdir/" </dev/null
    # reset-failed: the rollout's restart must not count toward the units' start limit
    ssh -n "$host" "sudo cp -R '$rdir/.' / && rm -rf '$rdir' && sudo systemctl daemon-reload &&
                    { sudo systemctl reset-failed 'duogend@*' || true; } &&
                    sudo systemctl restart 'duogend@*' --all"
    # healthy: each worker of the host, <hostname>:gpu<instance> (the unit's --worker-id
    # %H:gpu%i), heartbeats again, idle or running
    name=$(ssh -n "$host" hostname)
    ids=$(ssh -n "$host" "systemctl list-units 'duogend@*' --all --no-legend --plain" |
          sed -n "s/^duogend@\\([^ ]*\\)\\.service.*/$name:gpu\\1/p")
    n=$(printf '%s\n' "$ids" | grep -c . || true)
    tries=0
    while :; do
        stats=$($ctl stats) || stats=
        up=0
        for id in $ids; do
            printf '%s\n' "$stats" | awk -v id="$id" '$1 == id && ($2 == "idle" || $2 == "running") { f = 1 } END { exit !f }' &&
                up=$((up + 1))
        done
        [ "$up" -ge "$n" ] && break
        tries=$((tries + 1))
        [ $tries -gt 120 ] && { echo "$host: $up of $n workers healthy after 10 min; stopping the rollout" >&2; exit 1; }
        sleep "${ROLLOUT_POLL_S:-5}"
    done
    echo "$host: $n worker(s) healthy"
done 3< "$hosts"
