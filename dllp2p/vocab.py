"""What a GGUF file's `tokenizer.*` metadata says, validated: token types, scores, merge ranks, special ids,
and the pre-tokenizer regexes each `tokenizer.ggml.pre` name stands for. tokenizer.py builds on these.

Start-up cost matters (Gemma 3 has 262,144 tokens): the readers here build bytes / array('f') / dict
objects with C-level loops, never one Python object per token beyond the spelling -> id dict.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Mapping, Sequence
from enum import IntEnum
from itertools import repeat
from typing import Any

import numpy as np

from .chat import template_from  # the family's template for files without one (chat imports nothing of ours)

class TokenizerError(ValueError):
    """The GGUF metadata does not describe a tokenizer we can build, or a token id is out of range."""


class TokenType(IntEnum):
    """`tokenizer.ggml.token_type` values (llama.cpp's llama_token_type)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


# --- pre-tokenizers (byte-level BPE): regexes applied in turn, each splitting the pieces of the last ---

_GPT2 = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2 = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_EACH_DIGIT = r"\p{N}"
# Mistral Nemo ('tekken') and GPT-4o style (Llama 4): case-aware words, as transformers' GGUF loader has them
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+" + _CONTRACTION
    + r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*" + _CONTRACTION
    + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` names as llama.cpp's llama-vocab.cpp groups them (each group shares one regex list
# there). Only groups whose regexes are written here are listed; any other name is refused, not guessed.
_LLAMA3_NAMES = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
_PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    # 'default' and 'gpt2' are not llama.cpp's names for GPT-2 (its 'default' is an older regex list): they
    # are what a file without a pre-type gets from transformers, GPT-2's byte-level regex, kept as before.
    **dict.fromkeys(
        ("default", "gpt2", "gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4", "mpt", "olmo", "jais",
         "trillion", "granite-docling"),
        (_GPT2,),
    ),
    # SmolLM's own tokenizer.json isolates every digit before the GPT-2 regex (HF `Digits` pre-tokenizer)
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), (_EACH_DIGIT, _GPT2)
    ),
    **dict.fromkeys((*_LLAMA3_NAMES, "dbrx", "smaug-bpe"), (_LLAMA3,)),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan", "grok-2"), (_QWEN2,)
    ),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O,)),
}
# Llama 3 style vocabularies take a whole word that is itself a token without merging (HF `ignore_merges`;
# llama.cpp sets it for exactly these pre-types, not for dbrx / smaug-bpe that share the regex).
_WORD_AS_TOKEN_FIRST = frozenset((*_LLAMA3_NAMES, "tekken"))

# Chat templates close a turn with one of these; generation must stop there too.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

_WORD_CACHE_SIZE = 1 << 16


def _gpt2_byte_alphabet() -> list[str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the rest are
    moved up to U+0100.. so that every byte has a visible, non-space character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet: dict[int, str] = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in alphabet:
            alphabet[b] = chr(256 + shifted)
            shifted += 1
    return [alphabet[b] for b in range(256)]


BYTE_TO_CHAR: list[str] = _gpt2_byte_alphabet()
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


# --- metadata -> validated fields ---


def _required(md: Mapping[str, Any], key: str) -> Any:
    if key not in md:
        raise TokenizerError(f"GGUF metadata has no tokenizer: missing {key!r}")
    return md[key]


def _optional_id(md: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < vocab_size:
        raise TokenizerError(f"{key} = {value} is outside the vocabulary (size {vocab_size})")
    return value


def _token_types(md: Mapping[str, Any], vocab_size: int) -> bytes:
    """One byte per token (a TokenType value): indexing a bytes object gives a plain int, fast, and the
    whole table is vocab_size bytes instead of a list of int objects."""
    types = md.get("tokenizer.ggml.token_type")
    if types is None:
        return bytes([TokenType.NORMAL]) * vocab_size
    values = np.asarray(types)
    if values.shape != (vocab_size,):
        raise TokenizerError(f"tokenizer.ggml.token_type has {values.size} entries for {vocab_size} tokens")
    if vocab_size and not (values.dtype.kind in "iu" and 0 <= values.min() and values.max() <= 255):
        raise TokenizerError("tokenizer.ggml.token_type holds values that are no token types")
    return values.astype(np.uint8).tobytes()


def _scores(md: Mapping[str, Any], vocab_size: int) -> array:
    """float32 per token, as the GGUF stores them (array('f'): indexing gives a Python float)."""
    scores = np.asarray(_required(md, "tokenizer.ggml.scores"), dtype=np.float32)
    if scores.shape != (vocab_size,):
        raise TokenizerError(f"tokenizer.ggml.scores has {scores.size} entries for {vocab_size} tokens")
    return array("f", scores.tobytes())


def _merge_ranks(md: Mapping[str, Any]) -> dict[str, int]:
    """'left right' -> rank (lower merges first). Byte-level tokens never hold a real space.

    Built with C-level loops only (start-up cost): the space count of every merge at once, and the
    dict from the last merge to the first, so that a repeated merge keeps its first (lowest) rank.
    """
    merges = list(_required(md, "tokenizer.ggml.merges"))
    spaces = list(map(str.count, merges, repeat(" ")))
    if spaces.count(1) != len(merges):
        rank = next(r for r, n in enumerate(spaces) if n != 1)
        raise TokenizerError(f"tokenizer.ggml.merges[{rank}] = {merges[rank]!r} is not 'left right'")
    return dict(zip(reversed(merges), range(len(merges) - 1, -1, -1)))


def _first_ids(tokens: Sequence[str]) -> dict[str, int]:
    """Spelling -> id; a spelling listed twice keeps its first id (built from the end, as above)."""
    return dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1)))


def _ids_of(tokens: list[str], spelling: str) -> Iterator[int]:
    """Every id spelled `spelling`, found by list.index (a C loop) rather than a Python scan."""
    start = 0
    while True:
        try:
            start = tokens.index(spelling, start) + 1
        except ValueError:
            return
        yield start - 1


def _pre_tokenizer(md: Mapping[str, Any]) -> str:
    pre = str(md.get("tokenizer.ggml.pre") or "default")
    if pre not in _PRE_TOKENIZERS:
        raise TokenizerError(
            f"unsupported tokenizer pre-type {pre!r} (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    return pre


def _end_of_generation_ids(md: Mapping[str, Any], tokens: list[str], types: Sequence[int]) -> frozenset[int]:
    """eos, eot and eom ids, plus the control token the chat template ends each turn with (the file's
    template, or for a file without one the family's template that chat.template_from supplies)."""
    size = len(tokens)
    ids = {_optional_id(md, f"tokenizer.ggml.{name}_token_id", size) for name in ("eos", "eot", "eom")}
    template = template_from(md) or ""
    for marker in _END_OF_TURN_MARKERS:
        if marker in template:
            ids.update(i for i in _ids_of(tokens, marker) if types[i] == TokenType.CONTROL)
    ids.discard(None)
    return frozenset(ids)  # type: ignore[arg-type]


def _gemma_style(md: Mapping[str, Any]) -> bool:
    """Gemma's SentencePiece vocabularies, as transformers builds them from a GGUF (its gemma_tokenizer):
    merges go by position in the vocabulary (Gemma's scores do not follow its merge order; for Gemma 3's
    normal tokens they fall strictly with the position, but its whitespace tokens score -1000), and the
    user-defined runs of spaces, which llama.cpp's converter stores with real spaces, are ordinary '▁▁'
    pieces reached by merging, not tokens matched whole in the raw text."""
    return str(md.get("general.architecture", "")) in ("gemma", "gemma2", "gemma3")
