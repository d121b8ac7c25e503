#!/usr/bin/env python3
"""Golden ids for the Qwen2 tokenizer and the Qwen2.5-VL chat template.

Builds the Hugging Face fast tokenizer (the `tokenizers` library) from the same vocab.json,
merges.txt and added tokens that duogen loads, with the Qwen2 pipeline of
docs/specs/qwen2_5_vl.md §6.1, assembles a deterministic corpus of test strings, and writes:

  tests/golden/tokenizer/corpus.jsonl  one object per string:
      "text" (the string) or "hex" (raw bytes that are not valid UTF-8; the reference
      tokenizes bytes.decode("utf-8", "replace") of them), "ids", "decoded" (the
      reference's decode of ids), "nfc_roundtrip" (decoded == NFC(text)),
      "decoded_skip" (decode with skip_special_tokens, only where it differs)
  tests/golden/tokenizer/chat.jsonl    one conversation per line: "messages" (role,
      parts of {"type": "text", "text"} or {"type": "image", "tokens": n}),
      "add_generation_prompt", "text" (the Jinja template of spec §5.6 rendered as
      transformers renders chat templates, then each <|image_pad|> repeated n times as the
      Qwen2.5-VL processor does) and "ids".
  tests/golden/tokenizer/unicode_classes.txt: how the reference's regex classes every code
      point (letter, number, space, other), as runs "first last class" in hex.
  tests/golden/tokenizer/nfc.json: what the reference's NFC (older Unicode tables than
      utf8proc's) treats as combining, and its NFC of every canonical decomposition.
  tests/golden/tokenizer/extra_tokenizer_config.json + extra.jsonl: Qwen's added tokens
      plus <BOV> and two more that pin down matching (normalized, prefix of another), and
      texts that use them.

It also checks the tokenizer against transformers' own Qwen2TokenizerFast built from the
same folder, and the template against the spec's rendered example.

    tools/reference/.venv/bin/python tools/reference/make_tokenizer_goldens.py \
        [--vocab tools/mkmodel/vocab/qwen2] [--out tests/golden/tokenizer]
"""
import argparse
import json
import os
import random
import sys
import unicodedata

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# docs/specs/qwen2_5_vl.md §5.6, verbatim (its line breaks are literal "\n" characters).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content or "
    "'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
SPEC_EXAMPLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                "<|image_pad|><|vision_end|>Describe this image.<|im_end|>\n<|im_start|>assistant\n")


def build_tokenizer(vocab_dir, config_path=None):
    """The reference tokenizer: BPE from vocab.json + merges.txt, the Qwen2 pipeline, and the
    added tokens of tokenizer_config.json (or config_path) in id order."""
    model = models.BPE.from_file(os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt"),
                                 unk_token=None, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    with open(config_path or os.path.join(vocab_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens_decoder"]
    for id_str, a in sorted(added.items(), key=lambda kv: int(kv[0])):
        t = AddedToken(a["content"], single_word=a["single_word"], lstrip=a["lstrip"], rstrip=a["rstrip"],
                       normalized=a["normalized"], special=a["special"])
        (tok.add_special_tokens if a["special"] else tok.add_tokens)([t])
        if tok.token_to_id(a["content"]) != int(id_str):
            sys.exit(f"added token {a['content']!r}: id {tok.token_to_id(a['content'])}, expected {id_str}")
    return tok


# ---- the corpus ------------------------------------------------------------------------

WORDS = [
    # Latin scripts, with diacritics
    "Hello", "world", "the", "quick", "brown", "fox", "jumps", "über", "Straße", "naïve", "café", "façade",
    "Ångström", "smörgåsbord", "Łódź", "Žluťoučký", "kůň", "İstanbul", "ığdır", "Ærøskøbing", "Þingvellir",
    "señor", "niño", "São", "Paulo", "coração", "Việt", "Nam", "Tiếng", "được", "ơn", "Dziękuję", "Ελλάδα",
    "καλημέρα", "Ὀδυσσεύς", "Привет", "мир", "Ёлка", "съешь", "ещё", "Україна", "ґанок", "Беларусь",
    "Բարեւ", "Հայաստան", "გამარჯობა", "שָׁלוֹם", "עברית", "مرحبا", "العربية", "بِسْمِ", "اللَّهِ", "فارسی",
    "اردو", "नमस्ते", "हिन्दी", "क्षत्रिय", "বাংলা", "ਪੰਜਾਬੀ", "ગુજરાતી", "ଓଡ଼ିଆ", "தமிழ்", "తెలుగు", "ಕನ್ನಡ",
    "മലയാളം", "සිංහල", "ไทย", "สวัสดี", "ພາສາລາວ", "ཀྲུང་གོ", "မြန်မာ", "ខ្មែរ", "ᠮᠣᠩᠭᠣᠯ", "ኢትዮጵያ", "ᏣᎳᎩ",
    "ᐃᓄᒃᑎᑐᑦ", "ꦧꦱꦗꦮ", "中文", "你好", "世界", "汉字", "漢字", "繁體中文", "日本語", "こんにちは", "カタカナ",
    "ﾊﾝｶｸ", "ひらがな", "한국어", "안녕하세요", "조선글", "Ｆｕｌｌｗｉｄｔｈ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "𝐁𝐨𝐥𝐝", "ﬁnance",
    "Ǆemal", "ǅ", "ǆ", "ŉ", "ß", "ẞ", "K", "Å", "Ω", "ſtraße", "Ⅻ", "ⅻ", "µ", "ª", "º",
]

CODE = [
    "int main(void) { return 0; }", "for (size_t i = 0; i < n; i++) {\n    sum += a[i];\n}",
    "def f(x):\n    return x ** 2  # square\n", "if __name__ == '__main__':\n\tmain()",
    '{"key": [1, 2.5, -3e10, true, null], "s": "a\\"b"}', "<div class=\"x\">&nbsp;&lt;</div>",
    "SELECT * FROM t WHERE id >= 42 AND name LIKE '%foo%';", "$ ls -la | grep -E '^d' > /tmp/out 2>&1",
    "x = y->next ? *p++ : ~0u >> 3;", "std::vector<std::string> v{\"a\", \"b\"};", "fn main() -> Result<(), E> {}",
    "regex: ^(?:[a-z0-9!#$%&'*+/=?^_`{|}~-]+)$", "    \n    \n\t\t\n", "a==b!=c<=d>=e&&f||g", "1+2*3/4-5%6",
    "#include <stdio.h>\r\n#define MAX 1024\r\n", "https://example.com/path?q=1&r=%20x#frag", "user@example.org",
    "C:\\Windows\\System32\\drivers", "0x7fffffff 0b1010 0o777 1_000_000 3.14159e-10", "'''docstring'''",
    "// comment\n/* block */", "lambda x: x[::-1]", "console.log(`template ${x}`);", "@@ -1,3 +1,4 @@",
]

EMOJI = [
    "😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "🧑🏿‍🚀", "🏳️‍🌈", "🏴‍☠️", "🇯🇵", "🇺🇸🇬🇧", "❤️", "❤", "✅", "☺️", "1️⃣", "#️⃣",
    "👩🏻‍❤️‍💋‍👨🏼", "🙇‍♀️", "🧔‍♂️", "🐻‍❄️", "😶‍🌫️", "🫠", "🫶🏾", "🦀", "🀄", "🃏", "🌍🌎🌏", "⚡", "©", "®", "™",
    "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "👁‍🗨", "🤷🏼‍♂️", "💁🏽‍♀️",
]

DIGITS = [
    "0", "7", "42", "123", "2024", "3.14159", "1,234,567", "٠١٢٣٤٥٦٧٨٩", "۱۲۳", "०१२३", "০১২", "๑๒๓",
    "１２３", "²³", "₁₂", "½", "¾", "⅓", "Ⅻ", "ⅻ", "①②③", "𝟏𝟐𝟑", "一二三", "〇", "1st", "2nd", "10km",
    "00000000", "1234567890" * 3, "9" * 50, "+1-555-0100", "v1.2.3-rc4",
]

SPACES = [" ", "  ", "   ", " " * 17, " " * 64, "\t", "\t\t", " \t ", "\n", "\n\n", "\n\n\n\n", "\r\n", "\r\n\r\n",
          "\r", " \n", "\n ", "  \n  ", "\u00a0", "\u3000", "\u2028", "\u2029", "\u0085", "\u180e", "\u200b",
          "\u2003", "\u202f", "\u205f", "\u1680", "\x0b", "\x0c", "\x1c", "\x1f", "\ufeff", " \u00a0 ", "\t\n\t"]

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
           "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
           "<|im_", "<|im_end|", "|im_end|>", "<|IM_END|>", "< |im_end|>", "<<|im_end|>>", "<|im_start|><|im_end|>",
           "<tool_call></tool_call>", "<|endoftext|>\u0338", "<|im_end|>\u0301", "<think>", "<BOV>"]

CONTRACTIONS = ["don't", "DON'T", "it's", "IT'S", "It'S", "we'll", "WE'LL", "I'd", "you're", "they've", "I'm",
                "'s", "'S", "'t", "'re", "'ve", "'m", "'ll", "'d", "'D", "'ſ", "''s", "’s", "it’s", "o'clock",
                "rock'n'roll", "'", "''", "'x", "Y'all'd've"]

COMBINING = ["e\u0301", "e\u0301\u0302", "a\u0308", "o\u0303\u0304", "\u0301", "\u0301abc", "n\u0303o",
             "\u1100\u1161\u11a8", "\u1100\u1161", "\u110b\u1173\u11ab", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d",
             "q\u0307\u0323", "\u0915\u094d\u0937", "\u05e9\u05c1\u05b8", "A\u030a", "\u212b", "\u2126", "\u00c5",
             "\u1e9b\u0323", "\u0344", "\u0340", "\u0958", "\uf900", "\u2000", "\u037e", "\u0387", "\u1f71",
             ">\u0338", "=\u0338", "\u304b\u3099", "\u30cf\u309a", "\uac00\u11a8", "\u0e4d\u0e32"]

NEWER = ["\U00031350\U00031351", "\U00011f04\U00011f05", "\U0001e030", "\U0001f6dc", "\U0002ebf0",
         "\u1c89\u1c8a", "\U00010d50", "\U0001fae8", "\u0cf3", "\U0001b132", "\U000e0030", "\U0010ffff", "\U000f0000"]

INVALID = [b"\xff", b"\x80", b"\xbf\xbf", b"\xc0\xaf", b"\xc1\xbf", b"\xe0\x80\xaf", b"\xe0\x9f\xbf", b"\xed\xa0\x80",
           b"\xed\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfc\x84\x80\x80\x80\x80",
           b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98", b"\xfe\xfe\xff\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc",
           b"\xf0\x9f\x98\x80\x80", b"\xe2\x82\xac\xac", b"\xed\x9f\xbf", b"\xef\xbf\xbd", b"\x00", b"\xc2\x80",
           b"\xf0\x90\x80", b"\xe1\x80"]

SENTENCES = [
    "Hello world", " Hello world", "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "The quick brown fox jumps over the lazy dog.", "Il était une fois, dans un pays lointain…",
    "Der Äpfel-Baum steht im Garten; die Straße ist naß.", "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "我能吞下玻璃而不伤身体。", "私はガラスを食べられます。それは私を傷つけません。", "나는 유리를 먹을 수 있어요. 그래도 아프지 않아요.",
    "أنا قادر على أكل الزجاج و هذا لا يؤلمني.", "मैं काँच खा सकता हूँ और मुझे उससे कोई चोट नहीं पहुंचती.",
    "Τὴ γλῶσσα μοῦ ἔδωσαν ἑλληνικὴ", "ฉันกินกระจกได้ แต่มันไม่ทำให้ฉันเจ็บ", "Tôi có thể ăn thủy tinh mà không hại gì.",
    "Describe this image.", "What kind of dog is this?", "You are a helpful assistant.",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "Line one.\r\nLine two.\r\n\r\nLine four.", "tabs\tand\tmore\t\ttabs", "trailing spaces   ", "   leading",
    "MiXeD CaSe WoRdS", "ALL CAPS SENTENCE!!!", "!!!!!!", "...", "—", "–-—", "«quotes»", "„Anführungszeichen“",
    "¿Qué? ¡Sí!", "a\u00adb", "e.g. i.e. etc.", "$100 €200 £300 ¥400 ₹500 ₿", "50% off!!!", "#hashtag @mention",
]

RANGES = [(0x20, 0x7e), (0xa0, 0x24f), (0x250, 0x2ff), (0x300, 0x36f), (0x370, 0x3ff), (0x400, 0x4ff), (0x530, 0x58f),
          (0x590, 0x5ff), (0x600, 0x6ff), (0x900, 0x97f), (0x980, 0x9ff), (0xb80, 0xbff), (0xe00, 0xe7f), (0x1100, 0x11ff),
          (0x1e00, 0x1fff), (0x2000, 0x206f), (0x2070, 0x209f), (0x2100, 0x218f), (0x2190, 0x22ff), (0x2460, 0x24ff),
          (0x3000, 0x303f), (0x3040, 0x30ff), (0x3130, 0x318f), (0x4e00, 0x9fff), (0xac00, 0xd7a3), (0xe000, 0xe0ff),
          (0xf900, 0xfaff), (0xfb00, 0xfdff), (0xfe00, 0xfe6f), (0xff00, 0xffef), (0xfff0, 0xffff), (0x10000, 0x1ffff),
          (0x1f300, 0x1faff), (0x20000, 0x2a6df), (0x2f800, 0x2fa1f), (0xe0000, 0xe007f)]


def random_soup(rng, n):
    out = []
    for _ in range(n):
        lo, hi = rng.choice(RANGES)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def random_wide(rng):
    """Any code point (unassigned and private use too), with ASCII, spaces, marks and added
    tokens mixed in: where Unicode table versions differ between implementations."""
    out = []
    for _ in range(rng.randint(1, 30)):
        r = rng.random()
        if r < 0.3:
            out.append(chr(rng.randint(0x20, 0x7E)))
        elif r < 0.4:
            out.append(rng.choice(" \t\n\r\u00a0\u3000\u2028\u0085\u180e\u200b\x0b\x0c"))
        elif r < 0.5:
            out.append(chr(rng.randint(0x300, 0x36F)))
        elif r < 0.55:
            out.append(rng.choice(SPECIAL + CONTRACTIONS + COMBINING))
        else:
            cp = 0xD800
            while 0xD800 <= cp <= 0xDFFF:
                cp = rng.randint(0, 0x10FFFF) if rng.random() < 0.3 else rng.randint(0, 0x2FFFF)
            out.append(chr(cp))
    return "".join(out)


def corpus():
    """Deterministic list of str (valid) and bytes (raw, may be invalid UTF-8) entries."""
    items = []
    items += SENTENCES + WORDS + CODE + EMOJI + DIGITS + SPACES + SPECIAL + CONTRACTIONS + COMBINING + NEWER
    items += [unicodedata.normalize("NFD", w) for w in WORDS + SENTENCES if unicodedata.normalize("NFD", w) != w]
    items += [" " + w for w in WORDS] + [w + " " for w in CODE[:8]] + ["\n" + w + "\n" for w in WORDS[::3]]
    items += [b"abc" + bad + b"def" for bad in INVALID] + INVALID + [bad + bad for bad in INVALID[::2]]
    items += [" " * n + "x" for n in range(1, 20)] + ["x" + " " * n for n in range(1, 20)]
    items += ["\n" * n + " " * m + "y" for n in range(1, 4) for m in range(0, 4)]
    items += ["1" * n for n in range(1, 13)] + ["a" * n for n in (1, 2, 3, 5, 8, 13, 40, 100, 300)]
    items += ["".join(SPECIAL[i % len(SPECIAL)] + w for i, w in enumerate(WORDS[k:k + 4])) for k in range(0, 60, 4)]
    items += ["", " ", "\x00", "a\x00b", "\x00\x00"]

    rng = random.Random(20260426)
    pools = [WORDS, CODE, EMOJI, DIGITS, SPACES, SPECIAL, CONTRACTIONS, COMBINING, SENTENCES, NEWER]
    seps = ["", " ", "  ", "\n", "\r\n", "\t", ", ", "。", "'", "\u00a0", " \n"]
    while len(items) < 2400:
        kind = rng.random()
        if kind < 0.15:
            items.append(random_soup(rng, rng.randint(1, 40)))
        elif kind < 0.22:
            parts = [rng.choice(rng.choice(pools)).encode() for _ in range(rng.randint(1, 4))]
            parts.insert(rng.randint(0, len(parts)), rng.choice(INVALID))
            items.append(b"".join(parts))
        else:
            parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 6))]
            items.append("".join(p + rng.choice(seps) for p in parts))
    items += [random_wide(rng) for _ in range(1500)]
    return items


def corpus_goldens(tok, items):
    rows, nfc_exceptions = [], 0
    for it in items:
        if isinstance(it, bytes):
            try:
                text = it.decode("utf-8")
                row = {"text": text}
            except UnicodeDecodeError:
                text = it.decode("utf-8", "replace")
                row = {"hex": it.hex()}
        else:
            text = it
            row = {"text": text}
        ids = tok.encode(text, add_special_tokens=False).ids
        row["ids"] = ids
        row["decoded"] = tok.decode(ids, skip_special_tokens=False)
        skip = tok.decode(ids, skip_special_tokens=True)
        if skip != row["decoded"]:
            row["decoded_skip"] = skip
        row["nfc_roundtrip"] = row["decoded"] == unicodedata.normalize("NFC", text)
        nfc_exceptions += not row["nfc_roundtrip"]
        rows.append(row)
    return rows, nfc_exceptions


def cross_check(vocab_dir, tok, items):
    """transformers' own Qwen2TokenizerFast, converted from the same files, must agree."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(vocab_dir)
    bad = 0
    for it in items:
        text = it.decode("utf-8", "replace") if isinstance(it, bytes) else it
        if hf.encode(text, add_special_tokens=False) != tok.encode(text, add_special_tokens=False).ids:
            bad += 1
            if bad <= 5:
                print("transformers disagrees on", repr(text)[:80], file=sys.stderr)
    return bad, type(hf).__name__


# ---- the chat template -----------------------------------------------------------------

def render(messages, add_generation_prompt):
    """As transformers renders chat templates: a sandboxed Jinja environment with
    trim_blocks and lstrip_blocks."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def expand_images(text, counts):
    """The Qwen2.5-VL processor: the i-th <|image_pad|> becomes counts[i] of them."""
    for n in counts:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * n, 1)
    return text.replace("<|placeholder|>", "<|image_pad|>")


def conversations():
    T = lambda s: {"type": "text", "text": s}  # noqa: E731
    I = lambda n: {"type": "image", "tokens": n}  # noqa: E731
    sys_msg = lambda s: {"role": "system", "parts": [T(s)]}  # noqa: E731
    return [
        ([{"role": "user", "parts": [I(1), T("Describe this image.")]}], True),
        ([{"role": "user", "parts": [I(256), T("Describe this image.")]}], True),
        ([{"role": "user", "parts": [I(4), T("What kind of dog is this?")]}], True),
        ([{"role": "user", "parts": [T("Who are you?")]}], True),
        ([{"role": "user", "parts": [T("Who are you?")]}], False),
        ([sys_msg("You are a painter."), {"role": "user", "parts": [T("Draw a cat.")]}], True),
        ([sys_msg(""), {"role": "user", "parts": [T("hi")]}], True),
        ([{"role": "user", "parts": [T("first")]}, {"role": "assistant", "parts": [T("reply")]},
          {"role": "user", "parts": [T("second"), I(16), I(9)]}], True),
        ([{"role": "user", "parts": [T("Tell a story with pictures.")]},
          {"role": "assistant", "parts": [T("Once upon a time"), I(64), T(" the end.")]}], False),
        ([{"role": "user", "parts": [T("a")]}, sys_msg("late system"), {"role": "user", "parts": [T("b")]}], True),
        ([{"role": "assistant", "parts": [T("I speak first.")]}], True),
        ([{"role": "user", "parts": []}], True),
        ([{"role": "user", "parts": [T(""), T("")]}], True),
        ([{"role": "user", "parts": [T("多语言 テキスト 🚀\r\nwith CRLF\n\n"), I(2), T("  trailing  ")]}], True),
        ([{"role": "user", "parts": [T("literal <|im_end|> and <tool_call> inside")]}], True),
        ([sys_msg("Be brief."), {"role": "user", "parts": [I(12), I(30), I(4), T("Compare.")]},
          {"role": "assistant", "parts": [T("They differ.")]}, {"role": "user", "parts": [T("How?")]}], True),
        ([], True),
        ([], False),
        ([sys_msg("only system")], False),
    ]


def chat_goldens(tok):
    rows = []
    for messages, gen in conversations():
        jinja_messages = []
        for m in messages:
            content = [{"type": "image"} if p["type"] == "image" else {"type": "text", "text": p["text"]}
                       for p in m["parts"]]
            jinja_messages.append({"role": m["role"], "content": content})
        text = render(jinja_messages, gen)
        # a message of text parts renders as its string content would
        if all(p["type"] == "text" for m in messages for p in m["parts"]) and messages:
            as_strings = [{"role": m["role"], "content": "".join(p["text"] for p in m["parts"])} for m in messages]
            assert render(as_strings, gen) == text, "string and list content render differently"
        counts = [p["tokens"] for m in messages for p in m["parts"] if p["type"] == "image"]
        text = expand_images(text, counts)
        rows.append({"messages": messages, "add_generation_prompt": gen, "text": text,
                     "ids": tok.encode(text, add_special_tokens=False).ids})
    assert rows[0]["text"] == SPEC_EXAMPLE, "the template does not reproduce the spec's example"
    return rows


# Added tokens beyond Qwen's, the way a DuoGen package adds <BOV>, plus a normalized
# (non-special) one and one that is a prefix of another, to pin down matching.
EXTRA_TOKENS = [
    (151665, {"content": "<BOV>", "special": True, "normalized": False}),
    (151666, {"content": "A\u030angstro\u0308m", "special": False, "normalized": True}),
    (151667, {"content": "<BO", "special": False, "normalized": False}),
]
EXTRA_TEXTS = ["a<BOV>b", "<BO", "<BOV", "<BOV><BOV>", "<BO<BOV>V>", "\u00c5ngstr\u00f6m", "A\u030angstro\u0308m",
               "x\u00c5ngstr\u00f6mx", "<BOV>\u0301", "<BO\u0301", " <BOV> ", "<|im_end|><BOV><|im_start|>",
               "\u00c5ngstr\u00f6m\u0301", "text before<BOV>"]


def extra_goldens(vocab_dir, out_dir):
    """A tokenizer_config.json with the extra tokens, and goldens of texts that use them."""
    with open(os.path.join(vocab_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    added = cfg["added_tokens_decoder"]
    for id_, t in EXTRA_TOKENS:
        added[str(id_)] = dict(t, lstrip=False, rstrip=False, single_word=False)
    config_path = os.path.join(out_dir, "extra_tokenizer_config.json")
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump({"added_tokens_decoder": added}, f, ensure_ascii=True, indent=1)
        f.write("\n")
    tok = build_tokenizer(vocab_dir, config_path)
    rows = []
    for text in EXTRA_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        rows.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                     "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    return rows


def unicode_classes(tok):
    """How the reference's pre-tokenizer regex (Oniguruma, with its own Unicode version)
    classes every code point: L (\\p{L}), N (\\p{N}), W (\\s) or O (other), found from where
    its first piece ends in two probe texts, X + "!" and " " + X + "\\n":
      L: X | " X"    N: X | " "    W: X | " X\\n"    O: "X!" | " X\\n"
    Returns run-length lines "first last class" (hex code points)."""
    pre = tok.pre_tokenizer
    runs = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        x = chr(cp)
        a = pre.pre_tokenize_str(x + "!")[0][1][1]
        b = pre.pre_tokenize_str(" " + x + "\n")[0][1][1]
        cls = {(1, 2): "L", (1, 1): "N", (1, 3): "W", (2, 3): "O"}[(a, b)]
        if runs and runs[-1][2] == cls and runs[-1][1] == cp - 1:
            runs[-1][1] = cp
        elif runs and runs[-1][2] == cls and runs[-1][1] == 0xD7FF and cp == 0xE000:
            runs[-1][1] = cp   # one run across the surrogates
        else:
            runs.append([cp, cp, cls])
    return [f"{a:x} {b:x} {c}" for a, b, c in runs]


def nfc_goldens(tok):
    """The reference's NFC, which has its own (older) Unicode tables:
    - "combining": the code points it reorders as non-starters, as hex runs, found by
      probing "\\u0345" + X (ccc 240 before X) and X + "\\u0300" (ccc 230 after X);
    - "cases": every canonical decomposition of Python's unicodedata as input, both the
      composed code point and its decomposed sequence, with the reference's NFC of each."""
    nfc = tok.normalizer
    runs = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        x = chr(cp)
        a, b = nfc.normalize_str("\u0345" + x), nfc.normalize_str(x + "\u0300")
        if (a != "\u0345" + x and a.endswith("\u0345")) or (x != "\u0300" and b.startswith("\u0300")):
            if runs and runs[-1][1] == cp - 1:
                runs[-1][1] = cp
            else:
                runs.append([cp, cp])
    cases = []
    for cp in range(0x110000):
        d = unicodedata.decomposition(chr(cp)) if not 0xD800 <= cp <= 0xDFFF else ""
        if d and not d.startswith("<"):
            for text in (chr(cp), "".join(chr(int(h, 16)) for h in d.split())):
                cases.append({"text": text, "nfc": nfc.normalize_str(text)})
    return {"combining": [f"{a:x}-{b:x}" for a, b in runs], "cases": cases}


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=True, separators=(",", ":")) + "\n")
    print(f"{path}: {len(rows)} rows, {os.path.getsize(path)} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", default="tools/mkmodel/vocab/qwen2")
    ap.add_argument("--out", default="tests/golden/tokenizer")
    ap.add_argument("--no-cross-check", action="store_true")
    a = ap.parse_args()
    import tokenizers
    print(f"tokenizers {tokenizers.__version__}, Python unicodedata {unicodedata.unidata_version}")
    tok = build_tokenizer(a.vocab)
    items = corpus()
    os.makedirs(a.out, exist_ok=True)
    rows, nfc_exceptions = corpus_goldens(tok, items)
    print(f"corpus: {len(rows)} strings, {sum(len(r['ids']) for r in rows)} ids, "
          f"{nfc_exceptions} where decode(encode(x)) != NFC(x)")
    write_jsonl(os.path.join(a.out, "corpus.jsonl"), rows)
    write_jsonl(os.path.join(a.out, "chat.jsonl"), chat_goldens(tok))
    write_jsonl(os.path.join(a.out, "extra.jsonl"), extra_goldens(a.vocab, a.out))
    path = os.path.join(a.out, "nfc.json")
    with open(path, "w", encoding="ascii") as f:
        json.dump(nfc_goldens(tok), f, ensure_ascii=True, separators=(",", ":"))
        f.write("\n")
    print(f"{path}: {os.path.getsize(path)} bytes")
    path = os.path.join(a.out, "unicode_classes.txt")
    with open(path, "w", encoding="ascii") as f:
        f.write("".join(line + "\n" for line in unicode_classes(tok)))
    print(f"{path}: {os.path.getsize(path)} bytes")
    if not a.no_cross_check:
        bad, name = cross_check(a.vocab, tok, items)
        print(f"cross-check with transformers {name}: {bad} of {len(items)} differ")
        if bad:
            sys.exit(1)


if __name__ == "__main__":
    main()
