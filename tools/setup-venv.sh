#!/bin/sh
# tools/setup-venv.sh DIR: creates DIR/.venv from PyPI with DIR/requirements.txt and prints its
# path. DIR is tools/reference (the reference implementations the golden generators and the
# baselines import) or tools/train (PyTorch and the rest the shapes model's training
# imports). The engine and `make test` never need either: goldens and the trained package
# are committed.
set -e
[ -n "${1:-}" ] && [ -f "$1/requirements.txt" ] || { echo "usage: $0 DIR (a folder with a requirements.txt)" >&2; exit 2; }
here=$(cd "$1" && pwd)
venv="$here/.venv"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt"
echo "$venv"
