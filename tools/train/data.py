"""Training batches: conversations as token ids with their pictures, as the engine feeds
them (conversations.segments), and the pieces of each drawn picture's DiT sample.

For the MLLM (stage 1): ids, next-token labels on what the assistant says (its text,
<BOV>, <|im_end|>), and every picture of the conversation through the vision tower
(user pictures as <|vision_start|> <|image_pad|>*9 <|vision_end|>, drawn ones with
<BOV> before that).

For the DiT (stage 2), per drawn picture j of a conversation, what the engine's painter
gets at its <BOV> (engine/sched.c draw_begin):
  n_pos   the positions before <BOV>: the semantic condition
  n_neg   the negative condition: the positions up to and including the <|vision_end|>
          of the most recent earlier picture, or only the first position when there is
          none (the last text segment dropped)
  conds   every earlier picture of the conversation, oldest first: condition frames
"""
import torch

import conversations
import world


class Tokenized:
    """One conversation as ids, labels and pictures."""

    def __init__(self, ids, labels, pictures, vision_end, bov):
        self.ids = ids              # [n] token ids
        self.labels = labels        # [n] the id to predict at each position, or -100
        self.pictures = pictures    # [k] shapes of every picture, in order
        self.vision_end = vision_end  # [k] index of each picture's <|vision_end|>
        self.bov = bov              # {picture index: index of its <BOV>} for drawn pictures


class Codec:
    """Tokenizes conversations with the package's tokenizer (transformers' Qwen2Tokenizer
    over our vocab.json and merges.txt, which the engine reads identically)."""

    def __init__(self, tok):
        self.tok = tok
        self.bov = tok.convert_tokens_to_ids("<BOV>")
        self.vs = tok.convert_tokens_to_ids("<|vision_start|>")
        self.ve = tok.convert_tokens_to_ids("<|vision_end|>")
        self.pad = tok.convert_tokens_to_ids("<|image_pad|>")
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        self.eot = tok.convert_tokens_to_ids("<|endoftext|>")
        self._cache = {}

    def text(self, s):
        if s not in self._cache:
            self._cache[s] = self.tok(s, add_special_tokens=False)["input_ids"]
        return self._cache[s]

    def encode(self, conv):
        ids, loss, pictures, vision_end, bov = [], [], [], [], {}
        for kind, v, trained in conversations.segments(conv):
            if kind == "text":
                piece = self.text(v)
            elif kind == "bov":
                bov[len(pictures)] = len(ids)
                piece = [self.bov]
            else:
                piece = [self.vs] + [self.pad] * conversations.IMAGE_TOKENS + [self.ve]
                vision_end.append(len(ids) + len(piece) - 1)
                pictures.append(v)
            ids += piece
            loss += [trained] * len(piece)
        labels = [ids[i + 1] if i + 1 < len(ids) and loss[i + 1] else -100 for i in range(len(ids))]
        return Tokenized(ids, labels, pictures, vision_end, bov)


class Pixels:
    """pixel_values of pictures through the reference image processor: a PIL picture, or
    shapes to render (cached by the shapes: a picture recurs across a step answer)."""

    def __init__(self, processor):
        self.proc = processor
        self.cache = {}

    def __call__(self, shapes):
        if hasattr(shapes, "convert"):
            return self.proc(images=[shapes.convert("RGB")], return_tensors="pt")["pixel_values"].to(
                torch.get_default_device())
        key = tuple(sorted(s.key() for s in shapes))
        if key not in self.cache:
            if len(self.cache) > 20000:
                self.cache.clear()
            self.cache[key] = self.proc(images=[world.render(shapes)], return_tensors="pt")["pixel_values"].to(
                torch.get_default_device())
        return self.cache[key]


def mllm_batch(codec, pixels, tokenized, cut=None):
    """A right-padded batch for Qwen2_5_VLForConditionalGeneration: input_ids, attention_mask,
    labels, mm_token_type_ids, pixel_values, image_grid_thw. cut[b], when given, keeps only
    the first cut[b] positions of sample b (and the pictures inside them)."""
    seqs = []
    for b, t in enumerate(tokenized):
        n = len(t.ids) if cut is None else cut[b]
        seqs.append((t.ids[:n], t.labels[:n], [p for p, e in zip(t.pictures, t.vision_end) if e < n]))
    T = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), T), codec.eot, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    pv = []
    for b, (i, l, pics) in enumerate(seqs):
        ids[b, :len(i)] = torch.tensor(i)
        labels[b, :len(l)] = torch.tensor(l)
        mask[b, :len(i)] = 1
        pv += [pixels(p) for p in pics]
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == codec.pad).int()}
    if pv:
        out["pixel_values"] = torch.cat(pv)
        out["image_grid_thw"] = torch.tensor([[1, 6, 6]] * len(pv))
    return out, labels


N_CELL_CLASSES = 1 + len(world.COLOUR_NAMES) * len(world.KINDS) * len(world.SIZE_NAMES)


def cell_labels(shapes):
    """What each of a picture's 9 merged vision tokens (one per cell, raster order) holds:
    0 for nothing, else 1 + (colour, kind, size) index. [9]"""
    out = [0] * 9
    for s in shapes:
        out[s.cell] = 1 + (world.COLOUR_NAMES.index(s.colour) * len(world.KINDS) + world.KINDS.index(s.kind)) * \
            len(world.SIZE_NAMES) + world.SIZE_NAMES.index(s.size)
    return out


class DrawSample:
    """One drawn picture's DiT sample: the conversation up to its <BOV>."""

    def __init__(self, t, j):
        self.tokenized = t
        self.target = t.pictures[j]
        self.conds = t.pictures[:j]
        self.n_pos = t.bov[j]
        self.n_neg = t.vision_end[j - 1] + 1 if j > 0 else 1


def draw_samples(t, rng):
    """A random drawn picture of a tokenized conversation, or None when it draws none."""
    drawn = sorted(t.bov)
    return DrawSample(t, rng.choice(drawn)) if drawn else None
