#!/usr/bin/env python3
"""Trains the shapes model, stage by stage, the paper's recipe (duogen_paper.md):

  tokenizer  a byte-level BPE over the training split's text (tokenizer.py); the mllm/
             folder's config.json and side files
  vae        the Wan2.1 VAE alone, reconstruction on pictures of the world, plus the
             coordinate channels (models.py); then the latents' per-channel statistics
  mllm       stage 1: the Qwen2.5-VL decoder and vision tower, next-token loss on what the
             assistant says (<BOV> included); at the end the weights are rounded to bf16,
             as they ship, so that stage 2 conditions on exactly the shipped model's states
  dit        stage 2: the MLLM and the VAE frozen; the connector and the DiT trained with
             flow matching on each drawn picture, conditioned on the hidden states before
             its <BOV> and on every earlier picture as a clean condition frame; with
             probability P_UNCOND the condition is the engine's CFG negative instead (the
             last text segment dropped), so that guidance works; an EMA of the weights
  mllm2      the continuation of stage 1 from its bf16 weights, on the compositional
             request frames (conversations.COMPOSED, split "train2"), rounded to bf16 again
  dit2       the continuation of stage 2 from its EMA weights, conditioned on mllm2's states,
             its pictures leaning to edits (DIT_KINDS)
  dit3       dit2 continued from its weights as they ship (bf16), with the VAE as it ships,
             on noise levels shifted as the sampler shifts them (SIGMA_SHIFT): stages dit
             and dit2 drew sigma = sigmoid(N(0.3, 1)), 3% of it above 0.9, where the
             sampler's first steps decide the layout; shifted by 3, 21%
  mllm3      mllm2 continued from its bf16 weights on train2 conversations it did not read,
             leaning to descriptions (MLLM_MIX), without the cell probe; rounded to bf16
  dit4       dit3 continued as it ships, conditioned on mllm3's states (which moved), shifted
  export     the package (export.py): mllm3, dit4, the VAE

Every stage is deterministic with the seed (the data of step k come from (seed, k); the
noise from a generator seeded by (seed, stage, k)), logs its losses to WORK/train.log,
checkpoints to WORK/<stage>.pt every few minutes and resumes from there when run again;
a finished stage is skipped. What a stage ran with (its plan, the seed, the device, this
folder's code, the earlier stages' records) is recorded in WORK/stamps/<stage>.json when it
starts; a work folder holding a stage's output or checkpoint from anything else is
refused, not reused (a smoke test's 100-step VAE, a DiT of another plan). Every PROBE steps a stage measures itself on held-out
conversations with the scorer (score.py).

    tools/train/.venv/bin/python tools/train/train.py --work build/train [--stage all]

--from-package DIR starts from a package this script exported instead of from nothing: its
files are unpacked into an empty work folder as the outputs of the stages up to
--package-as (dit2 or dit3: its DiT and connector as that stage's, its MLLM as mllm2's;
export.read_package), and only the later stages and the export run; run it again with the
same package and folder to resume. What those stages read of them is what they read in a
whole run (each starts from the weights rounded as they ship), so given the package of the
dit2 (or dit3) a whole run made, the two ways train the same weights on the same machine.
The shipped model was trained so from the packages before it (shapes/MODEL.md says which).
"""
import argparse
import glob
import hashlib
import json
import os
import platform
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conversations  # noqa: E402
import data  # noqa: E402
import flow  # noqa: E402
import models  # noqa: E402
import pipeline  # noqa: E402
import score  # noqa: E402
import tokenizer  # noqa: E402
import world  # noqa: E402

# per stage: steps, batch, peak learning rate, warm-up steps, probe interval, PyTorch threads
# (the committed run's: a thread count can change the order of PyTorch's sums, so the stages
# are repeated bit for bit only with the threads they ran with)
PLAN = {
    "vae": dict(steps=1500, batch=16, lr=2e-3, warmup=50, probe=300, threads=1),
    "mllm": dict(steps=2400, batch=32, lr=2e-3, warmup=100, probe=400, threads=1),
    "dit": dict(steps=1800, batch=32, lr=1e-3, warmup=100, probe=300, threads=2),
    # the continuation: both networks again from where they stopped, on the compositional
    # request frames (conversations.COMPOSED, split "train2"), a fresh optimizer and a
    # second, lower cosine cycle
    "mllm2": dict(steps=2000, batch=32, lr=1e-3, warmup=50, probe=500, threads=2),
    "dit2": dict(steps=3200, batch=32, lr=6e-4, warmup=50, probe=500, threads=2),
    # dit2 again, on shifted noise levels (SIGMA_SHIFT), a fresh optimizer and a third cycle
    "dit3": dict(steps=2400, batch=32, lr=4e-4, warmup=50, probe=600, threads=2),
    # the MLLM again, leaning to descriptions (MLLM_MIX), on train2 conversations after those
    # mllm2 read (MLLM_FIRST); then the DiT again on its states
    "mllm3": dict(steps=800, batch=32, lr=5e-4, warmup=50, probe=400, threads=2),
    "dit4": dict(steps=2400, batch=32, lr=4e-4, warmup=50, probe=600, threads=2),
}
# stage 2's drawn pictures by conversation kind: dit draws from the three alike; dit2 leans
# to edits, the kind furthest from its goal after dit (the asked change, the rest copied
# from the condition frame)
EDITS_LEANING = {"draw": 0.2, "step": 0.35, "edit": 0.45}
DIT_KINDS = {"dit": None, "dit2": EDITS_LEANING, "dit3": EDITS_LEANING, "dit4": EDITS_LEANING}
# which stage's weights each later stage (and the package) starts from
MLLM_OF = {"dit": "mllm", "mllm2": "mllm", "dit2": "mllm2", "dit3": "mllm2", "mllm3": "mllm2", "dit4": "mllm3",
           "export": "mllm3"}
DIT_OF = {"dit2": "dit", "dit3": "dit2", "dit4": "dit3", "export": "dit4"}
# the DiT stages that start from the earlier weights as the package holds them (bf16; the VAE
# too): what a run from a package (--from-package) reads is then what a whole run reads
AS_SHIPPED = {"dit3", "dit4"}
# --package-as: the DiT stages a package can be read as (its MLLM as MLLM_OF's of that stage)
PACKAGE_AS = ("dit2", "dit3")
VOCAB_SIZE = 768          # BPE target (bytes included); the world's text needs ~600
VAE_NOISE = 0.1          # stage vae: noise added to the content latents
CELL_WEIGHT = {"mllm": 0.5, "mllm2": 0.5}   # weight of the per-cell probe of the vision tokens
# (mllm3 has none: its start, mllm2's weights, is all a package holds of the MLLM, so a run
# from a package trains the same mllm3 as a whole run)
MLLM_MIX = {"mllm3": conversations.MIX3}     # the conversation kinds (others: conversations.make's)
# the index of a stage's first conversation: mllm3's come after those of the committed mllm2
MLLM_FIRST = {"mllm3": PLAN["mllm2"]["steps"] * PLAN["mllm2"]["batch"]}
P_UNCOND = 0.12           # stage 2: share of samples conditioned on the CFG negative
EMA_DECAY = 0.995
SIGMA_MEAN, SIGMA_STD = 0.3, 1.0   # logit-normal training sigmas: sigmoid(N(m, s))
# per stage, the shift applied to those (s -> shift·s / (1 + (shift − 1)·s), the sampler's own
# map, flow.shifted): dit3 trains where the sampler (SAMPLER's shift 3) spends its steps
SIGMA_SHIFT = {"dit3": 3.0, "dit4": 3.0}
# the probes' and the package's sampler defaults. Guidance 4 was chosen on the finished
# model's probe set (48 held-out conversations, 70 requested shapes: present 42 at
# guidance 2, 44 at 4, 43 at 6); the committed run's DiT stages were trained after that, and
# their probes drew at 4.
SAMPLER = dict(steps=16, guidance=4.0, shift=3.0)
# the package's defaults (duogen.json): the probes' but guidance 2, chosen for dit3 through the
# engine on held-out streams never reported (eval.py --seed 10..14, 1000 conversations:
# requested shapes present 88.8% at guidance 4, 89.4% at 3, 90.4% at 2, 90.5% at 1.5, 87.4%
# with none; edits 81.5, 82.5, 86.0, 86.0, 84.0%); measured again for dit4 and kept (from none
# to 2.5 within two points on every measure; shapes/MODEL.md)
PACKAGE_SAMPLER = dict(SAMPLER, guidance=2.0)
CHECKPOINT_SECONDS = 300
STAGE_SALT = {"vae": 1, "mllm": 2, "dit": 3, "mllm2": 4, "dit2": 5, "dit3": 6, "mllm3": 7, "dit4": 8}
SPLIT = {"mllm": "train", "dit": "train", "mllm2": "train2", "dit2": "train2", "dit3": "train2", "mllm3": "train2",
         "dit4": "train2"}
STAGES = ["tokenizer", "vae", "mllm", "dit", "mllm2", "dit2", "dit3", "mllm3", "dit4"]


class Run:
    """The working directory: logging and checkpoints."""

    def __init__(self, work, seed):
        self.work, self.seed = work, seed
        os.makedirs(work, exist_ok=True)
        self.t0 = time.time()

    def path(self, *p):
        return os.path.join(self.work, *p)

    def log(self, msg):
        line = f"[{time.strftime('%H:%M:%S')} +{time.time() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        with open(self.path("train.log"), "a") as f:
            f.write(line + "\n")

    def save(self, name, state):
        tmp = self.path(name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path(name))

    def load(self, name):
        p = self.path(name)
        return torch.load(p, weights_only=False, map_location=here()) if os.path.exists(p) else None

    def gen(self, stage, step):
        """The noise generator of step `step` of a stage: a resumed run draws the same."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1000003 + STAGE_SALT[stage] * 7919 + step)
        return g


def here():
    """The device the stages compute on: torch's default device, which --device sets (cpu
    unless asked)."""
    return torch.get_default_device()


def drawn(fn, shape, gen):
    """fn (torch.randn, torch.rand) of `shape` from a stage's CPU generator, moved to the
    compute device: a GPU run draws the same numbers as the CPU one."""
    return fn(shape, generator=gen, device="cpu").to(here())


# ---- tokenizer and the mllm folder --------------------------------------------------------

def stage_tokenizer(run):
    mdir = run.path("mllm")
    if os.path.exists(os.path.join(mdir, "config.json")):
        return
    os.makedirs(mdir, exist_ok=True)
    texts = [conversations.SYSTEM + "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"]
    for i in range(20000):
        for kind, v, _ in conversations.segments(conversations.make(run.seed, i, "train")):
            if kind == "text":
                texts.append(v)
    base = tokenizer.write(tokenizer.train_bpe(texts, VOCAB_SIZE), mdir)
    n_ids = base + len(tokenizer.SPECIALS) + 1
    rows = (n_ids + 63) // 64 * 64                     # embedding rows, padded as Qwen pads
    models.write_json(os.path.join(mdir, "config.json"), models.mllm_config(models.SIZES["mllm"], rows, base))
    models.write_json(os.path.join(mdir, "preprocessor_config.json"), models.PREPROCESSOR)
    models.write_json(os.path.join(mdir, "generation_config.json"),
                      {"bos_token_id": base, "pad_token_id": base, "eos_token_id": [base + 2, base],
                       "do_sample": False})
    run.log(f"tokenizer: {base} BPE tokens, specials at {base}..{base + 21}, <BOV> {base + 22}, {rows} rows")


def codec_for(run):
    from transformers import AutoTokenizer
    return data.Codec(AutoTokenizer.from_pretrained(run.path("mllm")))


# ---- the VAE ------------------------------------------------------------------------------

def vae_pictures(run, step, n, offset=0):
    """n pictures of 0..4 shapes for VAE step `step` (training split: no held-out triple)."""
    out = []
    for i in range(n):
        rng = world.rng_for(run.seed, step * n + i + offset, "vae")
        out.append(world.render(world.random_scene(rng, rng.choice([0, 1, 2, 3, 4, 4]))))
    return torch.stack([pipeline.to_pixels(p) for p in out])


def stage_vae(run, plan):
    if os.path.exists(run.path("vae", "config.json")):
        return
    models.use_single_frame_convs()
    cfg = models.vae_config(models.SIZES["vae"])
    zc = models.SIZES["vae"]["content_channels"]
    torch.manual_seed(run.seed)
    vae = models.build_vae(cfg)
    # the decoder never reads the coordinate channels: their post_quant_conv columns are 0
    with torch.no_grad():
        vae.post_quant_conv.weight[:, zc:] = 0
    vae.post_quant_conv.weight.register_hook(lambda g: torch.cat([g[:, :zc], torch.zeros_like(g[:, zc:])], 1))
    opt = torch.optim.AdamW(vae.parameters(), lr=plan["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    ck = run.load("vae.pt")
    if ck:
        vae.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        run.log(f"vae: resumed at step {step}")
    ramps = models.coord_ramps()[None]
    last_save = time.time()
    run.log(f"vae: {models.n_params(vae) / 1e6:.2f} M parameters, {plan['steps']} steps of {plan['batch']}")
    while step < plan["steps"]:
        for g in opt.param_groups:
            g["lr"] = models.lr_at(step, plan["steps"], plan["lr"], plan["warmup"])
        x = vae_pictures(run, step, plan["batch"])
        gen = run.gen("vae", step)
        mu, _ = models.vae_encode_raw(vae, x)
        # a fixed small noise on the content latents keeps the decoder robust to the DiT's
        # imprecision; a light L2 keeps their scale from growing past it
        z = mu[:, :zc] + VAE_NOISE * drawn(torch.randn, mu[:, :zc].shape, gen)
        y = models.vae_decode_raw(vae, torch.cat([z, mu[:, zc:]], 1))
        rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        l2 = mu[:, :zc].pow(2).mean()
        coord = F.mse_loss(mu[:, zc:], ramps.expand(len(x), -1, -1, -1))
        loss = rec + 1e-3 * l2 + 0.1 * coord
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            run.log(f"vae {step}: loss {loss.item():.4f} rec {rec.item():.4f} l2 {l2.item():.2f} coord {coord.item():.4f}")
        if step % plan["probe"] == 0 or step == plan["steps"]:
            probe_vae(run, vae)
        if time.time() - last_save > CHECKPOINT_SECONDS or step == plan["steps"]:
            run.save("vae.pt", {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
            last_save = time.time()
    # the latents' statistics: the DiT sees (mu - mean) / std per channel, coordinates as they are
    with torch.no_grad():
        mu = torch.cat([models.vae_encode_raw(vae, vae_pictures(run, k, 64, offset=10 ** 7))[0] for k in range(8)])
    mean = mu[:, :zc].mean((0, 2, 3)).tolist() + [0.0, 0.0]
    std = mu[:, :zc].std((0, 2, 3)).tolist() + [1.0, 1.0]
    cfg = models.vae_config(models.SIZES["vae"], mean, std)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    os.makedirs(run.path("vae"), exist_ok=True)
    torch.save(vae.state_dict(), run.path("vae", "weights.pt"))
    models.write_json(run.path("vae", "config.json"), cfg)
    run.log(f"vae: done; latent mean {[round(v, 2) for v in mean]} std {[round(v, 2) for v in std]}")


def load_vae(run):
    models.use_single_frame_convs()
    cfg = json.load(open(run.path("vae", "config.json")))
    vae = models.build_vae(cfg)
    vae.load_state_dict(torch.load(run.path("vae", "weights.pt"), map_location=here()))
    return vae.eval().requires_grad_(False)


def probe_vae(run, vae):
    """Reconstructions of held-out scenes (eval split) through the scorer: every shape found
    with its colour, place and kind, nothing else."""
    vae.eval()
    ok = n = 0
    err = 0.0
    with torch.no_grad():
        for i in range(48):
            shapes = world.random_scene(world.rng_for(run.seed, i, "vae-probe"), 1 + i % 4, allow_held_out=True)
            x = pipeline.to_pixels(world.render(shapes))[None]
            mu, _ = models.vae_encode_raw(vae, x)
            y = models.vae_decode_raw(vae, mu).clamp(-1, 1)
            err += F.mse_loss(y, x).item()
            ok += score.same_picture(score.detect(pipeline.to_picture(y[0])), shapes)
            n += 1
    vae.train()
    run.log(f"vae probe: reconstruction mse {err / n:.5f}, pictures read back exactly {ok}/{n}")


# ---- stage 1: the MLLM ----------------------------------------------------------------------

def stage_mllm(run, plan, name="mllm"):
    """Stage 1. Beside the next-token loss, each picture's 9 merged vision tokens (one per
    grid cell) are read by a linear probe that must tell what the cell holds (CELL_WEIGHT):
    a direct signal that teaches the vision tower the world in a few hundred steps, where
    the next-token loss alone had not after 800 (descriptions then ignored the picture).
    The probe is not part of the model and is not shipped. Stage mllm2 starts from the
    finished stage 1 (weights and probe head) with a fresh optimizer; mllm3 from mllm2's
    weights, without the probe (CELL_WEIGHT)."""
    if os.path.exists(run.path(name, "weights.pt")):
        return
    split = SPLIT[name]
    codec = codec_for(run)
    pixels = data.Pixels(models.image_processor())
    torch.manual_seed(run.seed)
    mllm = models.build_mllm(run.path("mllm"))
    cell_weight = CELL_WEIGHT.get(name, 0.0)
    head = torch.nn.Linear(mllm.config.text_config.hidden_size, data.N_CELL_CLASSES) if cell_weight else None
    trained = list(mllm.parameters()) + (list(head.parameters()) if head else [])
    opt = torch.optim.AdamW(trained, lr=plan["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    step, first, mix = 0, MLLM_FIRST.get(name, 0), MLLM_MIX.get(name)
    if name in MLLM_OF:
        mllm.load_state_dict(torch.load(run.path(MLLM_OF[name], "weights.pt"), map_location=here()))
        if head:
            head.load_state_dict(run.load(MLLM_OF[name] + ".pt")["head"])
    ck = run.load(name + ".pt")
    if ck:
        mllm.load_state_dict(ck["model"])
        if head:
            head.load_state_dict(ck["head"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        run.log(f"{name}: resumed at step {step}")
    run.log(f"{name}: {models.n_params(mllm) / 1e6:.2f} M parameters, {plan['steps']} steps of {plan['batch']}")
    last_save = time.time()
    mllm.train()
    while step < plan["steps"]:
        for g in opt.param_groups:
            g["lr"] = models.lr_at(step, plan["steps"], plan["lr"], plan["warmup"])
        convs = [conversations.make(run.seed, first + step * plan["batch"] + i, split, mix=mix)
                 for i in range(plan["batch"])]
        tokenized = [codec.encode(c) for c in convs]
        batch, labels = data.mllm_batch(codec, pixels, tokenized)
        pv = batch.pop("pixel_values")
        img = mllm.model.get_image_features(pv, batch["image_grid_thw"], return_dict=True)
        mllm.model.rope_deltas = None
        logits = mllm(**batch, mm_encoder_outputs={"image": img}, use_cache=False).logits
        lm = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss, said = lm, f"loss {lm.item():.4f}"
        if head:
            cells = torch.tensor([c for t in tokenized for p in t.pictures for c in data.cell_labels(p)])
            cell = F.cross_entropy(head(torch.cat(img.pooler_output)), cells)
            loss, said = lm + cell_weight * cell, said + f" cells {cell.item():.4f}"
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        step += 1
        if step % 25 == 0:
            run.log(f"{name} {step}: {said}")
        if step % plan["probe"] == 0 or step == plan["steps"]:
            probe_mllm(run, mllm, codec, pixels)
        if time.time() - last_save > CHECKPOINT_SECONDS or step == plan["steps"]:
            run.save(name + ".pt", {"model": mllm.state_dict(), "head": head.state_dict() if head else None,
                                    "opt": opt.state_dict(), "step": step})
            last_save = time.time()
    with torch.no_grad():                       # as shipped: bf16
        for p in mllm.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    os.makedirs(run.path(name), exist_ok=True)
    torch.save(mllm.state_dict(), run.path(name, "weights.pt"))
    probe_mllm(run, mllm, codec, pixels)
    run.log(f"{name}: done (weights rounded to bf16)")


def load_mllm(run, name="mllm"):
    """The finished MLLM of stage `name` (its config and tokenizer are stage 1's)."""
    mllm = models.build_mllm(run.path("mllm"))
    mllm.load_state_dict(torch.load(run.path(name, "weights.pt"), map_location=here()))
    return mllm.eval().requires_grad_(False)


def gt_painter(conv):
    """Probes of the MLLM alone feed back the pictures the conversation asks for."""
    return lambda ids, pictures, vision_end, k: world.render(conv["images"][k]) if k < len(conv["images"]) \
        else world.render([])


def probe_mllm(run, mllm, codec, pixels, n_per_kind=8):
    """Greedy answers to held-out conversations (eval split), pictures fed back from the
    ground truth: decision accuracy, descriptions, and whether each sentence before a
    <BOV> names the requested shapes canonically."""
    mllm.eval()
    total, said = {}, [0, 0]
    for kind in conversations.KINDS:
        for i in range(n_per_kind):
            conv = conversations.make(run.seed, i, "eval", kind)
            gen, text, drawn = pipeline.answer(mllm, codec, pixels, conv, gt_painter(conv))
            score.add_up(total, {k: v for k, v in score.score_answer(conv, text, drawn).items()
                                 if k in ("decision", "count", "describe")})
            if conv["new"]:   # sizes the user left open are the assistant's choice
                want = {(s.kind, s.colour, s.cell) for new in conv["new"] for s in new}
                got = {(s.kind, s.colour, s.cell) for s in conversations.parse_shapes(text)}
                said[0] += want <= got
                said[1] += 1
    mllm.train()
    run.log("mllm probe: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in total.items()) +
            f", drawn shapes named right {said[0]}/{said[1]}")


# ---- stage 2: connector and DiT ---------------------------------------------------------

LATENTS = {}   # a blank or one-shape scene -> its VAE latent, for this process


def latents_of(vae, scenes):
    """The VAE latents [len(scenes), z, h, w] of rendered scenes (lists of shapes in drawing
    order). The VAE is frozen in the DiT stages, and a batch of two or more pictures gives
    each the same bits whatever the others are (a lone picture differs in the last bits, so
    a lone one is encoded beside a blank): so the blank canvas and the 324 one-shape scenes,
    46% of a stage's pictures, are encoded once and kept, which changes no latent, and a
    resumed run, whose cache starts empty, draws what an uninterrupted one does. (Scenes of
    two shapes repeat 15% of the time, more rarely beyond: not kept.)"""
    keys = [tuple(s.key() for s in shapes) for shapes in scenes]
    todo = [i for i, k in enumerate(keys) if k not in LATENTS]
    out = [LATENTS.get(k) for k in keys]
    for c in range(0, len(todo), 64):
        part = todo[c:c + 64]
        pics = [pipeline.to_pixels(world.render(scenes[i])) for i in part]
        if len(pics) == 1:
            pics.append(torch.zeros_like(pics[0]))
        for i, e in zip(part, models.vae_encode(vae, torch.stack(pics))):
            out[i] = e
            if len(keys[i]) <= 1:
                LATENTS[keys[i]] = e
    return torch.stack(out)


def dit_batch(run, step, batch, codec, pixels, mllm, vae, layers, split="train", kinds=None):
    """The frozen parts of a stage-2 batch: per drawn picture, the condition states of its
    context (positive, and the negative's length), its earlier pictures' latents and its
    target latent (coordinate channels exact). `kinds` weighs the conversation kinds (None:
    alike)."""
    rng = random.Random(f"dit:{run.seed}:{step}")
    samples, i = [], 0
    while len(samples) < batch:
        kind = rng.choice(["draw", "step", "edit"]) if kinds is None else \
            rng.choices(list(kinds), weights=list(kinds.values()))[0]
        conv = conversations.make(run.seed, step * batch * 2 + i, split, kind)
        i += 1
        samples.append(data.draw_samples(codec.encode(conv), rng))
    mb, _ = data.mllm_batch(codec, pixels, [s.tokenized for s in samples], cut=[s.n_pos for s in samples])
    with torch.no_grad():
        mllm.model.rope_deltas = None
        hs = mllm(**mb, output_hidden_states=True, use_cache=False).hidden_states
        states = models.condition_states(hs, layers)                  # [B, T, L·D]
        F_ = 1 + max(len(s.conds) for s in samples)
        z = vae.config.z_dim
        zc = z - 2
        lat = torch.zeros(len(samples), F_, z, models.LATENT_SIDE, models.LATENT_SIDE)
        frame_mask = torch.zeros(len(samples), F_, dtype=torch.bool)
        scenes, where = [], []
        for b, s in enumerate(samples):
            for f, shapes in enumerate(s.conds + [s.target]):
                scenes.append(shapes)
                where.append((b, f))
                frame_mask[b, f] = True
        for (b, f), e in zip(where, latents_of(vae, scenes)):
            lat[b, f] = e
        targets = torch.tensor([len(s.conds) for s in samples])
        lat[torch.arange(len(samples)), targets, zc:] = models.coord_ramps()
    n_pos = torch.tensor([s.n_pos for s in samples])
    n_neg = torch.tensor([s.n_neg for s in samples])
    return states, n_pos, n_neg, lat, frame_mask, targets


def target_velocity(dit, x, is_cond, ts, targets, ctx, ctx_mask):
    """The DiT's velocity on each sample's target frame [B, C, h, w], the samples run in
    groups of equal frame count: what one padded forward over [B, max F] gives (padding
    frames are attended by nobody), at about half its cost, since a batch mixes one- to
    four-frame samples."""
    out = torch.empty(x.shape[0], *x.shape[2:])
    for f in sorted(set(targets.tolist())):
        idx = (targets == f).nonzero()[:, 0]
        n = f + 1
        v = models.dit_forward(dit, x[idx, :n], is_cond[idx, :n], ts[idx, :n], torch.ones(len(idx), n, dtype=torch.bool),
                               ctx[idx], ctx_mask[idx])
        out = out.index_put((idx,), v[:, f])
    return out


def as_shipped(*modules):
    """Rounds the modules' parameters to bf16 in place (what export writes)."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))


def stage_dit(run, plan, name="dit"):
    """Stage 2; stages dit2 and dit3 go on from the one before (DIT_OF), conditioned on mllm2."""
    if os.path.exists(run.path(name, "weights.pt")):
        return
    split = SPLIT[name]
    codec = codec_for(run)
    pixels = data.Pixels(models.image_processor())
    mllm, vae = load_mllm(run, MLLM_OF[name]), load_vae(run)
    if name in AS_SHIPPED:
        as_shipped(vae)                         # mllm2 ends rounded already
    LATENTS.clear()                             # an earlier stage's, of the unrounded VAE
    L = mllm.config.text_config.num_hidden_layers
    layers = list(range(L))
    torch.manual_seed(run.seed)
    z = vae.config.z_dim
    dit = models.build_dit(models.dit_config(models.SIZES["dit"], z))
    conn = models.Connector(L * mllm.config.text_config.hidden_size, models.SIZES["dit"]["d_cond"])
    with torch.no_grad():                       # start as a zero velocity with plain modulations
        dit.proj_out.weight.zero_()
        for blk in dit.transformer_blocks:
            for norm in (blk.norm1, blk.norm2, blk.norm3):
                norm.linear_2.weight.mul_(0.1)
    if name in DIT_OF:
        w = torch.load(run.path(DIT_OF[name], "weights.pt"), map_location=here())
        dit.load_state_dict(w["dit"])
        conn.load_state_dict(w["conn"])
        if name in AS_SHIPPED:
            as_shipped(dit, conn)
    params = list(dit.parameters()) + list(conn.parameters())
    opt = torch.optim.AdamW(params, lr=plan["lr"], betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    step = 0
    ck = run.load(name + ".pt")
    if ck:
        dit.load_state_dict(ck["dit"])
        conn.load_state_dict(ck["conn"])
        opt.load_state_dict(ck["opt"])
        ema = ck["ema"]
        step = ck["step"]
        run.log(f"{name}: resumed at step {step}")
    run.log(f"{name}: {models.n_params(dit) / 1e6:.2f} M parameters (connector {models.n_params(conn) / 1e6:.2f} M), "
            f"{plan['steps']} steps of {plan['batch']}")
    last_save = time.time()
    while step < plan["steps"]:
        for g in opt.param_groups:
            g["lr"] = models.lr_at(step, plan["steps"], plan["lr"], plan["warmup"])
        states, n_pos, n_neg, lat, frame_mask, targets = dit_batch(run, step, plan["batch"], codec, pixels, mllm,
                                                                  vae, layers, split, DIT_KINDS[name])
        gen = run.gen(name, step)
        B, T = states.shape[:2]
        drop = drawn(torch.rand, B, gen) < P_UNCOND
        n_ctx = torch.where(drop, n_neg, n_pos)
        ctx_mask = torch.arange(T)[None] < n_ctx[:, None]
        ctx = conn(states)
        sigma = torch.sigmoid(SIGMA_MEAN + SIGMA_STD * drawn(torch.randn, B, gen))
        if name in SIGMA_SHIFT:
            sigma = flow.shifted(sigma, SIGMA_SHIFT[name])
        eps = drawn(torch.randn, lat.shape, gen)
        bi = torch.arange(B)
        x0 = lat[bi, targets]
        x = lat.clone()
        x[bi, targets] = sigma.view(-1, 1, 1, 1) * eps[bi, targets] + (1 - sigma.view(-1, 1, 1, 1)) * x0
        is_cond = frame_mask.clone()
        is_cond[bi, targets] = False
        ts = torch.full(frame_mask.shape, 1e-4)
        ts[bi, targets] = sigma
        v = target_velocity(dit, x, is_cond, ts, targets, ctx, ctx_mask)
        loss = F.mse_loss(v, eps[bi, targets] - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - EMA_DECAY)
        step += 1
        if step % 25 == 0:
            run.log(f"{name} {step}: loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        if step % plan["probe"] == 0 or step == plan["steps"]:
            probe_dit(run, mllm, vae, dit, conn, ema, params, codec, pixels, layers)
        if time.time() - last_save > CHECKPOINT_SECONDS or step == plan["steps"]:
            run.save(name + ".pt", {"dit": dit.state_dict(), "conn": conn.state_dict(), "opt": opt.state_dict(),
                                    "ema": ema, "step": step})
            last_save = time.time()
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    os.makedirs(run.path(name), exist_ok=True)
    torch.save({"dit": dit.state_dict(), "conn": conn.state_dict()}, run.path(name, "weights.pt"))
    run.log(f"{name}: done (EMA weights kept)")


def swap(params, ema):
    for p, e in zip(params, ema):
        t = p.detach().clone()
        p.data.copy_(e)
        e.copy_(t)


def probe_dit(run, mllm, vae, dit, conn, ema, params, codec, pixels, layers, n_per_kind=8, **sampler):
    """Pictures drawn for held-out conversations (eval split) by the EMA weights, with the
    ground-truth text before each <BOV> and the earlier pictures as drawn, scored. The
    k-th pictures of all conversations are drawn together."""
    sampler = {**SAMPLER, **sampler}
    swap(params, ema)
    dit.eval()
    convs = [conversations.make(run.seed, 1000 + i, "eval", kind)
             for kind in ("draw", "step", "edit") for i in range(n_per_kind)]
    toks = [codec.encode(c) for c in convs]
    pics = [[world.render(p) for p in t.pictures] for t in toks]   # drawn ones get replaced
    drawn = [[] for _ in convs]
    for k in range(max(len(t.bov) for t in toks)):
        todo = [(b, sorted(t.bov)[k]) for b, t in enumerate(toks) if k < len(t.bov)]
        pos, neg = [], []
        with torch.no_grad():
            for b, j in todo:
                t = toks[b]
                p, n = pipeline.context(mllm, codec, pixels, conn, layers, t.ids[:t.bov[j]], pics[b][:j],
                                        t.vision_end[j - 1] + 1 if j > 0 else 1)
                pos.append(p[0])
                neg.append(n[0])
        out = pipeline.paint_batch(dit, vae, pos, neg, [pics[b][:j] for b, j in todo], [(1, k)] * len(todo), **sampler)
        for (b, j), pic in zip(todo, out):
            pics[b][j] = pic
            drawn[b].append(pic)
    total = {}
    for conv, d in zip(convs, drawn):
        r = score.score_answer(conv, "", d)
        score.add_up(total, {k: v for k, v in r.items() if k in ("present", "kind", "kept", "edit")})
    swap(params, ema)
    dit.train()
    run.log("dit probe: " + ", ".join(f"{k} {a}/{b}" for k, (a, b) in total.items()))
    os.makedirs(run.path("probe"), exist_ok=True)
    for b in range(0, len(convs), n_per_kind):
        for i, p in enumerate(drawn[b]):
            p.save(run.path("probe", f"{convs[b]['kind']}{i}.png"))
    return total


# what each stage leaves in the work folder: its output, its checkpoint
ARTIFACTS = {"tokenizer": ["mllm/config.json"], "vae": ["vae", "vae.pt"], "mllm": ["mllm/weights.pt", "mllm.pt"],
             "dit": ["dit", "dit.pt"], "mllm2": ["mllm2", "mllm2.pt"], "dit2": ["dit2", "dit2.pt"],
             "dit3": ["dit3", "dit3.pt"], "mllm3": ["mllm3", "mllm3.pt"], "dit4": ["dit4", "dit4.pt"]}


def code_digest():
    """sha256 over this folder's Python sources, in name order."""
    h = hashlib.sha256()
    for p in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py"))):
        h.update(os.path.basename(p).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def check_stamp(run, stage, record):
    """Refuses a work folder whose output or checkpoint of `stage` was made from another
    record (plan, seed, device, code, earlier stages); records it before a fresh start."""
    path = run.path("stamps", stage + ".json")
    have = [a for a in ARTIFACTS[stage] if os.path.exists(run.path(a))]
    old = json.load(open(path)) if os.path.exists(path) else None
    if have and old != record:
        why = "no record of how they were made" if old is None else \
            "made with another " + ", ".join(k for k in record if old.get(k) != record[k])
        sys.exit(f"train.py: stage {stage}: {run.work} holds {', '.join(have)}, {why}: remove them (and the "
                 f"later stages') or use another --work")
    if not have:
        os.makedirs(run.path("stamps"), exist_ok=True)
        with open(path, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)


def machine():
    """Where the run computes: what decides the bits of its sums besides the code."""
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    versions = {}
    for name in ("torch", "transformers", "diffusers", "tokenizers", "numpy"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    return f"cpu {model!r}, PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}, " + \
        ", ".join(f"{k} {v}" for k, v in versions.items())


def main():
    folder = os.path.dirname(os.path.abspath(__file__))
    root = os.path.normpath(os.path.join(folder, "..", ".."))
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=os.path.join(root, "build", "train"))
    ap.add_argument("--stage", default="all", choices=STAGES + ["export", "all"])
    ap.add_argument("--from-package", metavar="DIR",
                    help="start from a package this script exported (as the outputs of the stages up to "
                         "--package-as) in an empty work folder, or resume such a run: runs the stages after "
                         "that one and the export")
    ap.add_argument("--package-as", choices=PACKAGE_AS,
                    help="with --from-package: the stage whose DiT the package holds (its MLLM is the one that "
                         "stage conditioned on): dit2 (the default; runs dit3, mllm3, dit4), dit3 (runs mllm3, dit4)")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: each stage's, PLAN)")
    ap.add_argument("--steps", default="", help="override steps, e.g. vae=100,mllm=200")
    ap.add_argument("--out", default=os.path.join(folder, "shapes"))
    ap.add_argument("--device", default="cpu",
                    help="where the stages compute: cpu (the committed run), cuda, cuda:N. The data, the "
                         "noise draws and the export stay on the CPU; on a GPU the sums run in another "
                         "order, so the weights differ from a CPU run's (the model card says where they "
                         "were trained)")
    args = ap.parse_args()
    plan = {k: dict(v) for k, v in PLAN.items()}
    for kv in filter(None, args.steps.split(",")):
        k, v = kv.split("=")
        plan[k]["steps"] = int(v)
    if args.package_as and not args.from_package:
        ap.error("--package-as says how to read the package of --from-package, and there is none")
    args.package_as = args.package_as or "dit2"
    after = STAGES[STAGES.index(args.package_as) + 1:] + ["export"]
    if args.from_package and args.stage not in ["all"] + after:
        ap.error(f"--from-package with --package-as {args.package_as} runs {', '.join(after)}, not {args.stage}")
    unpacked = resumed = None
    if args.from_package:
        import export
        unpacked = export.package_digest(args.from_package)
        mark = os.path.join(args.work, "stamps", "package.json")
        was = json.load(open(mark)) if os.path.exists(mark) else {}
        resumed = was.get("package") == unpacked and was.get("as", "dit2") == args.package_as
        if not resumed and os.path.exists(args.work) and os.listdir(args.work):
            ap.error(f"--from-package needs an empty work folder, or one this package was unpacked into; "
                     f"{args.work} is neither")
    run = Run(args.work, args.seed)
    run.log(f"machine: {machine()}")
    if unpacked and not resumed:
        export.read_package(run, args.from_package, args.package_as)
        os.makedirs(run.path("stamps"), exist_ok=True)
        with open(run.path("stamps", "package.json"), "w") as f:
            json.dump({"package": unpacked, "as": args.package_as, "from": os.path.abspath(args.from_package)}, f,
                      indent=1)
    stages = STAGES + ["export"] if args.stage == "all" else [args.stage]
    if unpacked:
        stages = [st for st in stages if st in after]
    code, earlier = code_digest(), {}
    for st in STAGES:   # a stage's record holds the earlier ones'
        record = {"stage": st, "plan": plan.get(st, {}), "seed": args.seed, "device": args.device,
                  "threads": args.threads, "code": code,
                  "earlier": dict(earlier)}
        if unpacked and st == after[0]:
            record["earlier"] = {"package": unpacked, "as": args.package_as}
        earlier[st] = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
        if st in stages:
            check_stamp(run, st, record)
    for st in stages:
        t0 = time.time()
        torch.set_num_threads(args.threads or plan.get(st, {}).get("threads", 1))
        torch.set_default_device("cpu" if st == "export" else args.device)
        if st == "tokenizer":
            stage_tokenizer(run)
        elif st == "vae":
            stage_vae(run, plan["vae"])
        elif st in ("mllm", "mllm2", "mllm3"):
            stage_mllm(run, plan[st], st)
        elif st in ("dit", "dit2", "dit3", "dit4"):
            stage_dit(run, plan[st], st)
        else:
            import export
            export.write_package(run, args.out, PACKAGE_SAMPLER)
        run.log(f"stage {st}: {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
