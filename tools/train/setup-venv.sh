#!/bin/sh
# Creates tools/train/.venv with PyTorch, transformers, diffusers and tokenizers from PyPI
# (tools/train/requirements.txt), which the training scripts in this folder import. The
# engine and `make test` never need it: the trained package and its goldens are committed.
set -e
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt"
echo "$venv"
