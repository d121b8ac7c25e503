"""Conversations about the world of shapes, in the Qwen2.5-VL chat format.

Five kinds, each from templates with varied wording (TEMPLATES), deterministic by seed:

  draw      "Draw a large red circle in the top left."  -> a sentence, <BOV>, the picture
  step      "Show me step by step how to draw A, B and C." -> "Step 1: A." <BOV> picture 1,
            "Step 2: add B." <BOV> picture 2, ...; each picture is the previous plus one shape
  edit      [picture] "Move the red circle to the center." -> a sentence, <BOV>, the edited
            picture (add, remove, move or recolour one shape)
  describe  [picture] "What is in this picture?" -> a sentence naming every shape, colour and
            place; no picture
  talk      "What colours can you use?" -> text; no picture

The user's wording varies (sizes said or not, several phrasings of each place, request
frames); the assistant always names every shape it draws in the canonical form
world.Shape.phrase(), "a large red circle in the top left", so that its sentence before
<BOV> tells the DiT everything about the new shape, and descriptions can be scored by
reading them back (parse_shapes).

Splits: "train" uses the training request frames and never a held-out triple (world.py);
"eval" uses only the held-out frames, and about half of its pictures ask for a held-out
triple. Each frame list's words all appear in the training frames, so a held-out frame is
a new combination, not a new word.

A conversation is a dict:
  kind       one of KINDS
  user       [("image", shapes) | ("text", str)]      the user's message (image first)
  assistant  [("text", str) | ("image", shapes)]      the answer; each image follows <BOV>
  images     [shapes, ...]    the pictures the answer should hold, in order
  new        [[Shape], ...]   per picture, the shapes it is asked to add or change
  edit       for edits: {"op", "before", "target"} (the shape before and after the edit)
"""
import re

import world
from world import PLACES, Shape

KINDS = ["draw", "step", "edit", "describe", "talk"]

# ---- how the user names things ------------------------------------------------------------

SIZE_WORDS = {"large": ["large", "big"], "small": ["small", "little"]}

# per cell: "in"/"at"/"on" phrases; "to" phrases for moves are made from them
PLACE_WORDS = [
    ["in the top left", "at the top left", "in the top left corner", "in the upper left corner"],
    ["at the top", "in the top center", "at the top center", "in the top middle"],
    ["in the top right", "at the top right", "in the top right corner", "in the upper right corner"],
    ["on the left", "in the middle left", "at the left", "on the left side"],
    ["in the center", "in the middle", "at the center", "in the centre"],
    ["on the right", "in the middle right", "at the right", "on the right side"],
    ["in the bottom left", "at the bottom left", "in the bottom left corner", "in the lower left corner"],
    ["at the bottom", "in the bottom center", "at the bottom center", "in the bottom middle"],
    ["in the bottom right", "at the bottom right", "in the bottom right corner", "in the lower right corner"],
]


def to_place(phrase):
    """'in the top left' -> 'to the top left' (the target of a move)."""
    return "to" + phrase[phrase.index(" "):]


# ---- request frames: {"train": [...], "eval": [...]} per request --------------------------

TEMPLATES = {
    "draw": {
        "train": ["Draw {obj}.", "Please draw {obj}.", "Can you draw {obj}?", "Paint {obj}.",
                  "Could you paint {obj}?", "Make a picture of {obj}.", "Show me a picture of {obj}.",
                  "I would like a picture of {obj}.", "Sketch {obj} for me.", "Draw me {obj}.",
                  "Create an image with {obj}.", "Put {obj} on a picture."],
        "eval": ["Could you draw {obj} for me?", "Please paint {obj}.", "Make an image of {obj}.",
                 "Can you sketch {obj}?"],
    },
    "step": {
        "train": ["Show me step by step how to draw {list}.", "Draw {list} step by step.",
                  "Step by step, build a scene with {list}.", "Build a picture with {list}, one shape at a time.",
                  "Draw {list}, one shape at a time.", "Can you show me step by step how to make {list}?",
                  "Walk me through drawing {list}."],
        "eval": ["Show me step by step how to make a picture with {list}.", "One shape at a time, draw {list}.",
                 "Can you build {list} step by step?"],
    },
    "add": {
        "train": ["Add {obj}.", "Please add {obj}.", "Put {obj} in the picture.", "Can you add {obj}?",
                  "Now add {obj} to it."],
        "eval": ["Could you add {obj} to the picture?", "Please put {obj} in it."],
    },
    "remove": {
        "train": ["Remove {ref}.", "Take away {ref}.", "Please remove {ref}.", "Delete {ref}.",
                  "Can you take away {ref}?"],
        "eval": ["Could you remove {ref}?", "Please delete {ref}."],
    },
    "move": {
        "train": ["Move {ref} {to}.", "Please move {ref} {to}.", "Put {ref} {to} instead.",
                  "Can you put {ref} {to}?"],
        "eval": ["Can you move {ref} {to}?", "Please put {ref} {to}."],
    },
    "recolour": {
        "train": ["Make {ref} {colour}.", "Change {ref} to {colour}.", "Paint {ref} {colour}.",
                  "Change the colour of {ref} to {colour}.", "Can you make {ref} {colour}?"],
        "eval": ["Please make {ref} {colour}.", "Could you change the colour of {ref} to {colour}?"],
    },
    "describe": {
        "train": ["What is in this picture?", "Describe this picture.", "What do you see?",
                  "Which shapes are in the image?", "Tell me what this picture shows.", "List the shapes you see."],
        "eval": ["What do you see in this picture?", "Describe the image.", "Which shapes do you see?"],
    },
}

# talk: (train questions, eval questions, answer); {kind} questions are asked per shape kind
SIDES = {"circle": "A circle has no sides: it is round.", "square": "A square has four sides.",
         "triangle": "A triangle has three sides."}
CORNERS = {"circle": "A circle has no corners: it is round.", "square": "A square has four corners.",
           "triangle": "A triangle has three corners."}
ROUND = {"circle": "Yes, a circle is round.", "square": "No, a square is not round.",
         "triangle": "No, a triangle is not round."}
TALK = [
    (["What shapes can you draw?", "Which shapes can you draw?", "What shapes can you make?",
      "Which shapes do you draw?", "Tell me the shapes you know."],
     ["What shapes do you know?", "Which shapes can you make?"], "I can draw circles, squares and triangles."),
    (["What colours can you use?", "Which colours do you know?", "What colours do you have?",
      "Tell me the colours you can use."],
     ["What colours do you know?", "Which colours can you use?"], "I can use red, orange, yellow, green, blue and purple."),
    (["What sizes can a shape have?", "How big can shapes be?", "Which sizes are there?", "How big can a shape be?"],
     ["Which sizes can a shape have?", "What sizes are there?"], "A shape can be large or small."),
    (["Where can you put a shape?", "Which places are there?", "Where can shapes go?", "Where can a shape be?",
      "What places can a shape have?"],
     ["Where can a shape go?", "Which places can a shape have?"],
     "There are nine places: " + ", ".join(PLACES[:-1]) + " and " + PLACES[-1] + "."),
    (["Hello!", "Hi there!", "Good morning!", "Hi!"], ["Hello there!", "Good morning there!"],
     "Hello! Ask me to draw circles, squares and triangles in six colours."),
    (["What can you do?", "What do you do?", "What can you do for me?"], ["What do you do for me?"],
     "I draw pictures of shapes, change them and describe them."),
    (["Thank you!", "Thanks a lot!", "Thank you very much!"], ["Thanks!", "Thank you a lot!"], "You are welcome!"),
    (["How many shapes fit in one picture?", "How many shapes can a picture have?", "How many shapes fit in a picture?"],
     ["How many shapes can one picture have?"], "Up to nine: one in each place."),
    (["How many sides does a {kind} have?", "How many sides has a {kind}?"], ["How many sides does the {kind} have?"],
     SIDES),
    (["How many corners has a {kind}?", "How many corners does a {kind} have?"], ["How many corners has the {kind}?"],
     CORNERS),
    (["Is a {kind} round?", "Is a {kind} a round shape?"], ["Is the {kind} round?"], ROUND),
    (["What is the difference between a square and a triangle?", "How is a square different from a triangle?"],
     ["What is the difference between a triangle and a square?"],
     "A square has four sides and a triangle has three."),
]

NUMBERS = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ---- the user's phrases -------------------------------------------------------------------

def user_obj(rng, s, sized=None):
    """How the user asks for a shape: size said or not (the assistant then picks), any
    phrasing of its place. 'a big red circle in the upper left corner'. A shape whose size
    was said joins the list `sized` (the scorer judges size only there)."""
    said = rng.random() < 0.7
    words = f"{rng.choice(SIZE_WORDS[s.size])} {s.colour}" if said else s.colour
    if said and sized is not None:
        sized.append(s)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {s.kind} {rng.choice(PLACE_WORDS[s.cell])}"


def user_list(rng, shapes, sized=None):
    objs = [user_obj(rng, s, sized) for s in shapes]
    return objs[0] if len(objs) == 1 else ", ".join(objs[:-1]) + " and " + objs[-1]


def user_ref(rng, s, scene):
    """A phrase that names s uniquely among scene: by colour and kind, by kind or colour
    alone when unique, or by its place."""
    options = [f"the {s.colour} {s.kind}"]
    if sum(t.kind == s.kind for t in scene) == 1:
        options.append(f"the {s.kind}")
    if sum(t.colour == s.colour for t in scene) == 1:
        options.append(f"the {s.colour} shape")
    options.append(f"the {s.kind} {rng.choice(PLACE_WORDS[s.cell])}")
    return rng.choice(options)


def list_phrase(shapes):
    """'a large red circle in the top left, a ... and a ...' (canonical)"""
    p = [s.phrase() for s in shapes]
    return p[0] if len(p) == 1 else ", ".join(p[:-1]) + " and " + p[-1]


# ---- the five kinds -----------------------------------------------------------------------

# ---- compositional request frames (split "train2") ---------------------------------------
#
# The continuation stages (mllm2, dit2) train on requests built as a wrapper around a verb
# phrase ("Could you {x}?" around "add {obj} to the picture"), every wrapper with every
# phrase of its kind, so that the model learns that the verb phrase alone decides what is
# asked and the wrapper is only politeness. The held-out frames (TEMPLATES[...]["eval"])
# are some of these combinations and are left out of train2: every one of their wrappers
# and phrases is trained, in other pairings, never together (checked by frames2()).

POLITE = ["{X}.", "Please {x}.", "Can you {x}?", "Could you {x}?", "Would you {x}?", "I want you to {x}.",
          "Now {x}."]
FOR_ME = POLITE + ["{X} for me.", "Please {x} for me.", "Can you {x} for me?", "Could you {x} for me?"]
STEPWISE = ["{X} step by step.", "Step by step, {x}.", "{X}, one shape at a time.", "One shape at a time, {x}.",
            "Can you {x} step by step?", "Please {x} step by step.", "Could you {x} one shape at a time?",
            "Show me step by step how to {x}.", "Can you show me step by step how to {x}?"]
COMPOSED = {
    "draw": [(FOR_ME, ["draw {obj}", "paint {obj}", "sketch {obj}", "make a picture of {obj}", "make an image of {obj}",
                       "show me a picture of {obj}", "create an image with {obj}", "draw me {obj}",
                       "put {obj} on a picture"]),
             (["I would like a picture of {obj}.", "I want a picture of {obj}."], [""])],
    "step": [(STEPWISE, ["draw {list}", "build a scene with {list}", "make a picture with {list}", "build {list}",
                         "build a picture with {list}", "make {list}", "paint {list}"]),
             (["Walk me through drawing {list}.", "Walk me through making {list}."], [""])],
    "add": [(POLITE, ["add {obj}", "add {obj} to the picture", "add {obj} to it", "put {obj} in the picture",
                      "put {obj} in it", "also draw {obj}", "include {obj}"])],
    "remove": [(POLITE, ["remove {ref}", "take away {ref}", "delete {ref}", "erase {ref}", "get rid of {ref}",
                         "remove {ref} from the picture", "take out {ref}"])],
    "move": [(POLITE, ["move {ref} {to}", "put {ref} {to}", "put {ref} {to} instead", "shift {ref} {to}",
                       "place {ref} {to}"])],
    "recolour": [(POLITE, ["make {ref} {colour}", "change {ref} to {colour}", "paint {ref} {colour}",
                           "change the colour of {ref} to {colour}", "colour {ref} {colour}", "turn {ref} {colour}"])],
    "describe": [(["{X}.", "Please {x}.", "Can you {x}?", "Could you {x}?"],
                  ["describe this picture", "describe the image", "tell me what this picture shows",
                   "list the shapes you see", "tell me what is in the image", "name the shapes in this picture"]),
                 (["What do you see{t}?", "What can you see{t}?", "Which shapes do you see{t}?",
                   "What shapes do you see{t}?"], ["", " in this picture", " in the image", " here"]),
                 (["What is{t}?", "Which shapes are{t}?", "What shapes are{t}?"],
                  [" in this picture", " in the image", " here"])],
}


def _compose(wrapper, phrase):
    if "{t}" in wrapper:
        return wrapper.replace("{t}", phrase)
    if not phrase:
        return wrapper
    return wrapper.replace("{X}", phrase[0].upper() + phrase[1:]).replace("{x}", phrase)


_FRAMES2 = {}


def frames2(key):
    """The train2 frames of a request kind: every wrapper with every phrase of its group,
    less the held-out frames, each of which must be such a combination."""
    if key not in _FRAMES2:
        every = [_compose(w, p) for wrappers, phrases in COMPOSED[key] for w in wrappers for p in phrases]
        held = TEMPLATES[key]["eval"]
        missing = [f for f in held if f not in every]
        assert not missing, f"held-out {key} frames not composed of trained parts: {missing}"
        _FRAMES2[key] = [f for f in every if f not in held]
    return _FRAMES2[key]


def pick(rng, split, key):
    if split == "train2":
        return rng.choice(frames2(key))
    return rng.choice(TEMPLATES[key][split])


def make_draw(rng, split):
    n = 1 if rng.random() < 0.7 else 2
    shapes = world.random_scene(rng, n)
    if split == "eval" and rng.random() < 0.5:
        held_out_first(rng, shapes)
    sized = []
    obj = user_list(rng, shapes, sized)
    text = pick(rng, split, "draw").format(obj=obj)
    lead = rng.choice(["Here is {}.", "Sure! Here is {}.", "This is {}."]) if n == 1 else \
        rng.choice(["Here are {}.", "Sure! Here are {}."])
    return {"kind": "draw", "user": [("text", text)],
            "assistant": [("text", lead.format(list_phrase(shapes))), ("image", shapes)],
            "images": [shapes], "new": [shapes], "sized": sized}


def held_out_first(rng, shapes):
    """Eval: one shape of the scene becomes a held-out triple of its cell (its colour and
    kind not used by another shape), when there is one."""
    for k in rng.sample(range(len(shapes)), len(shapes)):
        others = {(s.colour, s.kind) for i, s in enumerate(shapes) if i != k}
        options = sorted(t for t in world.HELD_OUT if t[2] == shapes[k].cell and t[:2] not in others)
        if options:
            colour, kind, cell = rng.choice(options)
            shapes[k] = Shape(kind, colour, rng.choice(world.SIZE_NAMES), cell)
            return


def make_step(rng, split):
    n = rng.choice([2, 3])
    shapes = world.random_scene(rng, n)
    if split == "eval" and rng.random() < 0.5:
        held_out_first(rng, shapes)
    sized = []
    text = pick(rng, split, "step").format(list=user_list(rng, shapes, sized))
    parts, images, new = [], [], []
    for k, s in enumerate(shapes):
        parts.append(("text", f"Step {k + 1}: {s.phrase()}." if k == 0 else f"Step {k + 1}: add {s.phrase()}."))
        parts.append(("image", shapes[:k + 1]))
        images.append(shapes[:k + 1])
        new.append([s])
    return {"kind": "step", "user": [("text", text)], "assistant": parts, "images": images, "new": new,
            "sized": sized}


def make_edit(rng, split):
    op = rng.choice(["add", "remove", "move", "recolour"])
    scene = world.random_scene(rng, rng.choice([1, 2, 3]))
    free = [c for c in range(9) if all(s.cell != c for s in scene)]
    # train: the result never holds a held-out triple; eval: half the time it does
    want_held = split == "eval" and rng.random() < 0.5

    def allowed(s):
        held = s.triple() in world.HELD_OUT
        return held if want_held else not held or split == "eval"

    if op == "add":
        pairs = {(s.colour, s.kind) for s in scene}
        options = [world.random_shape(rng, c, split == "eval", pairs) for c in free for _ in range(8)]
        target = rng.choice([s for s in options if allowed(s)] or [s for s in options if s.triple() not in world.HELD_OUT])
        before, after = None, scene + [target]
        sized = []
        request = pick(rng, split, "add").format(obj=user_obj(rng, target, sized))
        answer = f"I added {target.phrase()}."
    else:
        before = rng.choice(scene)
        rest = [s for s in scene if s is not before]
        sized = [] if op == "remove" else None   # a moved or recoloured shape keeps its size
        ref = user_ref(rng, before, scene)
        if op == "remove":
            target, after = None, rest
            request = pick(rng, split, "remove").format(ref=ref)
            answer = f"I removed the {before.noun()} from the {PLACES[before.cell]}."
        elif op == "move":
            options = [before.moved(c) for c in free]
            target = rng.choice([s for s in options if allowed(s)] or
                                [s for s in options if s.triple() not in world.HELD_OUT])
            after = rest + [target]
            request = pick(rng, split, "move").format(ref=ref, to=to_place(rng.choice(PLACE_WORDS[target.cell])))
            answer = f"I moved the {before.noun()} from the {PLACES[before.cell]} to the {PLACES[target.cell]}."
        else:
            others = {(s.colour, s.kind) for s in rest}
            options = [before.recoloured(c) for c in world.COLOUR_NAMES
                       if c != before.colour and (c, before.kind) not in others]
            target = rng.choice([s for s in options if allowed(s)] or
                                [s for s in options if s.triple() not in world.HELD_OUT])
            after = rest + [target]
            request = pick(rng, split, "recolour").format(ref=ref, colour=target.colour)
            answer = f"I made the {before.noun()} in the {PLACES[before.cell]} {target.colour}."
    after = world.sorted_shapes(after)
    return {"kind": "edit", "user": [("image", world.sorted_shapes(scene)), ("text", request)],
            "assistant": [("text", answer), ("image", after)], "images": [after],
            "new": [[target] if target else []], "sized": sized if sized is not None else [target],
            "edit": {"op": op, "before": before, "target": target, "source": world.sorted_shapes(scene)}}


def describe_text(rng, shapes):
    shapes = world.sorted_shapes(shapes)
    n = len(shapes)
    noun = "shape" if n == 1 else "shapes"
    lead = rng.choice([f"I see {NUMBERS[n]} {noun}: ", f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} {noun}: "])
    return lead + list_phrase(shapes) + "."


def make_describe(rng, split):
    n = rng.choice([1, 2, 3, 4])
    scene = world.random_scene(rng, n)
    if split == "eval" and rng.random() < 0.5:
        held_out_first(rng, scene)
    scene = world.sorted_shapes(scene)
    return {"kind": "describe", "user": [("image", scene), ("text", pick(rng, split, "describe"))],
            "assistant": [("text", describe_text(rng, scene))], "images": [], "new": [], "shapes": scene}


def make_talk(rng, split):
    while True:
        train_q, eval_q, answer = rng.choice(TALK)
        qs = eval_q if split == "eval" else train_q
        if qs:
            break
    q = rng.choice(qs)
    if "{kind}" in q:
        kind = rng.choice(world.KINDS)
        q, answer = q.format(kind=kind), answer[kind]
    return {"kind": "talk", "user": [("text", q)], "assistant": [("text", answer)], "images": [], "new": []}


MAKERS = {"draw": make_draw, "step": make_step, "edit": make_edit, "describe": make_describe, "talk": make_talk}
# the MLLM's mixture: reading pictures (describe, edit) is the hard part; the DiT's stage
# draws from draw, step and edit alone
MIX = {"draw": 0.2, "step": 0.2, "edit": 0.25, "describe": 0.25, "talk": 0.10}
# train2 (the continuation) leans further to what stage 1 left weakest: steps, edits, descriptions
MIX2 = {"draw": 0.15, "step": 0.25, "edit": 0.27, "describe": 0.28, "talk": 0.05}
# mllm3 (train.py) leans to descriptions, the one goal the MLLM missed after mllm2
MIX3 = {"draw": 0.1, "step": 0.15, "edit": 0.2, "describe": 0.45, "talk": 0.1}


def make(seed, index, split, kind=None, mix=None):
    """Conversation `index` of the stream (seed, split); kind drawn from `mix` (MIX, or MIX2
    for train2, unless given) unless given."""
    rng = world.rng_for(seed, index, split)
    if kind is None:
        r, acc = rng.random(), 0.0
        for kind, p in (mix or (MIX2 if split == "train2" else MIX)).items():
            acc += p
            if r < acc:
                break
    return MAKERS[kind](rng, split)


# ---- the chat format ----------------------------------------------------------------------

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_TOKENS = 9   # 96x96 -> 84x84 -> 3x3 merged vision tokens


def segments(conv):
    """The conversation as the engine sees it, in pieces: (kind, payload, loss) with kind
    'text' (a string, specials allowed), 'image' (shapes: <|vision_start|> <|image_pad|>*9
    <|vision_end|>, fed, never predicted) or 'bov'. loss marks what the assistant says:
    its text, <BOV> and the closing <|im_end|>. The prompt is what dg_chat_encode renders
    for the user message with add_generation_prompt."""
    out = [("text", SYSTEM + "<|im_start|>user\n", False)]
    for kind, v in conv["user"]:
        out.append(("image", v, False) if kind == "image" else ("text", v, False))
    out.append(("text", "<|im_end|>\n<|im_start|>assistant\n", False))
    for kind, v in conv["assistant"]:
        if kind == "image":
            out.append(("bov", None, True))
            out.append(("image", v, False))
        else:
            out.append(("text", v, True))
    out.append(("text", "<|im_end|>", True))
    return out


# ---- reading text back --------------------------------------------------------------------

SHAPE_RE = re.compile(r"\ban? (large|small) (%s) (circle|square|triangle) in the (%s)\b"
                      % ("|".join(world.COLOUR_NAMES), "|".join(sorted(PLACES, key=len, reverse=True))))


def parse_shapes(text):
    """Every canonical shape phrase in a text, as Shapes."""
    return [Shape(m.group(3), m.group(2), m.group(1), PLACES.index(m.group(4))) for m in SHAPE_RE.finditer(text)]
