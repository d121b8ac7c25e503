"""Issue 16: `mkmodel --preset full` writes the published layouts, as docs/PUBLISHED.md §5 lists
them. The tables of that section are read here, row by row, and compared with what mkmodel
writes (headers only, --seeded): each config value, and each named tensor's shape. A row
changed in the docs or in mkmodel without the other fails here."""
import json
import os
import struct
import subprocess

import pytest

from conftest import BUILD, ROOT

DOC = os.path.join(ROOT, "docs", "PUBLISHED.md")
MKMODEL = os.path.join(BUILD, "mkmodel")
# a section heading of §5 -> the config file of mkmodel's package it describes
CONFIGS = {"transformer/config.json": "dit/config.json", "vae/config.json": "vae/config.json",
           "Qwen2.5-VL-7B config.json": "mllm/config.json"}
FOLDERS = {"transformer": "dit", "vae": "vae", "text encoder": "mllm"}


def doc_tables():
    """{heading: [cells]} for the rows of §5's tables whose first cell is `code` (the
    backticks stripped)."""
    tables, heading = {}, None
    with open(DOC, encoding="utf-8") as f:
        for line in f:
            if line.startswith("### "):
                heading = line[4:].strip()
                tables[heading] = []
            elif heading and line.startswith("| `"):
                tables[heading].append([c.strip().strip("`") for c in line.strip().strip("|").split("|")])
    return tables


def st_header(path):
    with open(path, "rb") as f:
        n, = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def tensor_shapes(folder):
    """Every tensor's shape in a component folder: one safetensors file, or an index and shards."""
    shapes = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            for k, v in st_header(os.path.join(folder, name)).items():
                if k != "__metadata__":
                    shapes[k] = v["shape"]
    return shapes


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "pkg")
    subprocess.run([MKMODEL, "--preset", "full", "--seed", "1", "--seeded", "--out", out,
                    "--vocab", os.path.join(ROOT, "tools", "mkmodel", "vocab", "qwen2")], check=True, capture_output=True, timeout=120)
    return out


def test_doc_has_every_table():
    tables = doc_tables()
    for heading in list(CONFIGS) + ["Tensor shapes"]:
        matches = [h for h in tables if heading in h]
        assert matches and tables[matches[0]], f"docs/PUBLISHED.md: no rows under a heading naming {heading!r}"


@pytest.mark.parametrize("heading", list(CONFIGS))
def test_config_values_are_the_published_ones(full, heading):
    tables = doc_tables()
    rows = next(tables[h] for h in tables if heading in h)
    with open(os.path.join(full, CONFIGS[heading]), encoding="utf-8") as f:
        cfg = json.load(f)
    for key, value, _ in rows:
        assert key in cfg, f"{CONFIGS[heading]}: no {key!r} (docs: {value})"
        # values compare as JSON: 4.0 == 4, 1e-06 == 0.000001, [false, true] as lists
        assert cfg[key] == json.loads(value), f"{CONFIGS[heading]}: {key} = {cfg[key]!r}, the docs say {value}"


def test_tensor_shapes_are_the_published_ones(full):
    tables = doc_tables()
    rows = next(tables[h] for h in tables if "Tensor shapes" in h)
    cache = {}
    for name, where, shape in rows:
        folder = FOLDERS[where]
        if folder not in cache:
            cache[folder] = tensor_shapes(os.path.join(full, folder))
        assert name in cache[folder], f"{folder}: no tensor {name}"
        assert cache[folder][name] == json.loads(shape), f"{folder}/{name}: {cache[folder][name]}, the docs say {shape}"
