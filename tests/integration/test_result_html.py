"""duogenctl result ID --html DIR against a real Redis and worker: one self-contained page
with the answer's Markdown rendered, every image in place and decodable, the timings and
usage of the Result; raw HTML from the answer never reaches the page."""
import base64
import io
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from conftest import BUILD, pb
from test_producers import png, png_size

CTL = os.path.join(BUILD, "duogenctl")


class Page(HTMLParser):
    """What a browser would load and show: elements in order, image sources, the text of
    <main> and of the table rows."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.imgs, self.main_text, self.rows = [], [], [], {}
        self._in_main = False
        self._cell = None
        self._row = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "main":
            self._in_main = True
        if tag == "img":
            self.imgs.append(a)
            if self._in_main:
                self.main_text.append(f"[img {len(self.imgs)}]")
        if tag in ("th", "td"):
            self._cell = []
        if tag == "tr":
            self._row = []

    def handle_endtag(self, tag):
        if tag == "main":
            self._in_main = False
        if tag in ("th", "td") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        if tag == "tr" and len(self._row) == 2:
            self.rows[self._row[0]] = self._row[1]

    def handle_data(self, data):
        if self._in_main:
            self.main_text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def ctl(cluster, *args):
    return subprocess.run([CTL, "--redis", cluster.server.url] + list(args), capture_output=True, text=True,
                          timeout=60)


def load(path):
    page = Page()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    return page


def test_html_page_has_text_images_and_timings(cluster, tmpdir_path):
    cluster.worker()
    img = os.path.join(tmpdir_path, "in.png")
    with open(img, "wb") as f:
        f.write(png(12, 8, 3))
    p = ctl(cluster, "enqueue", "--id", "page-1", "--image", img, "--param", "meta.fake.images=2",
            "--param", "width=48", "--param", "height=32", "--wait", "make", "**hot**", "soup")
    assert p.returncode == 0, p.stderr
    html_dir = os.path.join(tmpdir_path, "page")
    p = ctl(cluster, "result", "page-1", "--html", html_dir, "--out", os.path.join(tmpdir_path, "md"))
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(html_dir)) == ["index.html"]
    page = load(os.path.join(html_dir, "index.html"))

    # self-contained: nothing but data: URIs, no scripts, no stylesheets to fetch
    assert "script" not in page.tags and "link" not in page.tags and "iframe" not in page.tags
    assert len(page.imgs) == 2
    for n, attrs in enumerate(page.imgs, 1):
        assert attrs["alt"] == f"image {n}"
        head, _, b64 = attrs["src"].partition(",")
        assert head == "data:image/png;base64"
        data = base64.b64decode(b64, validate=True)
        assert data == cluster.r.get(f"duogen:image:page-1:{n}") and png_size(data) == (48, 32)

    # the Markdown rendered: ** became <strong>, the images sit where the worker put them
    assert "strong" in page.tags
    text = "".join(page.main_text)
    assert "**" not in text and "duogen:image" not in text
    md = cluster.result("page-1")["text"].decode()
    want = re.sub(r"!\[image (\d)\]\(duogen:image:page-1:\d\)", r"[img \1]", md).replace("**", "")
    assert " ".join(text.split()) == " ".join(want.split()) == "Echo: [img 1] make [img 2] hot soup"

    # the Result's figures
    res = pb.Result.FromString(cluster.r.hget("duogen:result:page-1", "pb"))
    for phase in ("queue", "prefill", "decode", "vision", "diffusion", "vae", "total"):
        assert page.rows[phase] == f"{getattr(res.timings, phase + '_ms'):.1f} ms"
    assert page.rows["images"] == "2" and page.rows["generated tokens"] == str(res.usage.generated_tokens) != "0"
    assert page.rows["prompt tokens"] == str(res.usage.prompt_tokens)
    with open(os.path.join(html_dir, "index.html"), encoding="utf-8") as f:
        assert "status: done" in f.read()
    # --out beside --html still writes the Markdown and the files
    assert sorted(os.listdir(os.path.join(tmpdir_path, "md"))) == ["answer.md", "image-1.png", "image-2.png"]


def test_html_page_drops_raw_html_and_names_a_failure(cluster, tmpdir_path):
    cluster.worker()
    p = ctl(cluster, "enqueue", "--id", "page-2", "--wait", "<script>alert(1)</script>",
            "<img", "src=x", "onerror=alert(2)>", "tea")
    assert p.returncode == 0, p.stderr
    assert "<script>" in cluster.result("page-2")["text"].decode()   # the answer does hold raw HTML
    out = os.path.join(tmpdir_path, "page")
    assert ctl(cluster, "result", "page-2", "--html", out).returncode == 0
    page = load(os.path.join(out, "index.html"))
    assert "script" not in page.tags and page.imgs == [] and "tea" in "".join(page.main_text)
    raw = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    assert "<title>duogen page-2</title>" in raw and "onerror" not in raw

    p = ctl(cluster, "enqueue", "--id", "page-3", "--param", "meta.fake.fail=error", "--wait", "x")
    assert p.returncode == 1
    assert ctl(cluster, "result", "page-3", "--html", out).returncode == 1   # written, and the job failed
    raw = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    assert "status: failed: fake engine: failing as the job asked" in raw


def find(shot, img):
    """(y, x) where img stands in shot pixel for pixel, or None. Both are arrays of RGB bytes;
    a pixel may differ by 3 levels per channel (Chromium's decode and composite of an untagged
    8-bit sRGB PNG at scale 1 is exact in practice; 3 leaves room for a blend at an edge, and
    is far below the gradient's step between neighbours, so a shifted match cannot pass)."""
    import numpy as np
    h, w = img.shape[:2]
    ys, xs = np.nonzero(np.all(np.abs(shot[:-h + 1, :-w + 1] - img[0, 0]) <= 3, axis=2))
    for y, x in zip(ys, xs):
        if np.all(np.abs(shot[y:y + h, x:x + w] - img) <= 3):
            return int(y), int(x)
    return None


def test_html_page_in_headless_chromium_shows_the_pictures(cluster, tmpdir_path):
    chromium = shutil.which("chromium")
    if not chromium:
        pytest.skip("chromium is not installed (tools/deps.sh installs it: chromium)")
    try:
        import numpy as np
        from PIL import Image
    except ImportError as e:
        pytest.skip(f"{e.name} is missing (tools/deps.sh installs python3-numpy and python3-pil)")
    cluster.worker()
    p = ctl(cluster, "enqueue", "--id", "shot-1", "--param", "meta.fake.images=2", "--param", "width=96",
            "--param", "height=64", "--param", "seed=11", "--wait", "a", "b", "c")
    assert p.returncode == 0, p.stderr
    out = os.path.join(tmpdir_path, "page")
    assert ctl(cluster, "result", "shot-1", "--html", out).returncode == 0
    shot_path = os.path.join(tmpdir_path, "shot.png")
    args = [chromium, "--headless", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
            "--window-size=900,1400", f"--user-data-dir={tmpdir_path}/chromium", f"--screenshot={shot_path}",
            "file://" + os.path.join(out, "index.html")]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")   # Chromium refuses to run its sandbox as root
    c = subprocess.run(args, capture_output=True, text=True, timeout=120, env=dict(os.environ, HOME=tmpdir_path))
    assert c.returncode == 0 and os.path.exists(shot_path), c.stderr[-2000:]
    shot = np.asarray(Image.open(shot_path).convert("RGB"), dtype=np.int16)
    assert shot.shape == (1400, 900, 3)

    where = []
    for n in (1, 2):
        img = Image.open(io.BytesIO(cluster.r.get(f"duogen:image:shot-1:{n}"))).convert("RGB")
        assert img.size == (96, 64)
        pixels = np.asarray(img, dtype=np.int16)
        at = find(shot, pixels)
        assert at, f"image {n} is not on the screenshot"
        assert find(shot, pixels[::-1]) is None   # the search tells a picture from its mirror image
        where.append(at)
    # one above the other in the answer's order, each with the page's background around it
    (y1, x1), (y2, x2) = where
    assert x1 == x2 and y2 >= y1 + 64
    assert np.all(shot[y1 - 4, x1:x1 + 96] == shot[0, 0]) and tuple(shot[0, 0]) == (255, 255, 255)


def test_html_and_out_take_inline_bytes_and_name_a_gone_image(cluster, tmpdir_path):
    """The bytes come from the Result when the job asked for inline_images (the keys are not
    read); without them, an image whose key is gone is named, and the rest is written."""
    cluster.worker()
    for job_id, inline in (("inl", "true"), ("gone", "false")):
        p = ctl(cluster, "enqueue", "--id", job_id, "--param", "meta.fake.images=2", "--param",
                f"inline_images={inline}", "--wait", "x")
        assert p.returncode == 0, p.stderr
    want = {n: cluster.r.get(f"duogen:image:inl:{n}") for n in (1, 2)}
    cluster.r.delete("duogen:image:inl:1", "duogen:image:inl:2", "duogen:image:gone:1")

    page_dir, md_dir = os.path.join(tmpdir_path, "inl"), os.path.join(tmpdir_path, "inl-md")
    p = ctl(cluster, "result", "inl", "--html", page_dir, "--out", md_dir)
    assert p.returncode == 0 and "gone" not in p.stderr, p.stderr
    srcs = [base64.b64decode(i["src"].partition(",")[2]) for i in load(os.path.join(page_dir, "index.html")).imgs]
    assert srcs == [want[1], want[2]]
    assert open(os.path.join(md_dir, "image-1.png"), "rb").read() == want[1]

    page_dir, md_dir = os.path.join(tmpdir_path, "gone"), os.path.join(tmpdir_path, "gone-md")
    p = ctl(cluster, "result", "gone", "--html", page_dir, "--out", md_dir)
    # an answer written without one of its pictures is not the whole answer: exit 1
    assert p.returncode == 1 and "image 1 (duogen:image:gone:1) is gone" in p.stderr
    md = open(os.path.join(md_dir, "answer.md")).read()
    assert "![image 1](duogen:image:gone:1)" in md and "![image 2](image-2.png)" in md
    assert not os.path.exists(os.path.join(md_dir, "image-1.png"))
    imgs = load(os.path.join(page_dir, "index.html")).imgs
    assert [i["alt"] for i in imgs] == ["image 1", "image 2"] and imgs[0]["src"] == ""
    assert base64.b64decode(imgs[1]["src"].partition(",")[2]) == cluster.r.get("duogen:image:gone:2")
    assert sorted(os.listdir(md_dir)) == ["answer.md", "image-2.png"]
