"""Every command a user runs answers --help with its usage on standard output and exit 0,
and an unknown option with the usage on standard error and a failing exit (mkmodel,
dg-tokenize and dg-bench took --help for an unknown option, exit 2; dg-import for an option
without its value; tools/demo_page.py raised FileNotFoundError on it)."""
import os
import subprocess
import sys

import pytest

from conftest import BUILD, ROOT

TOOLS = ["duogend", "duogenctl", "mkmodel", "dg-tokenize", "dg-bench", "dg-import"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_and_an_unknown_option(tool):
    r = subprocess.run([os.path.join(BUILD, tool), "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and r.stdout.startswith("usage: "), (r.returncode, r.stdout[:200], r.stderr[:200])
    r = subprocess.run([os.path.join(BUILD, tool), "--no-such-option"], capture_output=True, text=True, timeout=20)
    assert r.returncode != 0 and "--no-such-option" not in r.stdout, (r.returncode, r.stdout[:200])
    assert "usage: " in r.stderr or "--no-such-option" in r.stderr, r.stderr[:300]


def test_demo_page_help():
    page = os.path.join(ROOT, "tools", "demo_page.py")
    r = subprocess.run([sys.executable, page, "--help"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "tools/demo_page.py OUT JOB_FILE:ANSWER_DIR" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, page, "out-only"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "JOB_FILE:ANSWER_DIR" in r.stderr, r.stdout + r.stderr


def test_duogend_names_a_mistyped_setting_in_one_line(tmp_path):
    """A setting mistyped on the command line or in the file, or given without its value:
    exit 78 with one line naming it and the nearest setting (it printed the whole usage, 80
    lines, for a value left out, and "unknown setting" with no hint for a name one letter off)."""
    conf = tmp_path / "duogend.conf"
    conf.write_text("# a worker\nclaim_idle_ms = 9000\nmax_inflights = 4\n")
    for args, said in ((["--max-inflights", "4"], 'unknown option "--max-inflights" (did you mean --max-inflight?)'),
                       (["--threads"], "--threads needs a value"),
                       (["--thread"], 'unknown option "--thread" (did you mean --threads?)'),
                       (["stray"], 'unexpected argument "stray"'),
                       (["--config", str(conf)],
                        f'config "{conf}" line 3: unknown setting "max_inflights" (did you mean max_inflight?)')):
        r = subprocess.run([os.path.join(BUILD, "duogend")] + args, capture_output=True, text=True, timeout=20)
        assert r.returncode == 78 and said in r.stderr and r.stderr.count("\n") == 1, (args, r.returncode, r.stderr)


def test_mkmodel_and_dg_bench_refuse_what_they_cannot_do(tmp_path):
    """mkmodel --seed abc made seed 0 (and 010 was 8: C's octal); mkmodel over a folder that
    held a package wrote into it (through an import's links into the published checkpoint;
    an older preset's shards stayed beside the new ones); dg-bench with a mistyped name ran
    nothing and exited 0."""
    mk = os.path.join(BUILD, "mkmodel")
    for seed in ("abc", "08x", "-1", ""):
        r = subprocess.run([mk, "--preset", "tiny", "--seed", seed, "--out", str(tmp_path / "s"), "--vocab", "own"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "not a decimal integer" in r.stderr, (seed, r.stderr)
    assert not (tmp_path / "s").exists()
    r = subprocess.run([mk, "--preset", "tiny", "--seed", "010", "--out", str(tmp_path / "p"), "--vocab", "own"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "seed 10," in r.stdout, r.stdout + r.stderr
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*")}
    r = subprocess.run([mk, "--preset", "tiny", "--seed", "2", "--out", str(tmp_path / "p"), "--vocab", "own"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "holds files already" in r.stderr, r.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "p").rglob("*")} == before
    (tmp_path / "empty").mkdir()   # an empty folder is a new one
    r = subprocess.run([mk, "--preset", "tiny", "--seed", "2", "--out", str(tmp_path / "empty"), "--vocab", "own"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

    r = subprocess.run([os.path.join(BUILD, "dg-bench"), "--json", str(tmp_path / "b.json"), "nosuchbench"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and 'unknown benchmark "nosuchbench"' in r.stderr and not (tmp_path / "b.json").exists()
    r = subprocess.run([os.path.join(BUILD, "dg-bench"), "--model", str(tmp_path / "nowhere"), "job"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "no model package there" in r.stderr, r.stderr
