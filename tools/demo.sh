#!/bin/sh
# make demo — the main jobs on the default model, from a fresh machine to out/answer.md:
# installs what is missing, builds, starts a private redis-server and a duogend on the
# shipped shapes model (tools/train/shapes/: a tiny DuoGen trained on a world of shapes,
# see its MODEL.md), enqueues examples/shapes-steps.job (a scene built step by step: the
# model decides to draw after each step and keeps the earlier shapes) and
# examples/shapes-edit.job (an edit of the shipped picture examples/shapes.png), follows
# their progress, writes out/answer.md with its PNGs and the self-contained
# out/answer.html (tools/demo_page.py), and stops what it started.
#
# Without the shapes package in the checkout it falls back to the tiny preset of mkmodel
# (random weights in the published layouts) and examples/recipe.job, whose words and
# pictures are noise: random weights never choose <BOV>, so that job biases it.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
tools/deps.sh
make -s all

model=tools/train/shapes
if [ ! -f "$model/duogen.json" ]; then
    model=build/models/demo
    echo "demo: no shapes package in tools/train/shapes; using random weights ($model)"
    if [ ! -f "$model/duogen.json" ]; then
        mkdir -p "$(dirname "$model")"
        build/mkmodel --preset tiny --seed 7 --out "$model"
    fi
fi

rm -rf out/steps out/edit out/answer.md out/answer.html out/image-*.png
mkdir -p out
: > out/duogend.log   # emptied now: the wait below must not read the last run's "ready"
port=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$top/out" \
             --logfile "$top/out/redis.log" --daemonize yes
worker_pid=""
cleanup() {
    [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM
url="redis://127.0.0.1:$port/0"
# one engine thread: these models are tiny, and a second thread would mostly wait
build/duogend --redis "$url" --model "$model" --worker-id demo --block-ms 500 --threads 1 2> out/duogend.log &
worker_pid=$!
i=0
until grep -q ': ready' out/duogend.log; do
    i=$((i + 1))
    if [ $i -gt 600 ] || ! kill -0 "$worker_pid" 2>/dev/null; then
        echo "demo: duogend did not start; its log:" >&2
        cat out/duogend.log >&2
        exit 1
    fi
    sleep 0.1
done
echo "demo: duogend ready on $url with $(sed -n 's/.*model loaded: //p' out/duogend.log)"

if [ "$model" = tools/train/shapes ]; then
    pages=""
    for job in steps edit; do
        echo "demo: examples/shapes-$job.job"
        build/duogenctl --redis "$url" enqueue --job "examples/shapes-$job.job" --wait --out "out/$job"
        pages="$pages examples/shapes-$job.job:out/$job"
    done
    # shellcheck disable=SC2086  # one argument per job
    /usr/bin/python3 tools/demo_page.py out $pages
else
    bov=$(printf '<BOV>' | build/dg-tokenize --model "$model" --raw | tr -d '[:space:]')
    build/duogenctl --redis "$url" enqueue --job examples/recipe.job --param "bias.$bov=4" --wait --out out
    /usr/bin/python3 tools/demo_page.py out examples/recipe.job:out
fi
echo
echo "demo: the answers are in $top/out/answer.md (open $top/out/answer.html in a browser):"
find out -name '*.png' -o -name 'answer.*' | sort | sed 's/^/  /'
