"""Priority that holds for any max_inflight: with 50 normal jobs queued and 5 high-priority
jobs added while the worker's slots are busy, the next jobs the worker starts are the high
ones, all five, before any other normal job. Start order is the test engine's submission
number (fake.report=1: "params{seq=N;...}"); nothing running is preempted."""
import re

import pytest

from conftest import wait_until


def seq_of(cluster, job_id):
    res = cluster.wait_result(job_id, timeout=60)
    assert res["status"] == b"done", res
    return int(re.match(r"params\{seq=(\d+);", res["text"].decode()).group(1))


@pytest.mark.parametrize("inflight", [1, 4])
def test_high_jobs_start_before_queued_normal_ones(cluster, inflight):
    # a normal job is 5 engine steps (params, "Echo:", "a", "b", the end) of 100 ms each, per
    # job in flight: long enough that the slots stay busy while the high jobs are added
    normal = [f"n{i:02d}" for i in range(50)]
    for job_id in normal:
        cluster.enqueue(job_id, "a b", meta={"fake.report": 1, "fake.step_ms": 100})
    cluster.worker(args=["--max-inflight", str(inflight)])

    def started():
        return [j for j in normal if cluster.r.exists(cluster.key("job", j))]
    first = wait_until(lambda: len(started()) == inflight and started(), what=f"{inflight} normal jobs running")
    high = [f"h{i}" for i in range(5)]
    for job_id in high:
        cluster.enqueue(job_id, "x", meta={"fake.report": 1}, stream="jobs:high")
    # every slot was busy: nothing else was taken meanwhile
    assert started() == first
    seqs = sorted(seq_of(cluster, j) for j in high)
    assert seqs == list(range(inflight + 1, inflight + 6)), seqs
    # the normal jobs that ran first finished (none was preempted); every other normal job the
    # worker took by now was taken to run (not refused for want of a slot and left pending:
    # "retrying"), and started after the high ones
    assert sorted(seq_of(cluster, j) for j in first) == list(range(1, inflight + 1))
    taken = [j for j in normal[inflight:] if cluster.r.exists(cluster.key("job", j))]
    assert all(cluster.r.hget(cluster.key("job", j), "state") != b"retrying" for j in taken)
    assert all(seq_of(cluster, j) > inflight + 5 for j in taken)
    pending = cluster.r.xpending_range(cluster.key("jobs"), "duogen", "-", "+", 100)
    assert all(p["times_delivered"] == 1 for p in pending), pending


def test_own_pending_entries_of_both_streams_come_back_with_one_slot(cluster):
    """An earlier life of worker w1 read one job of each stream and died. With one slot, the
    high one runs first; the normal one is taken from w1's own pending list right after, not
    left for another worker's XAUTOCLAIM (claim_idle_ms is a minute here)."""
    for stream in ("jobs:high", "jobs"):
        cluster.r.xgroup_create(cluster.key(stream), "duogen", id="0", mkstream=True)
    cluster.enqueue("own-high", "x", meta={"fake.report": 1}, stream="jobs:high")
    cluster.enqueue("own-normal", "y", meta={"fake.report": 1})
    got = cluster.r.xreadgroup("duogen", "w1", {cluster.key("jobs:high"): ">", cluster.key("jobs"): ">"}, count=1)
    assert len(got) == 2
    cluster.worker(args=["--max-inflight", "1", "--claim-idle-ms", "60000"])
    assert seq_of(cluster, "own-high") == 1
    assert seq_of(cluster, "own-normal") == 2
