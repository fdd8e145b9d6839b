"""The GGUF-metadata tokenizer vs independent oracles: HF tokenizers on the real SmolLM2 vocabulary,
sentencepiece on a freshly trained model, and hand-worked ids on a tiny SentencePiece-style vocabulary."""

from __future__ import annotations

import io
import random
import time

import pytest

from dllp2p.formats import load_metadata
from dllp2p.tokenizer import BYTE_TO_CHAR, StreamDecoder, Tokenizer, TokenizerError

# --- a deterministic corpus: every kind of text the pre-tokenizer and merges must get right ---

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It's a test; they're here, we've seen it, I'd say I'll go, I'm done.",
    "IT'S LOUD, DON'T SHOUT, WE'RE FINE",
    "Hello world",
    "A sentence ending without punctuation",
    "tokenization",
]
UNICODE = [
    "Café naïve résumé façade",
    "Größe Straße Æsir œuvre",
    "日本語のテキストです。",
    "中文文本测试，标点符号。",
    "한국어 텍스트",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "שלום עולם",
    "ελληνικά γράμματα",
    "हिन्दी पाठ",
    "ภาษาไทย",
    "e\u0301 combining accent",
    "zero\u200bwidth and\ufeffbom",
]
EMOJI = ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇯🇵🇫🇷", "🧑🏿‍💻", "🤖🤖🤖"]
WHITESPACE = ["  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u2028"]
WHITESPACE += ["a\x1cb\x1f"]  # ASCII separators: not whitespace to either regex engine
NUMBERS = ["0", "42", "3.14159", "1,000,000", "12345678901234567890", "2024-05-01", "٣٤٥", "½ ²", "x1 y22 z333"]
CODE = [
    "def foo(x):\n    return x * 2\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    '<div class="x">&amp;</div>',
    "SELECT * FROM t WHERE id = 1;",
    "#include <stdio.h>",
    "$x = @array[0] || 'default';",
    "if x:\n\tpass\n\telse:  # comment\n",
]
PUNCTUATION = ["!!!", "...", "?!?!", "---", "***", "(((", "\"'`", "~~~", ":-)", "«quotes»", "—", "…", "'s", "'t", "'re"]
CHAT = [
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<repo_name>dllp2p<file_sep>",
    "<|im_start",
    "<|im_end|><|im_end|>",
]
FRAGMENTS = PROSE + UNICODE + EMOJI + WHITESPACE + NUMBERS + CODE + PUNCTUATION + CHAT
SEPARATORS = [" ", "", "  ", "\n", "\t", " \n", "\n\n"]


def sample_texts(seed: int = 1234, mixes: int = 160) -> list[str]:
    rng = random.Random(seed)
    texts = list(FRAGMENTS)
    texts += [f" {f}" for f in PROSE + UNICODE + NUMBERS] + [f"{f}  " for f in PROSE + CODE]
    for _ in range(mixes):
        parts = rng.sample(FRAGMENTS, rng.randint(2, 5))
        text = "".join(p + rng.choice(SEPARATORS) for p in parts)
        texts.append(rng.choice(["", " ", "  ", "\n"]) + text)
    return texts


SAMPLES = sample_texts()


# --- fixtures ---


@pytest.fixture(scope="module")
def metadata(model_path):
    return load_metadata(model_path)


@pytest.fixture(scope="module")
def tok(metadata) -> Tokenizer:
    return Tokenizer.from_metadata(metadata)


@pytest.fixture(scope="module")
def smollm_original(hf_tokenizer):
    """SmolLM2's tokenizer as its own tokenizer.json defines it: digits isolated, then GPT-2 byte-level.

    transformers' GGUF conversion drops the digit step (it builds a plain ByteLevel pre-tokenizer);
    llama.cpp keeps it for pre-type 'smollm'. We follow the model, and check the conversion separately.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    original = RawTokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return original


def _mismatches(texts, ours, theirs) -> list[tuple[str, object, object]]:
    return [(t, ours(t), theirs(t)) for t in texts if ours(t) != theirs(t)]


# --- byte-level BPE on the real vocabulary ---


def test_corpus_is_large_and_varied():
    assert len(SAMPLES) >= 200
    assert len(set(SAMPLES)) == len(SAMPLES)


def test_encode_matches_smollm_tokenizer(tok, smollm_original):
    assert tok.pre == "smollm"
    bad = _mismatches(SAMPLES, tok.encode, lambda t: smollm_original.encode(t, add_special_tokens=True).ids)
    assert not bad, f"{len(bad)} of {len(SAMPLES)} differ, first: {bad[:3]}"


def test_encode_with_gpt2_pre_matches_hf_gguf_tokenizer(metadata, hf_tokenizer):
    plain = Tokenizer.from_metadata({**metadata, "tokenizer.ggml.pre": "gpt2"})
    # add_special_tokens=True is HF's "as the model says"; for SmolLM2 it adds nothing, like add_bos_token=False
    bad = _mismatches(SAMPLES, plain.encode, lambda t: hf_tokenizer.encode(t, add_special_tokens=True))
    assert not bad, f"{len(bad)} of {len(SAMPLES)} differ, first: {bad[:3]}"


def test_smollm_pre_isolates_digits_but_keeps_space_runs(tok, hf_tokenizer):
    spaces_then_digit = "a  1"
    assert [tok.token_text(i) for i in tok.encode(spaces_then_digit)] == ["a", "ĠĠ", "1"]
    # the GGUF-converted HF tokenizer, lacking the digit step, lets the digit take one space away
    assert hf_tokenizer.convert_ids_to_tokens(hf_tokenizer.encode(spaces_then_digit)) == ["a", "Ġ", "Ġ", "1"]


def test_pre_tokens_cover_the_text(tok):
    for text in SAMPLES:
        assert "".join(tok.pre_tokenize(text)) == text


def test_round_trip(tok):
    bad = [t for t in SAMPLES if tok.decode(tok.encode(t), skip_special=False) != t]
    assert not bad


def test_decode_matches_hf(tok, hf_tokenizer):
    for text in SAMPLES:
        ids = tok.encode(text)
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special=False) == hf_tokenizer.decode(ids, skip_special_tokens=False)


def test_special_tokens_and_ids(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (49152, 1, 2)
    assert tok.eos_ids == frozenset({2})  # eos is already the template's <|im_end|>
    assert tok.encode("<|im_start|>user\nhi<|im_end|>\n") == [1, 4093, 198, 6004, 2, 198]
    assert tok.encode("hi") == [6004]  # add_bos_token is False for SmolLM2
    assert tok.encode("hi", add_bos=True) == [1, 6004]
    assert tok.encode("hi", add_eos=True) == [6004, 2]
    assert tok.token_text(2) == "<|im_end|>" and tok.token_id("<|im_end|>") == 2
    assert tok.token_bytes(2) == b"<|im_end|>"
    assert tok.token_bytes(tok.token_id("Ġhi")) == b" hi"


def test_parse_special_off_keeps_markup_as_text(tok, hf_tokenizer):
    text = "<|im_start|>user\nhi<|im_end|>"
    ids = tok.encode(text, parse_special=False)
    assert not {1, 2} & set(ids)
    assert ids == hf_tokenizer(text, split_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text


def test_bytes_missing_from_the_vocabulary_are_dropped_like_hf(tok, hf_tokenizer):
    assert tok.token_id(BYTE_TO_CHAR[0x04]) is None  # SmolLM2 has no token for byte 0x04
    assert tok.encode("a\x04b") == hf_tokenizer.encode("a\x04b")
    assert tok.decode(tok.encode("a\x04b")) == "ab"


def test_encoding_speed(metadata):
    cold = Tokenizer.from_metadata(metadata)  # empty word cache
    text = "\n".join(sample_texts(seed=99, mixes=600))
    start = time.perf_counter()
    n = len(cold.encode(text))
    rate = n / (time.perf_counter() - start)
    assert n > 10_000
    assert rate > 3000, f"{rate:.0f} tokens/s"


# --- pre-tokenizer regexes vs HF's own (Oniguruma) regex engine ---

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_only_vocab(pre: str) -> Tokenizer:
    return Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": BYTE_TO_CHAR,
            "tokenizer.ggml.merges": [],
        }
    )


def test_llama3_pre_tokenizer_matches_hf_split():
    pre_tokenizers = pytest.importorskip("tokenizers.pre_tokenizers")
    from tokenizers import Regex

    theirs = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    ours = _byte_only_vocab("llama-bpe")
    for text in SAMPLES + ["I'M HERE, YOU'RE THERE", "abc123456def", "  \n\n  x", "!!!\n\n"]:
        assert ours.pre_tokenize(text) == [piece for piece, _ in theirs.pre_tokenize_str(text)], text


def test_byte_only_vocab_round_trips_any_text():
    ours = _byte_only_vocab("gpt2")
    for text in SAMPLES[:50]:
        assert len(ours.encode(text, parse_special=False)) == len(text.encode())
        assert ours.decode(ours.encode(text)) == text


# --- streaming ---


def test_stream_decoder_never_splits_a_character(tok):
    text = "Emoji 👨‍👩‍👧‍👦🏳️‍🌈 and 日本語のテキスト, ok 🤖!"
    decoder = StreamDecoder(tok)
    chunks = [decoder.push(i) for i in tok.encode(text)]
    chunks.append(decoder.flush())
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks[:-1]  # some token really did end mid-character and was held back


def test_stream_decoder_flush_reports_an_unfinished_character(tok):
    decoder = StreamDecoder(tok)
    first_byte_of_emoji = tok.encode("😀")[0]
    assert decoder.push(first_byte_of_emoji) == ""
    assert decoder.flush() == "\ufffd"
    assert decoder.push(tok.token_id("hi")) == "hi"  # usable again after flush


def test_stream_decoder_skips_control_tokens_unless_asked(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert "".join(StreamDecoder(tok).push(i) for i in ids) == "user\nhi"
    keep = StreamDecoder(tok, skip_special=False)
    assert "".join(keep.push(i) for i in ids) == "<|im_start|>user\nhi<|im_end|>"


# --- SentencePiece-style ('llama') vocabulary, worked out by hand ---

UNK, BOS, EOS, BYTE0 = 0, 1, 2, 3  # <0xXX> is id 3 + XX
# piece, score: merges go highest score first
PIECES = [
    ("▁", -100.0),
    ("h", -100.0),
    ("e", -100.0),
    ("l", -100.0),
    ("o", -100.0),
    ("w", -100.0),
    ("r", -100.0),
    ("d", -100.0),
    ("▁h", -1.0),
    ("ll", -2.0),
    ("▁he", -3.0),
    ("lo", -4.0),
    ("▁hell", -5.0),
    ("▁hello", -6.0),
    ("▁w", -7.0),
    ("or", -8.0),
    ("▁wor", -9.0),
    ("ld", -10.0),
    ("▁world", -11.0),
    ("▁▁", -12.0),
]
PIECE_ID = {piece: 259 + i for i, (piece, _) in enumerate(PIECES)}


def spm_metadata(**overrides) -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in PIECES]
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * 259 + [s for _, s in PIECES],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(PIECES),
        "tokenizer.ggml.bos_token_id": BOS,
        "tokenizer.ggml.eos_token_id": EOS,
        "tokenizer.ggml.unknown_token_id": UNK,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }
    md.update(overrides)
    return md


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata())


@pytest.mark.parametrize(
    "text,pieces",
    [
        # ▁h (-1), then ll (-2), then ▁h+e (-3), ▁he+ll (-5), ▁hell+o (-6): one token
        ("hello", ["▁hello"]),
        ("hello world", ["▁hello", "▁world"]),
        # ▁h, then l+d (-10); '▁h'+'o' and 'o'+'ld' are not pieces
        ("hold", ["▁h", "o", "ld"]),
        # the prefixed space and the text's own: ▁h (-1) beats ▁▁ (-12) and takes the second ▁
        (" hello", ["▁", "▁hello"]),
    ],
)
def test_spm_merges_by_score(spm, text, pieces):
    assert spm.encode(text) == [BOS] + [PIECE_ID[p] for p in pieces]
    assert spm.decode(spm.encode(text)) == text


def test_spm_byte_fallback(spm):
    # 'é' and 'i' are not pieces: their UTF-8 bytes become <0xXX> tokens
    assert spm.encode("hé", add_bos=False) == [PIECE_ID["▁h"], BYTE0 + 0xC3, BYTE0 + 0xA9]
    assert spm.encode("hi", add_bos=False) == [PIECE_ID["▁h"], BYTE0 + ord("i")]
    assert spm.token_bytes(BYTE0 + 0xC3) == b"\xc3"
    for text in ["hé", "日本 hello", "🤖 world!", "hello  world", "\n\thold"]:
        assert spm.decode(spm.encode(text)) == text


def test_spm_special_tokens_and_space_prefix(spm):
    assert spm.encode("<s>hello</s>", add_bos=False) == [BOS, PIECE_ID["▁hello"], EOS]
    assert BOS not in spm.encode("<s>", add_bos=False, parse_special=False)
    assert spm.decode([BOS, PIECE_ID["▁hello"], EOS]) == "hello"
    assert spm.decode([BOS, PIECE_ID["▁hello"], EOS], skip_special=False) == "<s> hello</s>"
    no_prefix = Tokenizer.from_metadata(spm_metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.encode("hello", add_bos=False) == [PIECE_ID["h"], PIECE_ID["e"], PIECE_ID["ll"], PIECE_ID["o"]]


def test_spm_stream_decoder_joins_byte_tokens(spm):
    decoder = StreamDecoder(spm)
    chunks = [decoder.push(i) for i in spm.encode("hello 日本")] + [decoder.flush()]
    assert "".join(chunks) == "hello 日本"
    assert not any("\ufffd" in c for c in chunks)


def test_spm_matches_sentencepiece():
    spm_lib = pytest.importorskip("sentencepiece")
    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "hello world, hello there",
        "tokenizers merge pieces by score",
        "  two spaces and   three",
        "naïve café résumé",
        "numbers 12345 and 678",
    ] * 20
    proto = io.BytesIO()
    spm_lib.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=proto,
        model_type="bpe",
        vocab_size=330,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    sp = spm_lib.SentencePieceProcessor(model_proto=proto.getvalue())
    n = sp.get_piece_size()

    def kind(i: int) -> int:
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    ours = Tokenizer.from_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
            "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
            "tokenizer.ggml.bos_token_id": sp.bos_id(),
            "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        }
    )
    rng = random.Random(7)
    words = ["the", "quick", "hello", "world", "there", "theory", "naïve", "café", "123", "日本", "ü", "", "\t"]
    for _ in range(200):
        text = rng.choice(["", " ", "  "]) + " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        assert ours.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert ours.decode(ours.encode(text)) == sp.decode(sp.encode(text)) == text


# --- end-of-generation ids ---


def test_eos_ids_include_eot_eom_and_the_templates_turn_end():
    tokens = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>"]
    base = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens + BYTE_TO_CHAR,
        "tokenizer.ggml.token_type": [3] * 5 + [1] + [1] * 256,  # '<|im_end|>' here is no control token
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.eos_token_id": 2,
    }
    assert Tokenizer.from_metadata(base).eos_ids == {2}
    assert Tokenizer.from_metadata({**base, "tokenizer.ggml.eom_token_id": 4}).eos_ids == {2, 4}
    template = "{% for m in messages %}<|start_header_id|>{{ m.content }}<|eot_id|>{% endfor %}"
    assert Tokenizer.from_metadata({**base, "tokenizer.chat_template": template}).eos_ids == {2, 3}
    im_template = "{{ '<|im_start|>' + m + '<|im_end|>' }}"
    assert Tokenizer.from_metadata({**base, "tokenizer.chat_template": im_template}).eos_ids == {2}


# --- errors ---


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tokenizer.ggml.model": None}, "missing 'tokenizer.ggml.model'"),
        ({"tokenizer.ggml.model": "bert"}, "unsupported tokenizer model 'bert'"),
        ({"tokenizer.ggml.tokens": None}, "missing 'tokenizer.ggml.tokens'"),
        ({"tokenizer.ggml.scores": None}, "missing 'tokenizer.ggml.scores'"),
        ({"tokenizer.ggml.scores": [0.0]}, "tokenizer.ggml.scores has 1 entries"),
        ({"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type has 2 entries"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "bos_token_id = 1000000 is outside"),
        ({"tokenizer.ggml.bos_token_id": None}, "add_bos_token is set but"),
    ],
)
def test_bad_spm_metadata(change, message):
    md = {k: v for k, v in {**spm_metadata(), **change}.items() if v is not None}
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_metadata(md)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"tokenizer.ggml.merges": None}, "missing 'tokenizer.ggml.merges'"),
        ({"tokenizer.ggml.merges": ["abc"]}, "is not 'left right'"),
        ({"tokenizer.ggml.pre": "no-such-pre"}, "unsupported tokenizer pre-type 'no-such-pre'"),
    ],
)
def test_bad_gpt2_metadata(change, message):
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": BYTE_TO_CHAR, "tokenizer.ggml.merges": []}
    md = {k: v for k, v in {**md, **change}.items() if v is not None}
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_metadata(md)


def test_no_tokenizer_at_all():
    with pytest.raises(TokenizerError, match="GGUF metadata has no tokenizer"):
        Tokenizer.from_metadata({"general.architecture": "llama"})


def test_out_of_range_ids(spm):
    with pytest.raises(TokenizerError, match="token id 999 is outside the vocabulary"):
        spm.decode([PIECE_ID["▁hello"], 999])
    with pytest.raises(TokenizerError):
        spm.token_bytes(-1)


def test_repeated_spellings_and_merges_keep_their_first_id_and_rank():
    from dllp2p.vocab import _merge_ranks

    tokens = BYTE_TO_CHAR + ["ab", "ab"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["a b"]}
    assert Tokenizer.from_metadata(md).token_id("ab") == 256
    assert _merge_ranks({"tokenizer.ggml.merges": ["a b", "c d", "a b"]}) == {"a b": 0, "c d": 1}
    with pytest.raises(TokenizerError, match=r"merges\[2\] = 'cd' is not"):
        _merge_ranks({"tokenizer.ggml.merges": ["a b", "c d", "cd", "e  f"]})
