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
