#!/bin/sh
# make demo — the main job on the default model, from a fresh machine to out/answer.md:
# installs what is missing, builds, writes the default model (the tiny preset: random
# weights in the published layouts, seconds on a CPU), starts a private redis-server and a
# duogend, enqueues examples/recipe.job (a cooking question with one input image), follows
# its progress, writes out/answer.md with its PNGs, and stops what it started.
set -eu
cd "$(dirname "$0")/.."
top=$(pwd)
tools/deps.sh
make -s all

model=build/models/demo
if [ ! -f "$model/duogen.json" ]; then
    echo "demo: writing the default model to $model"
    mkdir -p "$(dirname "$model")"
    build/mkmodel --preset tiny --seed 7 --out "$model"
fi
# random weights do not choose <BOV> on their own: bias it, as a trained model would emit it
bov=$(printf '<BOV>' | build/dg-tokenize --model "$model" --raw | tr -d '[:space:]')

mkdir -p out
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
build/duogend --redis "$url" --model "$model" --worker-id demo --block-ms 500 2> out/duogend.log &
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
build/duogenctl --redis "$url" enqueue --job examples/recipe.job --param "bias.$bov=4" --wait --out out
echo
echo "demo: the answer is in $top/out/answer.md, with its images beside it:"
ls -1 out/answer.md out/image-*.png 2>/dev/null | sed 's/^/  /'
