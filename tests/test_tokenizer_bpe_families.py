"""Qwen 2 and Llama 3 style byte-level BPE vocabularies, built in the test: a BPE is trained with HF
`tokenizers` on a small multilingual corpus using the family's pre-tokenizer regex, written into a GGUF
with the `gguf` package (tokens, types, merges, pre-type, special tokens), and then loaded three ways:

* ours: `Tokenizer.from_metadata(load_metadata(file))`;
* transformers: `AutoTokenizer.from_pretrained(dir, gguf_file=name)` on the same file;
* a `tokenizers.Tokenizer` built directly from the trained vocabulary with the family's documented
  pre-tokenizer (Split on the regex, isolated, then ByteLevel without its own regex) and, for Llama 3,
  `ignore_merges=True` as Meta's tokenizer.json has it.

For Qwen 2 all three agree. For Llama 3, transformers' GGUF converter builds its BPE without
ignore_merges (llama.cpp sets it for the llama-bpe pre-type), so we compare with the direct object, and
check that transformers agrees with that same object built without ignore_merges - the planted whole-word
token below is where the two differ.
"""

from __future__ import annotations

import json
import random

import pytest

from dllp2p.formats import load_metadata
from dllp2p.tokenizer import BYTE_TO_CHAR, StreamDecoder, Tokenizer
from dllp2p.vocab import _LLAMA3, _QWEN2
from test_tokenizer import FRAGMENTS, sample_texts

tokenizers = pytest.importorskip("tokenizers")

EXTRA = [
    "I'M HERE, YOU'RE THERE, it's theirs",
    "abc123456def 1234567 12 3",
    "  \n\n  x",
    "!!!\n\n",
    "  leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\tmore",
    "\r\n\r\nwindows\r\n",
    "Supercalifragilisticexpialidocious" * 3,
    "x" * 400,
    "🤖" * 30,
    "def f(a, b):\n    return {'k': [a, b]}\n\n\nprint(f(1, 2))",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<|eot_id|><|eot_id|><|end_of_text|>",
    "<|im_start",
    "word zyxwvutsrq other",  # the planted whole-word token, see PLANTED
]
# A token added to the Llama 3 style vocabulary without the merges that would build it: with
# ignore_merges a pre-token spelled exactly like it becomes this one token, without it the merges' pieces.
PLANTED = "Ġzyxwvutsrq"

CONTROL = {
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama-bpe": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}
REGEX = {"qwen2": _QWEN2, "llama-bpe": _LLAMA3}


def training_corpus() -> list[str]:
    rng = random.Random(11)
    words = " ".join(FRAGMENTS).split()
    lines = sample_texts(seed=5, mixes=300)
    lines += [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(600)]
    return lines


def make_texts() -> list[str]:
    rng = random.Random(4)
    texts = sample_texts(seed=77, mixes=170) + EXTRA
    pool = FRAGMENTS + EXTRA
    for _ in range(30):
        texts.append("".join(p + rng.choice(["", " ", "\n"]) for p in rng.sample(pool, rng.randint(2, 4))))
    return list(dict.fromkeys(texts))


TEXTS = make_texts()


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(REGEX[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _reference(vocab: dict[str, int], merges: list[tuple[str, str]], pre: str, ignore_merges: bool):
    """The family's tokenizer as tokenizer.json describes it, built directly."""
    from tokenizers import AddedToken, Tokenizer as RawTokenizer, decoders, models

    raw = RawTokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    raw.pre_tokenizer = _pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in CONTROL[pre]])
    return raw


@pytest.fixture(scope="module", params=["qwen2", "llama-bpe"])
def family(request, tmp_path_factory):
    """(pre, gguf path, vocab, merges) for a BPE trained with the family's regex."""
    import gguf
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, trainers

    pre = request.param
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = _pre_tokenizer(pre)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1200, min_frequency=2, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    raw.train_from_iterator(training_corpus(), trainer)
    model = raw.get_vocab()
    merges = [tuple(m) for m in json.loads(raw.to_str())["model"]["merges"]]
    tokens = [t for t, _ in sorted(model.items(), key=lambda kv: kv[1])]
    if pre == "llama-bpe":
        tokens.append(PLANTED)
    n_normal = len(tokens)
    tokens += CONTROL[pre]
    vocab = {t: i for i, t in enumerate(tokens[:n_normal])}

    arch = "qwen2" if pre == "qwen2" else "llama"
    path = tmp_path_factory.mktemp(pre) / f"{pre}-vocab.gguf"
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"{pre} style BPE vocabulary trained in a test (no weights)")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * n_normal + [3] * len(CONTROL[pre]))
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    if pre == "qwen2":
        w.add_bos_token_id(tokens.index("<|endoftext|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
    else:
        w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
        w.add_eos_token_id(tokens.index("<|end_of_text|>"))
        w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return pre, path, vocab, merges


@pytest.fixture(scope="module")
def ours(family) -> Tokenizer:
    return Tokenizer.from_metadata(load_metadata(family[1]))


@pytest.fixture(scope="module")
def hf(family):
    transformers = pytest.importorskip("transformers")
    path = family[1]
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _with_bos(tok: Tokenizer, ids: list[int]) -> list[int]:
    return ([tok.bos_id] if tok.add_bos else []) + ids


def test_corpus_size():
    assert len(TEXTS) >= 200


def test_encode_matches_the_familys_tokenizer(family, ours):
    pre, _, vocab, merges = family
    reference = _reference(vocab, merges, pre, ignore_merges=pre == "llama-bpe")
    bad = [t for t in TEXTS if ours.encode(t) != _with_bos(ours, reference.encode(t).ids)]
    assert not bad, f"{len(bad)} of {len(TEXTS)} differ, first: {bad[:3]}"


def test_encode_matches_transformers_gguf(family, ours, hf):
    pre, _, vocab, merges = family
    if pre == "qwen2":
        bad = [t for t in TEXTS if ours.encode(t) != hf.encode(t)]
        assert not bad, f"{len(bad)} of {len(TEXTS)} differ, first: {bad[:3]}"
        return
    # transformers' GGUF path builds a GPT2Tokenizer, whose default unk/bos/eos '<|endoftext|>' it adds as
    # an extra special token although this vocabulary has none: texts spelling it are left out here
    texts = [t for t in TEXTS if "<|endoftext|>" not in t]
    assert len(texts) >= 200
    # and it builds Llama 3 without ignore_merges: it is the documented regex + plain merges
    plain = _reference(vocab, merges, pre, ignore_merges=False)
    assert all(hf.encode(t) == _with_bos(ours, plain.encode(t).ids) for t in texts)
    differ = [t for t in texts if ours.encode(t) != hf.encode(t)]
    assert differ and all(PLANTED[1:] in t for t in differ)
    planted = ours.token_id(PLANTED)
    assert ours.encode(" zyxwvutsrq", add_bos=False) == [planted]
    assert planted not in hf.encode(" zyxwvutsrq")


def test_pre_tokenizer_matches_hf_split(family, ours):
    from tokenizers import Regex, pre_tokenizers

    split = pre_tokenizers.Split(Regex(REGEX[family[0]]), behavior="isolated")
    for text in TEXTS:
        assert ours.pre_tokenize(text) == [piece for piece, _ in split.pre_tokenize_str(text)], text


def test_decode_and_round_trip(ours, hf):
    for text in TEXTS:  # (an '<|endoftext|>' HF added itself, see above, never shows up in our ids)
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special=False) == hf.decode(ids, skip_special_tokens=False), text
        # byte-level BPE spells every byte: decoding gives the text back exactly
        assert ours.decode(ours.encode(text, add_bos=False, parse_special=False), skip_special=False) == text


def test_stream_decoder_never_splits_a_character(ours):
    text = "Emoji 👨‍👩‍👧‍👦🏳️‍🌈 and 日本語のテキスト, rare 𓀀𓀁ꙮ ok 🤖!"  # the rare glyphs are byte pieces
    decoder = StreamDecoder(ours)
    chunks = [decoder.push(i) for i in ours.encode(text)] + [decoder.flush()]
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks[:-1]


def test_special_tokens_and_end_of_turn(family, ours):
    pre = family[0]
    if pre == "qwen2":
        assert not ours.add_bos and ours.eos_id == ours.token_id("<|im_end|>")
        assert ours.encode("<|im_start|>user")[0] == ours.token_id("<|im_start|>")
    else:
        assert ours.add_bos and ours.encode("hi")[0] == ours.token_id("<|begin_of_text|>")
        assert ours.token_id("<|eot_id|>") in ours.encode("x<|eot_id|>")
    assert BYTE_TO_CHAR[0x20] == "Ġ"


# --- every pre-type in the table: its regexes vs HF's (Oniguruma) Split on the same corpus ---


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama3", "dbrx", "qwen2", "stablelm2", "tekken", "gpt-4o"])
def test_pre_types_split_like_hf(pre):
    from tokenizers import Regex, pre_tokenizers

    from dllp2p.vocab import _PRE_TOKENIZERS

    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_TOKENIZERS[pre]]
    theirs = pre_tokenizers.Sequence(splits) if len(splits) > 1 else splits[0]
    ours = Tokenizer.from_metadata(
        {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": BYTE_TO_CHAR,
         "tokenizer.ggml.merges": []}
    )
    for text in TEXTS:
        assert ours.pre_tokenize(text) == [piece for piece, _ in theirs.pre_tokenize_str(text)], text


@pytest.mark.parametrize("pre", ["deepseek-llm", "deepseek-v3", "chameleon", "bloom", "Qwen2", "llama"])
def test_pre_types_we_do_not_implement_are_refused(pre):
    from dllp2p.tokenizer import TokenizerError

    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": BYTE_TO_CHAR,
          "tokenizer.ggml.merges": []}
    with pytest.raises(TokenizerError, match=f"unsupported tokenizer pre-type '{pre}'"):
        Tokenizer.from_metadata(md)


@pytest.mark.parametrize("pre,add_bos", [("llama-bpe", True), ("tekken", True), ("qwen2", False), ("gpt2", False)])
def test_bos_default_without_the_key_follows_llama_cpp(pre, add_bos):
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": BYTE_TO_CHAR + ["<s>"],
          "tokenizer.ggml.token_type": [1] * 256 + [3], "tokenizer.ggml.merges": [], "tokenizer.ggml.bos_token_id": 256}
    assert Tokenizer.from_metadata(md).add_bos is add_bos
    assert Tokenizer.from_metadata({**md, "tokenizer.ggml.add_bos_token": not add_bos}).add_bos is not add_bos


ODD_PIECES = list(" \n\t\r  abcXYZ019'.,-_<>|/[]") + [
    "'s", "'S", "'ll", "'LL", "'ſ", "<|im_start|>", "<|eot_id|>", "\u00a0", "\u3000", "é", "ß", "日", "😀", "👍🏽",
    "\u200d", "\ufeff", "ـ", "ا", "\x00", "\x1f", "𓀀", "Ǆ", "ǅ", "ſ", "K", "①", "²", "١٢٣", "\u0301", "ÀB", "aB",
    "ABc", "İ", "ﬁ", "the", " the", "hello", "tokenization", "Straße", "日本語", "12345", " zyxwvutsrq",
]


def random_mixes(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ODD_PIECES) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def test_random_mixes_match_the_familys_tokenizer(family, ours):
    pre, _, vocab, merges = family
    reference = _reference(vocab, merges, pre, ignore_merges=pre == "llama-bpe")
    texts = random_mixes(seed=1, n=1000)
    bad = [t for t in texts if ours.encode(t) != _with_bos(ours, reference.encode(t).ids)]
    assert not bad, f"{len(bad)} of {len(texts)} differ, first: {bad[:3]}"


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama3", "qwen2", "tekken", "gpt-4o"])
def test_pre_types_split_random_mixes_like_hf(pre):
    from tokenizers import Regex, pre_tokenizers

    from dllp2p.vocab import _PRE_TOKENIZERS

    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in _PRE_TOKENIZERS[pre]]
    theirs = pre_tokenizers.Sequence(splits) if len(splits) > 1 else splits[0]
    ours = Tokenizer.from_metadata(
        {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": BYTE_TO_CHAR,
         "tokenizer.ggml.merges": []}
    )
    for text in random_mixes(seed=2, n=2000):
        assert ours.pre_tokenize(text) == [piece for piece, _ in theirs.pre_tokenize_str(text)], text
