#!/bin/sh
# Creates tools/reference/.venv with the reference implementations (PyPI) that the golden
# generators in this folder import. `make test` never needs it: goldens are committed.
set -e
here=$(cd "$(dirname "$0")" && pwd)
venv="$here/.venv"
[ -x "$venv/bin/python" ] || /usr/bin/python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q -r "$here/requirements.txt"
echo "$venv"
