"""The world of shapes: what a picture can hold, how it is drawn, and what is held out.

A picture is 96x96 RGB on a white background, cut into a 3x3 grid of 32-pixel cells (the
nine named places). Each cell holds at most one shape: a circle, a square or a triangle, in
one of six named colours and one of two sizes, centred in its cell. 96 pixels is chosen so
that the grid lines up with every tokenisation of the picture:

  - the Qwen2.5-VL preprocessor's smart_resize turns 96x96 into 84x84: 3x3 merged vision
    tokens of 28 pixels, one per cell;
  - the VAE's 8x downsampling and the DiT's 2x2 patches give 6x6 DiT tokens, 2x2 per cell.

Held out for evaluation only: for each (colour, shape) pair one place (18 of the 162
colour-shape-place triples, each place twice). No training picture ever holds a shape of a
held-out triple; evaluation conversations ask for them.

Only Python 3, Pillow and numpy: the scorer and the evaluation import this module without
PyTorch.
"""
import random

from PIL import Image, ImageDraw

SIDE = 96                      # picture side in pixels
CELL = SIDE // 3               # 32: one grid cell
BACKGROUND = (255, 255, 255)

COLOURS = {                    # name -> RGB; far apart so that a pixel's nearest colour is clear
    "red": (210, 30, 30),
    "orange": (255, 125, 0),
    "yellow": (235, 215, 0),
    "green": (30, 160, 50),
    "blue": (30, 80, 230),
    "purple": (150, 50, 200),
}
COLOUR_NAMES = list(COLOURS)
KINDS = ["circle", "square", "triangle"]
SIZES = {"large": 26, "small": 14}    # the shape's width and height in pixels
SIZE_NAMES = list(SIZES)

# cells in reading order (row-major); the canonical name the assistant always uses
PLACES = ["top left", "top center", "top right",
          "middle left", "center", "middle right",
          "bottom left", "bottom center", "bottom right"]


def place_phrase(cell):
    """The assistant's canonical phrase for a cell: 'in the top left', 'in the center'."""
    return "in the " + PLACES[cell]


class Shape:
    """One shape of a picture: kind, colour, size (names) and cell (0..8, row-major)."""

    __slots__ = ("kind", "colour", "size", "cell")

    def __init__(self, kind, colour, size, cell):
        self.kind, self.colour, self.size, self.cell = kind, colour, size, cell

    def key(self):
        return (self.kind, self.colour, self.size, self.cell)

    def triple(self):
        return (self.colour, self.kind, self.cell)

    def noun(self):
        """'large red circle'"""
        return f"{self.size} {self.colour} {self.kind}"

    def phrase(self):
        """'a large red circle in the top left' (the canonical form)"""
        return f"a {self.noun()} {place_phrase(self.cell)}"

    def moved(self, cell):
        return Shape(self.kind, self.colour, self.size, cell)

    def recoloured(self, colour):
        return Shape(self.kind, colour, self.size, self.cell)

    def __repr__(self):
        return f"Shape({self.kind!r}, {self.colour!r}, {self.size!r}, {self.cell})"

    def __eq__(self, other):
        return isinstance(other, Shape) and self.key() == other.key()

    def __hash__(self):
        return hash(self.key())


def held_out_triples():
    """The (colour, kind, cell) triples kept for evaluation: pair k = 3·colour + kind gets
    cell k mod 9, so every cell is held out twice and every colour and kind keeps 8 of its
    9 places for training."""
    out = set()
    for c, colour in enumerate(COLOUR_NAMES):
        for s, kind in enumerate(KINDS):
            out.add((colour, kind, (3 * c + s) % 9))
    return out


HELD_OUT = held_out_triples()


def render(shapes):
    """The picture of a list of shapes: a 96x96 RGB PIL image. Edges are not antialiased,
    so every pixel is the background or exactly one shape's colour."""
    img = Image.new("RGB", (SIDE, SIDE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for s in shapes:
        cx = (s.cell % 3) * CELL + CELL // 2
        cy = (s.cell // 3) * CELL + CELL // 2
        half = SIZES[s.size] // 2
        box = (cx - half, cy - half, cx + half - 1, cy + half - 1)
        rgb = COLOURS[s.colour]
        if s.kind == "circle":
            d.ellipse(box, fill=rgb)
        elif s.kind == "square":
            d.rectangle(box, fill=rgb)
        else:   # apex up, base at the bottom: fill ratio 1/2 of its box
            d.polygon([(cx - 0.5, cy - half), (cx - half, cy + half - 1), (cx + half - 1, cy + half - 1)], fill=rgb)
    return img


def random_shape(rng, cell, allow_held_out, avoid=()):
    """A shape in `cell` with random kind, colour and size; never a held-out triple unless
    allowed, never one whose (colour, kind) is in `avoid` (so references stay unique)."""
    while True:
        s = Shape(rng.choice(KINDS), rng.choice(COLOUR_NAMES), rng.choice(SIZE_NAMES), cell)
        if (allow_held_out or s.triple() not in HELD_OUT) and (s.colour, s.kind) not in avoid:
            return s


def random_scene(rng, n, allow_held_out=False, cells=None):
    """n shapes in distinct random cells, with distinct (colour, kind) pairs so that 'the red
    circle' names exactly one of them."""
    cells = cells if cells is not None else rng.sample(range(9), n)
    shapes = []
    for cell in cells:
        shapes.append(random_shape(rng, cell, allow_held_out, {(s.colour, s.kind) for s in shapes}))
    return shapes


def sorted_shapes(shapes):
    """Reading order: by cell."""
    return sorted(shapes, key=lambda s: s.cell)


def rng_for(seed, index, salt):
    """The generator of item `index` of a stream: items can be made in any order, alone."""
    return random.Random(f"{salt}:{seed}:{index}")
