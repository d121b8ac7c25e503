#!/usr/bin/env python3
"""A duogen producer in Python (Debian: python3-redis, python3-protobuf).

    producer.py --redis URL [--tls-ca-file FILE] --id ID --image FILE --out DIR [--prefix P] [--meta KEY=VALUE]... TEXT...

Enqueues one job (the image, then the text, as the user's message), follows its events,
waits for its result and writes DIR/answer.md with DIR/image-N.png. The protocol is
proto/duogen.proto; duogen_pb2 is generated from it (`protoc --python_out=DIR
proto/duogen.proto`; `make` puts it in build/gen/python). examples/producers/README.md
says what every producer of this folder prints and exits with."""
import argparse
import os
import re
import sys
import time

import redis

import duogen_pb2 as pb

EXIT_JOB, EXIT_USAGE, EXIT_IO = 1, 2, 3
TIMEOUT_S = 120


def build_job(job_id, image_bytes, text, meta):
    job = pb.Job(id=job_id)
    msg = job.messages.add(role=pb.Message.USER)
    msg.parts.add(image=pb.Image(data=image_bytes))
    msg.parts.add(text=text)
    for kv in meta:
        k, _, v = kv.partition("=")
        job.metadata[k] = v
    return job


def event_line(ev):
    """One line per event, None for text deltas; (line, final) where final ends the wait."""
    kind = ev.WhichOneof("payload")
    if kind == "started":
        return f"started worker={ev.started.worker_id} attempt={ev.started.attempt}", False
    if kind == "image_started":
        s = ev.image_started
        return f"image {s.index} started {s.width}x{s.height} steps={s.steps}", False
    if kind == "step":
        return f"image {ev.step.index} step {ev.step.step}/{ev.step.steps}", False
    if kind == "image_done":
        return f"image {ev.image_done.index} done {ev.image_done.key or ev.image_done.path}", False
    if kind == "done":
        return pb.Result.Status.Name(ev.done.status).lower(), True
    if kind == "failed":
        return f"failed {pb.Error.Code.Name(ev.failed.error.code)}: {ev.failed.error.message}", True
    if kind == "cancelled":
        return "cancelled", True
    return None, False


def follow(r, events_key):
    """Prints the job's events from its first until the final one."""
    last, deadline = "0", time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for _stream, entries in r.xread({events_key: last}, count=100, block=1000) or []:
            for entry_id, fields in entries:
                last = entry_id
                ev = pb.Event.FromString(fields[b"pb"])
                line, final = event_line(ev)
                if line:
                    print(line, flush=True)
                if final:
                    return
    raise TimeoutError(f"no final event on {events_key} within {TIMEOUT_S} s")


def write_answer(r, result, out_dir):
    """answer.md: the text parts as they are, each image as a Markdown link to its file,
    between blank lines (as the worker's result text has them)."""
    os.makedirs(out_dir, exist_ok=True)
    md, n = [], 0
    for part in result.output:
        if part.WhichOneof("kind") == "text":
            md.append(part.text)
            continue
        n += 1
        source = part.image.WhichOneof("source")
        if source == "data":                  # the job asked for inline_images
            data = part.image.data
        elif source == "path":                # the worker wrote it to a shared file system
            with open(part.image.path, "rb") as f:
                data = f.read()
        else:
            data = r.get(part.image.key)
        if data is None:
            raise OSError(f"{part.image.key} has expired")
        with open(os.path.join(out_dir, f"image-{n}.png"), "wb") as f:
            f.write(data)
        md.append(f"\n\n![image {n}](image-{n}.png)\n\n")
    with open(os.path.join(out_dir, "answer.md"), "w", encoding="utf-8") as f:
        f.write("".join(md))
    print(f"wrote {out_dir}/answer.md and {n} image(s)")


def main():
    ap = argparse.ArgumentParser(description="enqueue one duogen job and write its answer")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0", help="redis://... or rediss://... (TLS)")
    ap.add_argument("--tls-ca-file", help="with rediss://: the CA that signed the server's certificate "
                    "(default: the system's)")
    ap.add_argument("--prefix", default="duogen")
    ap.add_argument("--id", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE job metadata")
    ap.add_argument("text", nargs="+")
    try:
        a = ap.parse_args()
    except SystemExit as e:
        sys.exit(0 if e.code == 0 else EXIT_USAGE)
    # the ids a worker accepts; another would be dead-lettered under an id of the worker's
    # own, and this producer would wait for a result that never comes
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", a.id):
        print(f"producer: --id {a.id!r} is not 1..128 characters of A-Z a-z 0-9 . _ : -", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        tls = {"ssl_ca_certs": a.tls_ca_file} if a.tls_ca_file else {}
        r = redis.Redis.from_url(a.redis, socket_timeout=30, **tls)
    except ValueError as e:   # not a redis://, rediss:// or unix:// URL
        print(f"producer: --redis {a.redis!r}: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    try:
        with open(a.image, "rb") as f:
            job = build_job(a.id, f.read(), " ".join(a.text), a.meta)
        r.hsetnx(f"{a.prefix}:job:{a.id}", "state", "queued")   # before the XADD: a worker's "running" comes after it
        r.xadd(f"{a.prefix}:jobs", {"id": a.id, "job": job.SerializeToString()})
        print(f"enqueued {a.id}", flush=True)
        follow(r, f"{a.prefix}:events:{a.id}")
        raw = r.hget(f"{a.prefix}:result:{a.id}", "pb")   # written with the final event
        if raw is None:
            raise OSError(f"no result for {a.id}")
        result = pb.Result.FromString(raw)
        write_answer(r, result, a.out)
    except (redis.exceptions.RedisError, OSError, TimeoutError) as e:
        print(f"producer: {e}", file=sys.stderr)
        sys.exit(EXIT_IO)
    sys.exit(0 if result.status == pb.Result.DONE else EXIT_JOB)


if __name__ == "__main__":
    main()
