"""Monitoring with real parts (issue 19): Debian's `prometheus` scrapes a duogend, and the
series the deploy docs name, the alert rules and the Grafana dashboard's queries are checked
against what it stores; `promtool` checks and unit-tests the rules."""
import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, free_port, wait_until

DEPLOY = os.path.join(ROOT, "deploy")
RULES = os.path.join(DEPLOY, "prometheus", "duogen.rules.yml")
RULE_TESTS = os.path.join(DEPLOY, "prometheus", "duogen.rules.test.yml")
DASHBOARD = os.path.join(DEPLOY, "grafana", "duogen.json")

needs_prometheus = pytest.mark.skipif(not shutil.which("prometheus") or not shutil.which("promtool"),
                                      reason="no prometheus/promtool here (Debian package prometheus; tools/deps.sh)")


def documented_series():
    """The `duogen_*` series of deploy/README.md's series table (first column)."""
    with open(os.path.join(DEPLOY, "README.md"), encoding="utf-8") as f:
        return [m.group(1) for line in f if (m := re.match(r"^\| `(duogen_\w+)` \|", line))]


def rule_exprs():
    """(alert, expr) of duogen.rules.yml, read without a YAML library: each `- alert:` line
    and the expression under it (inline or a `|` block)."""
    out, lines = [], open(RULES, encoding="utf-8").read().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*- alert: (\w+)", line)
        if not m:
            continue
        e = re.match(r"(\s*)expr: (.*)", lines[i + 1])
        if e.group(2).strip() != "|":
            out.append((m.group(1), e.group(2).strip()))
            continue
        body, j = [], i + 2
        while j < len(lines) and len(lines[j]) - len(lines[j].lstrip()) > len(e.group(1)):
            body.append(lines[j].strip())
            j += 1
        out.append((m.group(1), " ".join(body)))
    return out


@needs_prometheus
def test_rules_pass_promtool_check_and_their_unit_tests():
    r = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 8 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run(["promtool", "test", "rules", os.path.basename(RULE_TESTS)], capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(RULE_TESTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    assert {a for a, _ in rule_exprs()} == {"DuogenQueueLagGrowing", "DuogenDeadLetters", "DuogenWorkerDown",
                                            "DuogenWorkerNotReady", "DuogenWorkerRedisDown", "DuogenFailureRate", "DuogenJobStuckInPhase",
                                            "DuogenRedisEvicts"}


class Prometheus:
    """A prometheus server scraping one target every second, in its own data dir."""

    def __init__(self, tmp, target):
        self.port = free_port()
        conf = os.path.join(tmp, "prometheus.yml")
        shutil.copy(RULES, os.path.join(tmp, "duogen.rules.yml"))
        with open(conf, "w") as f:
            f.write("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                    "rule_files:\n  - duogen.rules.yml\n"
                    f"scrape_configs:\n  - job_name: duogend\n    static_configs:\n      - targets: ['{target}']\n")
        self.log = open(os.path.join(tmp, "prometheus.log"), "wb")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp}/tsdb",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())

    def query(self, expr):
        """The instant vector of expr: [(labels, value)]; a query error fails the test."""
        r = self.api("query", query=expr)
        assert r["status"] == "success", (expr, r)
        return [(s["metric"], float(s["value"][1])) for s in r["data"]["result"]]

    def ready(self):
        try:
            return self.query('up{job="duogend"} == 1') or None
        except OSError:
            return None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def scraped(cluster, tmpdir_path):
    """A prometheus scraping a worker that, once scraped, ran a done job with an image and a
    failing one, and has a slow job running (the counters rise under Prometheus' eyes, so
    that increase() and the alerts see them)."""
    port = free_port()
    cluster.worker("pw", args=["--metrics-port", str(port), "--max-inflight", "2"])
    cluster.wait_groups()
    prom = Prometheus(tmpdir_path, f"127.0.0.1:{port}")
    try:
        wait_until(prom.ready, timeout=30, every=0.2, what="prometheus scraping the worker")
        cluster.enqueue("p1", "one two three", meta={"fake.images": 1}, steps=3)
        cluster.enqueue("p2", "x", meta={"fake.fail": "error"})
        cluster.wait_result("p1")
        cluster.wait_result("p2")
        cluster.enqueue("slow", " ".join(["w"] * 400), meta={"fake.step_ms": 100})
        wait_until(lambda: cluster.r.hget(cluster.key("job", "slow"), "phase") == b"decode", what="slow job decoding")
        wait_until(lambda: prom.query('duogen_jobs_total{outcome="failed"} == 1') or None, what="a scrape after the jobs")
        wait_until(lambda: prom.query('duogen_job_phase_seconds{phase="decode"} > 0') or None, what="a scrape of the slow job")
        yield cluster, prom
    finally:
        prom.stop()


@needs_prometheus
def test_prometheus_stores_every_documented_series(scraped):
    cluster, prom = scraped
    names = documented_series()
    assert len(names) >= 15, names
    for name in names:
        assert prom.query(name), f"{name}: named in deploy/README.md, not scraped from the worker"
    outcome = {m["outcome"]: v for m, v in prom.query('duogen_jobs_total{worker="pw"}')}
    assert outcome["done"] == 1 and outcome["failed"] == 1 and outcome["dead_lettered"] == 1, outcome
    assert prom.query('duogen_images_total{worker="pw"}')[0][1] == 1
    assert prom.query('duogen_denoise_steps_total{worker="pw"}')[0][1] == 3


@needs_prometheus
def test_the_phase_age_of_a_running_job_grows(scraped):
    cluster, prom = scraped
    first = prom.query('duogen_job_phase_seconds{worker="pw",phase="decode"}')[0][1]
    time.sleep(2.5)
    later = wait_until(lambda: (lambda v: v if v > first + 1 else None)(
        prom.query('duogen_job_phase_seconds{worker="pw",phase="decode"}')[0][1]), what="a later scrape")
    assert later > first + 1
    # the same job moves on (a token every 100 ms): its stall gauge stays near 0 while its
    # time in decode grows (DuogenJobStuckInPhase reads the former: it fired on any decode
    # past 15 minutes)
    stalled = prom.query('duogen_job_stalled_seconds{worker="pw",phase="decode"}')[0][1]
    assert 0 <= stalled < 2.0 < later, (stalled, later)
    assert prom.query('duogen_job_phase_seconds{worker="pw",phase="diffusion"}')[0][1] == 0
    cluster.r.set(cluster.key("cancel", "slow"), 1)
    cluster.wait_result("slow")
    wait_until(lambda: prom.query('duogen_job_phase_seconds{worker="pw",phase="decode"} == 0') or None,
               what="no job decoding after the cancel")


@needs_prometheus
def test_alert_rules_and_dashboard_queries_run_on_the_scraped_series(scraped):
    cluster, prom = scraped
    for alert, expr in rule_exprs():
        prom.query(expr)   # a wrong metric or label name is no error in PromQL, so below:
    # the rules and the dashboard name only series the worker exports
    exported = set(documented_series()) | {"up"}
    with open(DASHBOARD, encoding="utf-8") as f:
        dash = json.load(f)
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]] + [e for _, e in rule_exprs()]
    assert len(exprs) >= 18
    for expr in exprs:
        prom.query(expr)
        used = set(re.findall(r"\bduogen_\w+", expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())
        assert used and used <= exported, (expr, used - exported)
        for name in used - {"up"}:
            assert prom.query(name), f"{name} (in {expr!r}) has no series"
    # the dead letter of p2 makes DuogenDeadLetters fire; nothing else does
    firing = wait_until(lambda: [a["labels"]["alertname"] for a in prom.api("alerts")["data"]["alerts"]
                                 if a["state"] == "firing"] or None, timeout=30, what="an alert firing")
    assert firing == ["DuogenDeadLetters"], firing


@needs_prometheus
def test_the_dashboards_rates_are_figures_of_a_window(scraped):
    """The dashboard's decode tokens/s and cache hit ratio are rates over 5 minutes of the
    counters (the gauges are lifetime averages, which a long-lived worker's figure hides).
    Here the window covers the worker's whole life and both counters started at 0 in the
    same scrapes, so rate()'s extrapolation cancels and the windowed ratio is the lifetime
    gauge's."""
    cluster, prom = scraped
    wait_until(lambda: prom.query('duogen_timed_tokens_total{worker="pw"} > 0') or None, what="p1's tokens scraped")
    with open(DASHBOARD, encoding="utf-8") as f:
        panels = {p["title"]: p["targets"][0]["expr"] for p in json.load(f)["panels"]}
    expr = next(e for t, e in panels.items() if t.startswith("Decode tokens per second"))
    assert "rate(duogen_timed_tokens_total[5m])" in expr, expr
    windowed = prom.query(expr)
    gauge = prom.query('duogen_tokens_per_second{worker="pw"}')[0][1]
    assert len(windowed) == 1 and windowed[0][0] == {"worker": "pw"}, windowed
    # 1%: the gauge is printed with 3 decimals and the decode seconds with 6 (a fake job's
    # decode is a few ms), so the two ratios differ in their last printed digits only
    assert gauge > 0 and abs(windowed[0][1] - gauge) <= 0.01 * gauge, (windowed, gauge)
    # the fake engine has no caches: no lookups, so no ratio at all (not a 0 that reads as
    # "every lookup missed")
    assert prom.query('sum(duogen_cache_hits_total) + sum(duogen_cache_misses_total)')[0][1] == 0
    hit = next(e for t, e in panels.items() if t.startswith("Cache hit ratio"))
    assert prom.query(hit) == [], hit
