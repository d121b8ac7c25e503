"""Parameters with presence, through Redis and a real duogend over the test engine: a field
a producer sets (0 included) reaches the engine as set with that value, a field it leaves
out reaches it unset (the package's default); values out of range fail the job with the
field's name; a job encoded with the schema from before presence still runs and gets the
defaults. The test engine reports what it received (fake.report=1, tests/engine_fake)."""
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import make_job, pb

FIELDS = ("max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "width", "height", "steps",
          "guidance_scale", "max_images", "shift", "schedule")


def report(cluster, job_id):
    """The parameters the engine received, from the test engine's first word."""
    res = cluster.wait_result(job_id)
    assert res["status"] == b"done", res
    m = re.match(r"params\{([^}]*)\}", res["text"].decode())
    assert m, res["text"]
    return dict(kv.split("=", 1) for kv in m.group(1).split(";"))


# field -> (the value set, as the producer writes it; as the engine reports it). The values
# are those where "0 means default" used to lose the producer's meaning, or a plain value for
# the fields where 0 is not a value (width, height, steps, max_new_tokens).
CASES = {
    "max_new_tokens": (5, "5"),
    "temperature": (0.0, "0"),                 # greedy
    "top_p": (1.0, "1"),                       # off
    "top_k": (0, "0"),                         # off
    "repetition_penalty": (1.0, "1"),          # off
    "width": (32, "32"),
    "height": (48, "48"),
    "steps": (3, "3"),
    "guidance_scale": (0.0, "0"),              # no guidance
    "max_images": (0, "0"),                    # text only
    "shift": (2.5, "2.5"),
    "schedule": (pb.ImageParams.KARRAS, "karras"),
}


@pytest.mark.parametrize("field", FIELDS)
def test_a_set_parameter_reaches_the_engine_and_an_unset_one_does_not(cluster, field):
    cluster.worker()
    value, shown = CASES[field]
    cluster.enqueue(f"set-{field}", "a b c", meta={"fake.report": 1, "fake.images": 1}, **{field: value})
    cluster.enqueue(f"unset-{field}", "a b c", meta={"fake.report": 1})
    got = report(cluster, f"set-{field}")
    assert got[field] == shown
    assert all(v == "-" for k, v in got.items() if k not in (field, "seq")), got
    assert all(v == "-" for k, v in report(cluster, f"unset-{field}").items() if k != "seq")
    if field == "max_images":   # asked for one image, allowed none
        assert cluster.result(f"set-{field}")["images"] == b"0"


@pytest.mark.parametrize("field,value,message", [
    ("top_p", 0.0, "text.top_p: 0 is not in (0, 1]"),
    ("repetition_penalty", 0.0, "text.repetition_penalty: 0 is not in (0, 100]"),
    ("temperature", -1.0, "text.temperature: -1 is not in 0..100"),
    ("guidance_scale", 101.0, "image.guidance_scale: 101 is not in 0..100"),
    ("shift", 0.0, "image.shift: 0 is not in [0.001, 100]"),
    ("shift", 1e-45, "image.shift: 1.4013e-45 is not in [0.001, 100]"),
])
def test_a_set_value_out_of_range_fails_the_job_naming_the_field(cluster, field, value, message):
    cluster.worker()
    cluster.enqueue("bad", "hello", **{field: value})
    res = cluster.wait_result("bad")
    assert res["status"] == b"failed" and res["error_code"] == b"BAD_REQUEST", res
    assert message in res["error"].decode()


def test_shift_with_the_karras_schedule_is_refused(cluster):
    cluster.worker()
    cluster.enqueue("karras-shift", "hello", schedule=pb.ImageParams.KARRAS, shift=3.0)
    res = cluster.wait_result("karras-shift")
    assert res["status"] == b"failed"
    assert "image.shift: the KARRAS schedule has no shift" in res["error"].decode()


def old_schema(tmp):
    """duogen_before_presence.proto compiled for Python (protoc, as the build does)."""
    here = os.path.dirname(__file__)
    subprocess.run(["protoc", f"--proto_path={here}", f"--python_out={tmp}", "duogen_before_presence.proto"],
                   check=True)
    sys.path.insert(0, tmp)
    try:
        return importlib.import_module("duogen_before_presence_pb2")
    finally:
        sys.path.remove(tmp)


def test_a_job_from_before_presence_runs_with_the_defaults(cluster):
    old = old_schema(cluster.tmp)
    job = old.Job(id="old-1", seed=4)
    m = job.messages.add(role=old.Message.USER)
    m.parts.add(text="a b c")
    job.metadata["fake.report"] = "1"
    # what an old producer wrote for "the model default" (0, never sent) and for values
    job.text.temperature = 0.0
    job.text.top_p = 0.9
    job.image.guidance_scale = 0.0
    job.image.max_images = 0
    job.image.shift = 0.0
    job.image.width = 32
    raw = job.SerializeToString()
    assert pb.Job.FromString(raw).text.HasField("top_p")           # the same wire format
    assert not pb.Job.FromString(raw).text.HasField("temperature")
    cluster.worker()
    cluster.enqueue("old-1", raw=raw)
    got = report(cluster, "old-1")
    assert got["top_p"] == "0.9" and got["width"] == "32"
    for k in ("temperature", "guidance_scale", "max_images", "shift", "schedule", "max_new_tokens"):
        assert got[k] == "-", (k, got)


def test_python_presence_semantics():
    """What the README's example relies on: setting a field makes it present, 0 included."""
    job = make_job("py-1", temperature=0.0)
    assert job.text.HasField("temperature") and job.text.temperature == 0.0
    assert not job.text.HasField("top_p")
    job.text.ClearField("temperature")
    assert not job.text.HasField("temperature")
    assert pb.Job.FromString(make_job("py-2", guidance_scale=0.0).SerializeToString()).image.HasField("guidance_scale")
