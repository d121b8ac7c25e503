#!/usr/bin/env bash
# tools/cuda/wheels.sh — downloads, here, the wheels that bench_torch_image.py needs on the GPU
# machine, into .whl/ (ignored by git; carry it with the device call: carry [".whl", ...]).
# That machine cannot reach a package index; its Python 3.12 has torch, transformers,
# numpy, pillow, requests, regex, safetensors, huggingface-hub (1.33), filelock and zipp: of
# diffusers 0.42.1's Requires-Dist it lacks only importlib_metadata, which diffusers imports
# only on Python < 3.8 (utils/import_utils.py; else the standard importlib.metadata), and
# whose 10.x would bring lazy-importer too, so diffusers travels alone. It asks
# huggingface-hub >= 1.32.0, < 3.0 (there: 1.33), checks at import only python, requests,
# filelock and numpy, and needs transformers only for pipelines, which the bench does not load.
# tools/cuda/device_check.sh installs whatever lies in .whl/ into /tmp/site, --no-deps.
#
#   bash tools/cuda/wheels.sh          # needs network; prints the wheels and their sizes
set -eu
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS="diffusers==0.42.1"

exclude="$(git rev-parse --git-common-dir)/info/exclude"
grep -qx "/.whl/" "$exclude" 2>/dev/null || echo "/.whl/" >> "$exclude"
mkdir -p .whl
for w in $WHEELS; do
    # the GPU machine's interpreter and platform, not this one's; pure-Python wheels match too
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "$w"
done
ls -l .whl/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
du -ch .whl/*.whl | tail -1
