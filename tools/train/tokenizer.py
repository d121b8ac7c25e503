"""The model's own vocabulary: a small byte-level BPE in the Qwen2 format.

Trained with Hugging Face `tokenizers` on the training split's text, with Qwen2's
pre-tokenizer (NFC, the Qwen2 split regex, byte-level alphabet without a prefix space),
so that transformers' Qwen2Tokenizer and the engine's tokenizer (engine/text/) read the
files the same way. Written as the engine reads a Qwen2 tokenizer folder:

  vocab.json              the 256 byte tokens and the merged tokens, ids 0..N-1
  merges.txt              "#version: 0.2", then one merge a line, in rank order
  tokenizer_config.json   the added tokens: Qwen2.5-VL's 22 specials at N..N+21 (the
                          first 14 "special": true, as published), then <BOV>; the chat
                          template tools/mkmodel writes; eos <|im_end|>, pad <|endoftext|>

The ids of the specials follow the BPE tokens, so config.json's bos/eos/vision ids are
N + k (SPECIALS' index) and <BOV> is N + 22.
"""
import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

# Qwen2's pre-tokenizer split (tokenizer.json of Qwen2.5: Split, behavior Isolated)
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_HERE = os.path.dirname(os.path.abspath(__file__))


def _published_specials():
    """Qwen2.5's 22 added tokens in id order and how many lead with "special": true, from the
    published tokenizer_config.json that tools/mkmodel ships (vocab/qwen2)."""
    with open(os.path.join(_HERE, "..", "mkmodel", "vocab", "qwen2", "tokenizer_config.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens_decoder"]
    tokens = [added[k] for k in sorted(added, key=int)]
    n_true = next((i for i, t in enumerate(tokens) if not t["special"]), len(tokens))
    assert all(not t["special"] for t in tokens[n_true:]), "the specials are not a leading run"
    return [t["content"] for t in tokens], n_true


SPECIALS, N_SPECIAL_TRUE = _published_specials()
BOV = "<BOV>"

# The Qwen2.5-VL chat template, the one tools/mkmodel writes (its chat_template.jinja)
with open(os.path.join(_HERE, "..", "mkmodel", "chat_template.jinja"), encoding="utf-8") as _f:
    CHAT_TEMPLATE = _f.read()


def train_bpe(texts, vocab_size):
    """A byte-level BPE of at most vocab_size tokens (bytes included) over the texts."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def write(tok, out_dir):
    """vocab.json, merges.txt and tokenizer_config.json into out_dir; returns the id of the
    first special token (the BPE's size N)."""
    model = json.loads(tok.to_str())["model"]
    vocab, merges = model["vocab"], model["merges"]
    n = len(vocab)
    assert sorted(vocab.values()) == list(range(n)), "BPE ids are not 0..N-1"
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for m in merges:
            f.write((m if isinstance(m, str) else " ".join(m)) + "\n")
    added = {}
    for i, content in enumerate(SPECIALS + [BOV]):
        added[str(n + i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": i < N_SPECIAL_TRUE or content == BOV}
    config = {"add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
              "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
              "errors": "replace", "model_max_length": 4096, "pad_token": "<|endoftext|>",
              "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return n


def special_ids(base):
    """{token: id} of the specials and <BOV> for a BPE of `base` tokens."""
    return {t: base + i for i, t in enumerate(SPECIALS + [BOV])}
