"""The engine's interleaved loop in PyTorch, for the training probes and the goldens:
greedy text from the MLLM, and on <BOV> a picture from the connector, the DiT and the VAE
as engine/draw/painter.c draws it (same conditions, frames, noise, sampler and guidance),
fed back into the context as <BOV> <|vision_start|> <|image_pad|>*9 <|vision_end|>.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import conversations
import flow
import models

MAX_TOKENS = 200


def prompt_ids(codec, conv):
    """The prompt's ids and pictures: every segment before the assistant's answer."""
    ids, pictures, vision_end = [], [], []
    for kind, v, trained in conversations.segments(conv):
        if trained:
            break
        if kind == "text":
            ids += codec.text(v)
        else:
            ids += [codec.vs] + [codec.pad] * conversations.IMAGE_TOKENS + [codec.ve]
            vision_end.append(len(ids) - 1)
            pictures.append(v)
    return ids, pictures, vision_end


def mllm_forward(mllm, codec, pixel_fn, ids, pictures, hidden=False):
    """One forward over a whole sequence (no cache): logits [n, V] and, with hidden, HF's
    hidden_states tuple. pictures are PIL images or shapes, one per image in ids."""
    x = torch.tensor([ids])
    kw = {"input_ids": x, "attention_mask": torch.ones_like(x), "mm_token_type_ids": (x == codec.pad).int()}
    if pictures:
        kw["pixel_values"] = torch.cat([pixel_fn(p) for p in pictures])
        kw["image_grid_thw"] = torch.tensor([[1, 6, 6]] * len(pictures))
    mllm.model.rope_deltas = None
    out = mllm(**kw, output_hidden_states=hidden, use_cache=False)
    return out.logits[0], out.hidden_states


def answer(mllm, codec, pixel_fn, conv, paint_fn, max_tokens=MAX_TOKENS, max_images=4):
    """Greedy answer to a conversation's user message. paint_fn(ids, pictures, vision_end, k)
    returns the k-th drawn picture (PIL) given the context before its <BOV>. Returns the
    generated token ids (<BOV> included, image tokens not), the text (specials dropped)
    and the drawn pictures."""
    ids, pictures, vision_end = prompt_ids(codec, conv)
    gen, drawn = [], []
    with torch.no_grad():
        while len(gen) < max_tokens:
            logits, _ = mllm_forward(mllm, codec, pixel_fn, ids, pictures)
            row = logits[-1].clone()
            if len(drawn) >= max_images:
                row[codec.bov] = -float("inf")
            t = int(row.argmax())
            gen.append(t)
            if t in (codec.im_end, codec.eot):
                break
            if t == codec.bov:
                pic = paint_fn(ids, pictures, vision_end, len(drawn))
                drawn.append(pic)
                ids = ids + [codec.bov, codec.vs] + [codec.pad] * conversations.IMAGE_TOKENS + [codec.ve]
                vision_end.append(len(ids) - 1)
                pictures.append(pic)
            else:
                ids.append(t)
    text = codec.tok.decode([t for t in gen if t < codec.eot], skip_special_tokens=True)
    return gen, text, drawn


# ---- drawing ----------------------------------------------------------------------------

def to_pixels(picture):
    """PIL picture -> [3, H, W] in [-1, 1] (the painter's rgb_to_pixels)."""
    a = torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32)).to(torch.get_default_device())
    return (a / 127.5 - 1.0).permute(2, 0, 1)


def to_picture(pixels):
    """[3, H, W] in [-1, 1] -> 8-bit PIL picture (the painter's pixels_to_rgb: lrintf)."""
    v = ((pixels.clamp(-1, 1) + 1.0) * 127.5).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.clip(np.rint(v), 0, 255).astype(np.uint8), "RGB")


def context(mllm, codec, pixel_fn, connector, layers, ids, pictures, n_neg):
    """The connector's rows of both branches for a <BOV> after `ids`: positive over every
    position, negative over the first n_neg. [1, n, d_cond] each."""
    _, hs = mllm_forward(mllm, codec, pixel_fn, ids, pictures, hidden=True)
    rows = connector(models.condition_states(hs, layers))
    return rows, rows[:, :n_neg]


def paint(dit, vae, ctx_pos, ctx_neg, conds, seed, index, steps, guidance, shift):
    """One picture as dg_painter draws it: conds are the earlier pictures (PIL, oldest
    first) encoded as clean frames at timestep 1e-4, the target starts from the engine's
    noise stream for (seed, index), UniPC over the painter's schedule, guidance
    v = v_c + g·(v_c − v_u) with the visual conditions in both branches. Returns the 8-bit
    picture and the final latent [z, 12, 12]."""
    z, side = dit.config.out_channels, models.LATENT_SIDE
    with torch.no_grad():
        frames = [models.vae_encode(vae, to_pixels(c)[None])[0] for c in conds]
        x = torch.from_numpy(flow.noise(z * side * side, flow.image_seed(seed, index))).to(
            torch.get_default_device()).view(z, side, side)
        sampler = flow.UniPC(flow.schedule(steps, shift))
        F_ = len(frames) + 1
        is_cond = torch.tensor([[i < len(frames) for i in range(F_)]])
        fmask = torch.ones(1, F_, dtype=torch.bool)
        for _ in range(steps):
            lat = torch.stack(frames + [x])[None]
            ts = torch.tensor([[flow.COND_TIMESTEP] * len(frames) + [sampler.sigma()]])
            v = models.dit_forward(dit, lat, is_cond, ts, fmask, ctx_pos, torch.ones(1, ctx_pos.shape[1], dtype=torch.bool))[0, -1]
            if guidance > 0:
                vu = models.dit_forward(dit, lat, is_cond, ts, fmask, ctx_neg,
                                        torch.ones(1, ctx_neg.shape[1], dtype=torch.bool))[0, -1]
                v = v + guidance * (v - vu)
            x = sampler.step(x, v)
        pic = to_picture(models.vae_decode(vae, x[None])[0])
    return pic, x


def _pad_rows(rows):
    """[n_b, d] tensors -> [B, M, d] and its mask [B, M]."""
    M = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), M, rows[0].shape[-1])
    mask = torch.zeros(len(rows), M, dtype=torch.bool)
    for b, r in enumerate(rows):
        out[b, :r.shape[0]] = r
        mask[b, :r.shape[0]] = True
    return out, mask


def paint_batch(dit, vae, ctx_pos, ctx_neg, conds, seeds, steps, guidance, shift):
    """paint() for several pictures at once (the probes): ctx_pos, ctx_neg lists of
    [n, d_cond] rows, conds a list of earlier-picture lists, seeds a list of (job seed,
    image index). Each picture gets what paint() would give it, up to the summation order
    of batched matrix products."""
    z, side = dit.config.out_channels, models.LATENT_SIDE
    B, F_ = len(conds), 1 + max(len(c) for c in conds)
    bi, targets = torch.arange(B), torch.tensor([len(c) for c in conds])
    with torch.no_grad():
        lat = torch.zeros(B, F_, z, side, side)
        for b, c in enumerate(conds):
            if c:
                lat[b, :len(c)] = models.vae_encode(vae, torch.stack([to_pixels(p) for p in c]))
        frame_mask = torch.arange(F_)[None] <= targets[:, None]
        is_cond = torch.arange(F_)[None] < targets[:, None]
        x = torch.stack([torch.from_numpy(flow.noise(z * side * side, flow.image_seed(s, i))).view(z, side, side)
                         for s, i in seeds]).to(torch.get_default_device())
        sampler = flow.UniPC(flow.schedule(steps, shift))
        pos, pos_mask = _pad_rows(ctx_pos)
        neg, neg_mask = _pad_rows(ctx_neg)
        M = max(pos.shape[1], neg.shape[1])
        ctx = torch.cat([F.pad(pos, (0, 0, 0, M - pos.shape[1])), F.pad(neg, (0, 0, 0, M - neg.shape[1]))])
        ctx_mask = torch.cat([F.pad(pos_mask, (0, M - pos.shape[1])), F.pad(neg_mask, (0, M - neg.shape[1]))])
        for _ in range(steps):
            lat[bi, targets] = x
            ts = torch.where(is_cond, torch.tensor(flow.COND_TIMESTEP), torch.tensor(sampler.sigma()))
            two = lambda t: torch.cat([t, t])  # noqa: E731
            v = models.dit_forward(dit, two(lat), two(is_cond), two(ts), two(frame_mask), ctx, ctx_mask)
            v_c, v_u = v[:B][bi, targets], v[B:][bi, targets]
            x = sampler.step(x, v_c + guidance * (v_c - v_u) if guidance > 0 else v_c)
        pix = models.vae_decode(vae, x)
    return [to_picture(p) for p in pix]
