#!/usr/bin/env python3
"""Gathers the demo's answers into one page a person can read: out/answer.md (Markdown,
the PNGs beside it) and out/answer.html (self-contained: the same text, each PNG inline as
a data: URI, input pictures shown with their request).

    tools/demo_page.py OUT JOB_FILE:ANSWER_DIR...

Each JOB_FILE is an examples/*.job (its "text" and "images" are the request); ANSWER_DIR
is where `duogenctl ... --out` wrote that job's answer.md and image-N.png, under OUT.
Python 3 standard library only."""
import base64
import html
import json
import os
import re
import shutil
import sys

LINK = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")


def data_uri(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def html_text(text, folder):
    """An answer's Markdown (plain text and image links) as HTML: text escaped, line breaks
    kept, each link an inline picture."""
    out, pos = [], 0
    for m in LINK.finditer(text):
        out.append(html.escape(text[pos:m.start()]).replace("\n", "<br>\n"))
        out.append(f'<img alt="{html.escape(m.group(1))}" src="{data_uri(os.path.join(folder, m.group(2)))}">')
        pos = m.end()
    out.append(html.escape(text[pos:]).replace("\n", "<br>\n"))
    return "".join(out)


def main(argv):
    out = argv[1]
    md = ["# duogen demo: answers of the shapes model", ""]
    page = ["<!doctype html>", '<html><head><meta charset="utf-8"><title>duogen demo</title>',
            "<style>body{font-family:sans-serif;max-width:52em;margin:2em auto;line-height:1.5}"
            "img{width:192px;height:192px;image-rendering:pixelated;border:1px solid #ccc;"
            "margin:.4em;vertical-align:middle}.req{background:#f3f3f3;padding:.6em}</style>",
            "</head><body>", "<h1>duogen demo: answers of the shapes model</h1>"]
    for arg in argv[2:]:
        job_file, answer_dir = arg.split(":", 1)
        job = json.load(open(job_file))
        rel = os.path.relpath(answer_dir, out)
        text = open(os.path.join(answer_dir, "answer.md")).read().strip()
        inputs = []
        for k, p in enumerate(job.get("images", [])):
            src = os.path.join(os.path.dirname(job_file), p)
            name = f"input-{k + 1}.png"
            shutil.copy(src, os.path.join(answer_dir, name))
            inputs.append(name)
        md += [f"## {job['id']}", "", "**Request:** " + " ".join(f"![input {k + 1}]({rel}/{n})"
                                                              for k, n in enumerate(inputs)) + " " + job["text"],
               "", "**Answer:**", "", LINK.sub(lambda m: f"![{m.group(1)}]({rel}/{m.group(2)})", text), ""]
        page += [f"<h2>{html.escape(job['id'])}</h2>", '<p class="req"><b>Request:</b> ' +
                 "".join(f'<img alt="input {k + 1}" src="{data_uri(os.path.join(answer_dir, n))}">'
                         for k, n in enumerate(inputs)) + html.escape(job["text"]) + "</p>",
                 "<p><b>Answer:</b><br>\n" + html_text(text, answer_dir) + "</p>"]
    page.append("</body></html>")
    with open(os.path.join(out, "answer.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "answer.html"), "w") as f:
        f.write("\n".join(page) + "\n")


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] in ("-h", "--help") or any(":" not in a for a in sys.argv[2:]):
        asked = len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    main(sys.argv)
