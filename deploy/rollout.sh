#!/bin/sh
# Rolling upgrade of a duogen fleet, one host at a time.
#   deploy/rollout.sh HOSTS_FILE [BUILD_DIR]
# For each host (one per line): copy the binaries, restart its duogend@ workers (each drains
# its running jobs first), and wait until every worker of the host heartbeats again before
# moving to the next. Needs ssh access as a user that may run systemctl through sudo, and
# duogenctl with DUOGEN_REDIS (and an operator password file) set for the health check.
set -eu
hosts=$1
build=${2:-build}
: "${DUOGEN_REDIS:?set DUOGEN_REDIS=redis://duogen-operator@host:6379/0}"
ctl="$build/duogenctl --redis $DUOGEN_REDIS ${DUOGEN_PASSWORD_FILE:+--password-file $DUOGEN_PASSWORD_FILE}"

while read -r host; do
    case "$host" in ''|\#*) continue ;; esac
    echo "== $host"
    scp -q "$build/duogend" "$build/duogenctl" "$host:/tmp/"
    ssh "$host" 'sudo install -m 0755 /tmp/duogend /tmp/duogenctl /usr/local/bin/ &&
                 sudo systemctl restart "duogend@*" --all'
    # healthy: every worker named <host>:gpuN heartbeats again (idle or running)
    n=$(ssh "$host" "systemctl list-units 'duogend@*' --no-legend --plain | wc -l")
    tries=0
    until [ "$($ctl stats | grep -c "^  $host:gpu[0-9]* *\(idle\|running\)")" -ge "$n" ]; do
        tries=$((tries + 1))
        [ $tries -gt 120 ] && { echo "$host: workers not healthy after 10 min; stopping the rollout" >&2; exit 1; }
        sleep 5
    done
    echo "$host: $n worker(s) healthy"
done < "$hosts"
