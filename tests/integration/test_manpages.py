"""The manual pages duogend(8), duogend.conf(5) and duogenctl(1): written by the programs
from the tables of their --help (daemon/manpage.h), so every setting, command and --param
key of the sources must be in them; groff and man must render them without a warning;
`make install` must put them where man finds them."""
import os
import re
import subprocess
import tempfile

from conftest import BUILD, ROOT

MAN = os.path.join(BUILD, "man")


def read(*parts):
    with open(os.path.join(*parts), encoding="utf-8") as f:
        return f.read()


def source_settings():
    """The setting names of daemon_config.c's table, read from the source, not the binary."""
    names = re.findall(r"^\s*(?:STR|INT|SIZE0?)\((\w+),", read(ROOT, "daemon", "daemon_config.c"), re.M)
    assert len(names) > 40, "the settings table was not found in daemon/daemon_config.c"
    return names


def source_table(table):
    """The first strings of the rows of one of duogenctl's tables, read from its source."""
    src = read(ROOT, "tools", "duogenctl", "main.c")
    body = re.search(r"\} " + table + r"\[\] = \{\n(.*?)\n\};", src, re.S)
    assert body, f"table {table} not found in tools/duogenctl/main.c"
    return re.findall(r'^    \{"([^"]+)", "([^"]*)"', body.group(1), re.M)


def roff(text):
    """A name as the pages write it: each '-' as \\-."""
    return text.replace("-", "\\-")


def render(*man_args):
    """man(1) with groff's warnings on, e.g. render("-l", FILE); returns (stdout, stderr)."""
    env = dict(os.environ, MANWIDTH="100", MANPAGER="cat", PAGER="cat", LC_ALL="C.UTF-8")
    p = subprocess.run(["man", "--warnings=all", *man_args], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout.replace("\u2212", "-").replace("\u2010", "-"), p.stderr


def test_every_setting_in_duogend_8_and_conf_5():
    names = source_settings()
    page8, page5 = read(MAN, "duogend.8"), read(MAN, "duogend.conf.5")
    for n in names:
        assert f"\\fB\\-\\-{roff(n.replace('_', '-'))}\\fR" in page8, f"--{n} missing from duogend(8)"
        assert f"\\fB{n}\\fR = " in page5, f"{n} missing from duogend.conf(5)"
    # --help lists the same settings, each once, in the same order
    help_text = subprocess.run([os.path.join(BUILD, "duogend"), "--help"], capture_output=True, text=True,
                               check=True).stdout
    listed = re.findall(r"^  --([a-z0-9-]+) ", help_text, re.M)
    assert listed == [n.replace("_", "-") for n in names]
    # and the defaults shown are the ones the worker uses
    assert "\\fBredis_url\\fR = \\fItext\\fR\nredis://[user[:password]@]host:port/db" in page5
    assert "Default: \\fB60000\\fR; allowed: 100..86400000" in page5      # claim_idle_ms
    assert "Default: \\fB64M\\fR; allowed: above 0" in page5              # max_job_bytes


def test_every_command_and_param_in_duogenctl_1():
    page = read(MAN, "duogenctl.1")
    commands = source_table("commands")
    assert [c for c, _ in commands] == ["enqueue", "batch", "watch", "result", "cancel", "stats", "top", "dead", "prune"]
    for name, args in commands:
        assert f".TP\n\\fB{name}\\fR {roff(args)}" in page, f"command {name} missing from duogenctl(1)"
    params = source_table("params")
    assert len(params) >= 20
    for key, example in params:
        assert f".TP\n\\fB{key}\\fR\n" in page and roff(example) in page, f"--param {key} missing"
    for opt, arg in source_table("global_options"):
        assert f"\\fB{roff(opt)}\\fR \\fI{arg}\\fR" in page


def test_each_param_example_is_accepted(cluster):
    """The page's example of each --param is a value enqueue takes (no worker runs them)."""
    ctl = os.path.join(BUILD, "duogenctl")
    for key, example in source_table("params"):
        p = subprocess.run([ctl, "--redis", cluster.server.url, "enqueue", "--param", example, "x"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, f"--param {example}: {p.stderr}"
    assert cluster.r.xlen("duogen:jobs") == len(source_table("params"))


def test_pages_render_without_warnings():
    for page, title in (("duogend.8", "DUOGEND(8)"), ("duogend.conf.5", "DUOGEND.CONF(5)"),
                        ("duogenctl.1", "DUOGENCTL(1)")):
        path = os.path.join(MAN, page)
        g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", path], capture_output=True, text=True)
        assert g.returncode == 0 and g.stderr == "", f"groff on {page}: {g.stderr}"
        out, err = render("-l", path)
        assert err == "", f"man on {page}: {err}"
        assert out.lstrip().startswith(title) and "NAME" in out and "SEE ALSO" in out
    out, _ = render("-l", os.path.join(MAN, "duogend.8"))
    assert "--claim-idle-ms N" in out and "EXIT STATUS" in out


def test_make_install_puts_pages_where_man_finds_them():
    with tempfile.TemporaryDirectory(prefix="duogen-install-") as dest:
        # -o all: install what is built, build nothing (make test has just built it)
        subprocess.run(["make", "--no-print-directory", "-o", "all", "install", f"DESTDIR={dest}",
                        "PREFIX=/usr"], cwd=ROOT, check=True, capture_output=True, timeout=120)
        mandir = os.path.join(dest, "usr", "share", "man")
        for sect, page in (("1", "duogenctl.1"), ("5", "duogend.conf.5"), ("8", "duogend.8")):
            installed = os.path.join(mandir, f"man{sect}", page)
            assert read(installed) == read(MAN, page)
        out, err = render("-M", mandir, "5", "duogend.conf")
        assert err == "" and "max_inflight = N" in out
        out, _ = render("-M", mandir, "8", "duogend")
        assert "--worker-id text" in out
        producers = os.path.join(dest, "usr", "share", "duogen", "examples", "producers")
        assert sorted(os.listdir(producers)) == ["README.md", "c", "go", "python", "ruby"]


def test_the_example_settings_file_is_read_as_shipped(tmpdir_path):
    """systemd/duogend.conf.example, installed as the starting point of /etc/duogen/duogend.conf:
    every key in it is one duogend knows, every value one it takes (it goes on to open the
    model, here one that is not there)."""
    example = os.path.join(ROOT, "systemd", "duogend.conf.example")
    keys = [m.group(1) for line in read(example).splitlines() if (m := re.match(r"^(\w+) = ", line))]
    assert set(keys) <= set(source_settings()) and "metrics_address" in keys, keys
    p = subprocess.run([os.path.join(BUILD, "duogend"), "--config", example, "--model",
                        os.path.join(tmpdir_path, "absent"), "--redis", "redis://127.0.0.1:1/0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 78 and "cannot open the model" in p.stderr, p.stderr
