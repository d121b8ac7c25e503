"""Reads pictures of the world of shapes with classical means, and scores answers.

detect(picture) finds the shapes of a picture:
  1. every pixel takes the nearest palette colour (world.COLOURS) if it lies within
     COLOUR_RADIUS of it in RGB, else it is background or an edge blend and is ignored;
  2. the pixels of each colour form connected components (4-neighbourhood);
  3. a component of at least MIN_AREA pixels is a shape: its centroid gives the grid cell,
     its bounding box the size (large when the longer side is at least LARGE_SIDE), and
     its kind comes from two numbers: the fill ratio (area over bounding box: square 1,
     circle pi/4, triangle 1/2) and the taper (how much narrower its top third is than its
     bottom third: 0 for squares and circles, about 0.8 for the apex-up triangle), nearest
     to each kind's prototype.

The scores compare detections with what a conversation asked for (conversations.py's
"images", "new", "edit" and "shapes" fields): see score_answer. Plain Python 3 with
numpy and Pillow; no PyTorch (the end-to-end test of `make test` uses it).

    python3 tools/train/score.py picture.png...     prints what it sees in each picture
"""
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversations  # noqa: E402
import world  # noqa: E402

COLOUR_RADIUS = 75.0   # RGB distance within which a pixel counts as a palette colour
MIN_AREA = 24          # pixels; a small triangle covers ~100
LARGE_SIDE = 20        # px; large shapes are 26 wide, small ones 14
PROTOTYPES = {"square": (1.0, 0.0), "circle": (0.785, 0.0), "triangle": (0.52, 0.8)}
TAPER_WEIGHT = 1.0     # taper counts as much as fill ratio in the distance to a prototype

PALETTE = np.array([world.COLOURS[c] for c in world.COLOUR_NAMES], dtype=np.float32)


class Detection:
    __slots__ = ("kind", "colour", "size", "cell", "area", "fill", "taper")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)

    def __repr__(self):
        return f"{self.size} {self.colour} {self.kind} in the {world.PLACES[self.cell]} " \
               f"(area {self.area}, fill {self.fill:.2f}, taper {self.taper:.2f})"


def colour_labels(rgb):
    """[H, W] palette index per pixel, -1 where no palette colour is near."""
    px = rgb.reshape(-1, 1, 3).astype(np.float32)
    d = np.sqrt(((px - PALETTE[None]) ** 2).sum(-1))          # [H·W, 6]
    lab = d.argmin(1)
    lab[d.min(1) > COLOUR_RADIUS] = -1
    return lab.reshape(rgb.shape[:2])


def components(mask):
    """Connected components (4-neighbourhood) of a boolean mask: a list of (ys, xs)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, ys, xs = [(y0, x0)], [], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append((np.array(ys), np.array(xs)))
    return out


def classify(ys, xs):
    """(kind, fill, taper) of a component."""
    y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
    bh, bw = y1 - y0 + 1, x1 - x0 + 1
    fill = len(ys) / float(bh * bw)
    third = max(1, bh // 3)
    top = np.count_nonzero(ys < y0 + third) / third
    bottom = np.count_nonzero(ys > y1 - third) / third
    taper = (bottom - top) / max(bottom, top, 1.0)
    kind = min(PROTOTYPES, key=lambda k: (fill - PROTOTYPES[k][0]) ** 2 +
               TAPER_WEIGHT * (taper - PROTOTYPES[k][1]) ** 2)
    return kind, fill, taper


def detect(picture):
    """The shapes of a picture (PIL image or [H, W, 3] uint8 array), largest first."""
    rgb = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
    lab = colour_labels(rgb)
    scale = world.SIDE / rgb.shape[1]
    out = []
    for ci, colour in enumerate(world.COLOUR_NAMES):
        for ys, xs in components(lab == ci):
            if len(ys) < MIN_AREA:
                continue
            kind, fill, taper = classify(ys, xs)
            cx, cy = xs.mean() * scale, ys.mean() * scale
            cell = min(2, int(cy // world.CELL)) * 3 + min(2, int(cx // world.CELL))
            side = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
            out.append(Detection(kind=kind, colour=colour, size="large" if side * scale >= LARGE_SIDE else "small",
                                 cell=cell, area=len(ys), fill=fill, taper=taper))
    return sorted(out, key=lambda d: -d.area)


def at(dets, colour, cell):
    """The largest detection of a colour in a cell, or None."""
    for d in dets:
        if d.colour == colour and d.cell == cell:
            return d
    return None


def same_picture(dets, shapes):
    """Every shape found (colour, place, kind) and nothing else."""
    if len(dets) != len(shapes):
        return False
    return all((d := at(dets, s.colour, s.cell)) is not None and d.kind == s.kind for s in shapes)


# ---- answers ------------------------------------------------------------------------------

def score_answer(conv, text, pictures):
    """Scores one answer (its text and its pictures, PIL images in order) to a conversation
    made by conversations.make. Returns {measure: (hits, trials)} for the measures that
    apply:
      decision    drew at least one picture exactly when the kind asks for one
      count       as many pictures as asked (draw and edit: 1, step: one per shape)
      present     per requested shape: found with its colour in its place
      kind        per requested shape found: the right kind
      size        per requested shape found whose size the user said (conv["sized"]; a
                  size left open is the model's choice): the right size
      clean       per picture of a draw or step answer: its shapes and nothing else
      kept        per later picture of a step answer whose previous picture holds at
                  least one of its asked shapes: every such shape is still there, with the
                  same colour, place and kind
      edit        the asked change made, nothing else changed (every other shape of the
                  source in place with its colour and kind, no new shape)
      describe    the text names exactly the picture's shapes (kind, colour, place)
      describe_size   and their sizes"""
    wants = conv["kind"] in ("draw", "step", "edit")
    r = {"decision": (int((len(pictures) > 0) == wants), 1)}
    if wants:
        r["count"] = (int(len(pictures) == len(conv["images"])), 1)
    dets = [detect(p) for p in pictures]
    present = kind = size = 0
    n_req = n_found = n_sized = 0
    for k, new in enumerate(conv["new"]):
        for s in new:
            n_req += 1
            d = at(dets[k], s.colour, s.cell) if k < len(dets) else None
            if d:
                present, n_found = present + 1, n_found + 1
                kind += d.kind == s.kind
                if s in conv.get("sized", new):
                    n_sized += 1
                    size += d.size == s.size
    if n_req:
        r["present"] = (present, n_req)
        r["kind"] = (kind, n_found)
        r["size"] = (size, n_sized)
    if conv["kind"] in ("draw", "step"):
        r["clean"] = (sum(same_picture(dets[k], conv["images"][k]) for k in range(min(len(dets), len(conv["images"])))),
                      len(conv["images"]))
    if conv["kind"] == "step":
        kept = trials = 0
        for k in range(1, min(len(dets), len(conv["images"]))):
            drawn = [(s, d) for s in conv["images"][k - 1] if (d := at(dets[k - 1], s.colour, s.cell))]
            if not drawn:       # nothing of the earlier picture was drawn: nothing to keep
                continue
            trials += 1
            kept += all((after := at(dets[k], s.colour, s.cell)) is not None and after.kind == d.kind
                        for s, d in drawn)
        if trials:
            r["kept"] = (kept, trials)
    if conv["kind"] == "edit":
        r["edit"] = (int(bool(dets) and edit_ok(conv["edit"], dets[0])), 1)
    if conv["kind"] == "describe":
        said = {(s.kind, s.colour, s.cell) for s in conversations.parse_shapes(text)}
        said_sized = {s.key() for s in conversations.parse_shapes(text)}
        r["describe"] = (int(said == {(s.kind, s.colour, s.cell) for s in conv["shapes"]}), 1)
        r["describe_size"] = (int(said_sized == {s.key() for s in conv["shapes"]}), 1)
    return r


def edit_ok(e, dets):
    """The edited picture: the target there (add, move, recolour), the old shape gone
    (remove, move, recolour), every other source shape unchanged, nothing else."""
    before, target = e["before"], e["target"]
    expected = [s for s in e["source"] if s != before] + ([target] if target else [])
    if before is not None and target is not None and before.cell == target.cell:
        gone = at(dets, before.colour, before.cell) is None
    else:
        gone = before is None or at(dets, before.colour, before.cell) is None
    return gone and same_picture(dets, expected)


def add_up(total, r):
    for k, (a, b) in r.items():
        h, n = total.get(k, (0, 0))
        total[k] = (h + a, n + b)
    return total


def main(argv):
    for path in argv[1:]:
        print(path)
        for d in detect(Image.open(path)):
            print("   ", d)


if __name__ == "__main__":
    main(sys.argv)
