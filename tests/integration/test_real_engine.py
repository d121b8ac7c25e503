"""duogend with the real engine (libduogen) on the tiny package: a text job end to end."""
import json
import os
import subprocess

from conftest import BUILD, ROOT, Worker, pb

VOCAB = os.path.join(ROOT, "..", "shared", "vocab", "qwen2")


def test_duogend_runs_the_tiny_package(cluster):
    pkg = os.path.join(cluster.tmp, "pkg")
    subprocess.run([os.path.join(BUILD, "mkmodel"), "--preset", "tiny", "--seed", "5", "--out", pkg,
                    "--vocab", VOCAB], check=True, capture_output=True, timeout=120)
    with open(os.path.join(pkg, "duogen.json"), "w") as f:
        json.dump({"format": "duogen-package-1", "name": "tiny", "components": {"mllm": "mllm"},
                   "max_context": 512, "defaults": {"max_new_tokens": 12}}, f)
    w = Worker(cluster.tmp, cluster.server.url, "real1", pkg)
    w.cmd[0] = os.path.join(BUILD, "duogend")
    w.kill()
    w.start()
    cluster.workers.append(w)
    cluster.enqueue("real-1", "Hello, what is for dinner?", system="You are a cook.")
    res = cluster.wait_result("real-1", timeout=60)
    assert res["status"] == b"done", res
    r = pb.Result.FromString(res["pb"])
    assert r.usage.prompt_tokens > 10 and 0 < r.usage.generated_tokens <= 12
    assert r.finish_reason in ("stop", "length")
    texts = [e["text"] for e in cluster.events("real-1") if e["type"] == b"text"]
    assert b"".join(texts) == res["text"]
    assert "model loaded: tiny: qwen2.5-vl" in w.logs()
