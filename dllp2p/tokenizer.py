"""Text <-> token ids, built only from a GGUF file's `tokenizer.*` metadata.

Two vocabulary kinds are supported, named by `tokenizer.ggml.model`:

* ``gpt2``  - byte-level BPE (GPT-2, SmolLM, Llama 3, Qwen2 ...). Text is first cut into words by the
  pre-tokenizer regexes of `tokenizer.ggml.pre`, each word's UTF-8 bytes are spelled with GPT-2's
  byte->printable-character alphabet, and `tokenizer.ggml.merges` are applied lowest rank first.
* ``llama`` - SentencePiece-style BPE (Llama 2, Mistral, Gemma ...). Spaces become '▁', an optional space
  is prefixed, adjacent pieces are merged highest `tokenizer.ggml.scores` first (Gemma: earliest in the
  vocabulary first, see `_gemma_style`), and characters missing from the vocabulary fall back to the
  byte tokens ``<0xXX>``.

Start-up cost matters (the daemon builds one per model it loads, Gemma 3 has 262,144 tokens): the only
per-token Python objects built here are the spelling -> id dict; token types are one `bytes`, scores one
`array('f')`, special tokens a dict plus a one-character-class regex, and token bytes are made on first use.

Special tokens are matched in the text before either of those: user-defined tokens always, control
tokens (``<|im_start|>``, ``<s>``) only when ``parse_special`` is set. Decoding maps every token back to
its bytes; `StreamDecoder` does it one token at a time without ever splitting a UTF-8 character.
"""

from __future__ import annotations

import codecs
import functools
import heapq
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import regex

from .vocab import (  # noqa: F401 - TokenType, BYTE_TO_CHAR re-exported
    TokenizerError,
    TokenType,
    BYTE_TO_CHAR,
    CHAR_TO_BYTE,
    _PRE_TOKENIZERS,
    _WORD_AS_TOKEN_FIRST,
    _WORD_CACHE_SIZE,
    _required,
    _optional_id,
    _token_types,
    _scores,
    _merge_ranks,
    _first_ids,
    _pre_tokenizer,
    _end_of_generation_ids,
    _gemma_style,
)



# --- merging: one priority-queue BPE for both ranks (byte-level) and scores (SentencePiece) ---


def _merge_symbols(symbols: list[str], pair_rank: Callable[[str, str], float | None]) -> list[str]:
    """Repeatedly join the adjacent pair with the lowest rank (leftmost on ties) until none has one.

    A linked list over the symbols plus a heap of candidate pairs keeps long words O(n log n). Heap
    entries go stale when a neighbour changes; an entry is live only while its right symbol is still the
    left one's successor with the same length (symbols only ever grow).
    """
    n = len(symbols)
    if n < 2:
        return symbols
    text: list[str | None] = list(symbols)
    succ = list(range(1, n + 1))
    pred = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, int]] = []

    def candidate(left: int, right: int) -> None:
        rank = pair_rank(text[left], text[right])  # type: ignore[arg-type]
        if rank is not None:
            heapq.heappush(heap, (rank, left, right, len(text[right])))  # type: ignore[arg-type]

    for i in range(n - 1):
        candidate(i, i + 1)
    while heap:
        _, left, right, right_len = heapq.heappop(heap)
        right_text = text[right]
        if text[left] is None or succ[left] != right or right_text is None or len(right_text) != right_len:
            continue
        text[left] += right_text  # type: ignore[operator]
        text[right] = None
        after = succ[right]
        succ[left] = after
        if after < n:
            pred[after] = left
            candidate(left, after)
        if pred[left] >= 0:
            candidate(pred[left], left)
    return [t for t in text if t is not None]


def _split_by(pieces: Iterable[str], pattern: regex.Pattern[str]) -> Iterator[str]:
    """Cut each piece at the pattern's matches, keeping both the matches and the text between them."""
    for piece in pieces:
        pos = 0
        for match in pattern.finditer(piece):
            if match.start() > pos:
                yield piece[pos : match.start()]
            yield match.group()
            pos = match.end()
        if pos < len(piece):
            yield piece[pos:]


class _SpecialMatcher:
    """Finds special-token spellings in text, leftmost first and longest at a position (as HF's added
    tokens and a longest-first regex alternation do). A regex alternation of Gemma's 6,400 spellings takes
    a second to compile; this is a dict plus a regex of the spellings' first characters."""

    def __init__(self, ids: Mapping[str, int]) -> None:
        self._ids = dict(ids)
        lengths: dict[str, set[int]] = {}
        for spelling in self._ids:
            lengths.setdefault(spelling[0], set()).add(len(spelling))
        self._lengths = {c: sorted(ls, reverse=True) for c, ls in lengths.items()}
        self._starts = regex.compile("[" + "".join(regex.escape(c) for c in sorted(lengths)) + "]")

    def split(self, text: str) -> Iterator[str | int]:
        """The text as plain-text fragments (non-empty str) and special tokens (their id), in order."""
        ids, lengths, search = self._ids, self._lengths, self._starts.search
        done = pos = 0
        while (m := search(text, pos)) is not None:
            start = m.start()
            for n in lengths[text[start]]:
                token_id = ids.get(text[start : start + n])
                if token_id is not None:
                    if start > done:
                        yield text[done:start]
                    yield token_id
                    done = pos = start + n
                    break
            else:
                pos = start + 1
        if done < len(text):
            yield text[done:]


class Tokenizer:
    """A GGUF vocabulary: `encode` text to ids, `decode` ids to text. Build with `from_metadata`."""

    def __init__(
        self,
        *,
        model: str,
        tokens: Sequence[str],
        token_types: bytes | Sequence[int],
        bos_id: int | None,
        eos_id: int | None,
        unknown_id: int | None,
        eos_ids: frozenset[int],
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool = False,
        pre: str = "default",
        merge_ranks: Mapping[str, int] | None = None,
        scores: Sequence[float] | None = None,
        gemma_style: bool = False,
    ) -> None:
        self.model = model
        self.vocab_size = len(tokens)
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.unknown_id = unknown_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.add_space_prefix = add_space_prefix
        self.pre = pre
        self._tokens = tokens if isinstance(tokens, list) else list(tokens)  # the metadata's own list, shared
        self._types = token_types if isinstance(token_types, bytes) else bytes(token_types)
        self._ids = _first_ids(self._tokens)
        self._bytes: list[bytes | None] = [None] * self.vocab_size  # filled on first use: see token_bytes
        respelled = self._respell_space_runs() if model == "llama" and gemma_style else {}
        self._always_special, self._parse_special = self._special_matchers(exclude=respelled.values())
        if model == "gpt2":
            self._ranks = dict(merge_ranks or {})
            self._pre_patterns = [regex.compile(p) for p in _PRE_TOKENIZERS[pre]]
            self._word_as_token_first = pre in _WORD_AS_TOKEN_FIRST
            self._encode_word = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._encode_word_uncached)
        else:
            self._scores = scores if isinstance(scores, array) else array("f", scores or [])
            self._merge_by_position = gemma_style
            self._byte_ids = self._byte_token_ids()

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> Tokenizer:
        """Build from `load_metadata(path)`; raises TokenizerError naming what is missing or unsupported."""
        model = str(_required(md, "tokenizer.ggml.model"))
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"unsupported tokenizer model {model!r} (supported: gpt2, llama)")
        tokens = _required(md, "tokenizer.ggml.tokens")
        if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens[:1])):
            tokens = [str(t) for t in tokens]  # load_metadata gives a list of str: used as it is, not copied
        if not tokens:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        size = len(tokens)
        types = _token_types(md, size)
        bos_id = _optional_id(md, "tokenizer.ggml.bos_token_id", size)
        pre = _pre_tokenizer(md) if model == "gpt2" else None
        # without the key, llama.cpp adds BOS for SentencePiece and the Llama 3 / tekken pre-types
        by_default = model == "llama" or (pre in _WORD_AS_TOKEN_FIRST and bos_id is not None)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", by_default))
        if add_bos and bos_id is None:
            raise TokenizerError("tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id is missing")
        eos_id = _optional_id(md, "tokenizer.ggml.eos_token_id", size)
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        if add_eos and eos_id is None:
            raise TokenizerError("tokenizer.ggml.add_eos_token is set but tokenizer.ggml.eos_token_id is missing")
        common = dict(
            model=model,
            tokens=tokens,
            token_types=types,
            bos_id=bos_id,
            eos_id=eos_id,
            unknown_id=_optional_id(md, "tokenizer.ggml.unknown_token_id", size),
            eos_ids=_end_of_generation_ids(md, tokens, types),
            add_bos=add_bos,
            add_eos=add_eos,
        )
        if model == "gpt2":
            return cls(**common, pre=pre, merge_ranks=_merge_ranks(md))
        add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
        return cls(
            **common, add_space_prefix=add_space_prefix, scores=_scores(md, size), gemma_style=_gemma_style(md)
        )

    # --- vocabulary look-ups ---

    def token_text(self, token_id: int | None) -> str:
        """The vocabulary entry as stored in the GGUF ('' for None, handy for optional bos/eos)."""
        return "" if token_id is None else self._tokens[self._checked(token_id)]

    def token_id(self, text: str) -> int | None:
        """The id of the vocabulary entry spelled exactly `text`, if any."""
        return self._ids.get(text)

    def token_type(self, token_id: int) -> TokenType:
        return TokenType(self._types[self._checked(token_id)])

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes this token stands for in text (control tokens: their own spelling).

        Worked out on first use and kept: a start-up would otherwise spend most of the tokenizer's
        build time spelling out 49k tokens, of which a run decodes a few hundred."""
        piece = self._bytes[self._checked(token_id)]
        if piece is None:
            piece = self._bytes[token_id] = self._piece_bytes(token_id)
        return piece

    def _checked(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token_id

    def _piece_bytes(self, token_id: int) -> bytes:
        text, kind = self._tokens[token_id], self._types[token_id]
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN, TokenType.UNUSED):
            return text.encode()
        if self.model == "gpt2":
            if all(c in CHAR_TO_BYTE for c in text):
                return bytes(CHAR_TO_BYTE[c] for c in text)
            return text.encode()  # not byte-level spelled: take it literally
        if kind == TokenType.BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("▁", " ").encode()

    def _ids_of_type(self, kind: int) -> np.ndarray:
        """Ids of every token of one type, found by numpy over the type bytes (no Python loop)."""
        return np.flatnonzero(np.frombuffer(self._types, dtype=np.uint8) == kind)

    def _respell_space_runs(self) -> dict[str, int]:
        """Gemma: user-defined runs of spaces become '▁' pieces (see `_gemma_style`). -> respelling: id"""
        found: dict[str, int] = {}
        for i in self._ids_of_type(TokenType.USER_DEFINED).tolist():
            text = self._tokens[i]
            if " " in text and not text.strip():
                found.setdefault(text.replace(" ", "▁"), i)
        for spelling, i in found.items():
            self._ids.setdefault(spelling, i)
        return found

    # --- encoding ---

    def encode(
        self,
        text: str,
        *,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        parse_special: bool = True,
        literal: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """Token ids for `text`. add_bos/add_eos None: as the GGUF says. parse_special: control-token
        spellings in the text (e.g. '<|im_start|>') become those tokens; otherwise they are plain text.
        literal: sorted, disjoint [start, end) character spans of the text where control-token spellings
        are plain text even with parse_special (a chat message's content inside its template's markup).
        User-defined tokens are always matched whole, as in llama.cpp and HF."""
        ids: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError("cannot add BOS: the vocabulary has no tokenizer.ggml.bos_token_id")
            ids.append(self.bos_id)
        encode_text = self._encode_bpe_text if self.model == "gpt2" else self._encode_spm_text
        after_special = True
        for fragment in self._split_special(text, parse_special, literal):
            if isinstance(fragment, int):
                ids.append(fragment)
                after_special = True
            else:
                ids.extend(encode_text(fragment, after_special))
                after_special = False
        if self.add_eos if add_eos is None else add_eos:
            if self.eos_id is None:
                raise TokenizerError("cannot add EOS: the vocabulary has no tokenizer.ggml.eos_token_id")
            ids.append(self.eos_id)
        return ids

    def _special_matchers(self, exclude: Iterable[int] = ()) -> tuple[_SpecialMatcher | None, _SpecialMatcher | None]:
        """Matchers of special-token spellings: (user-defined only, user-defined + control)."""
        skip = set(exclude)

        def matcher(kinds: tuple[int, ...]) -> _SpecialMatcher | None:
            ids: dict[str, int] = {}
            for kind in kinds:
                for i in self._ids_of_type(kind).tolist():
                    spelling = self._tokens[i]
                    if spelling and i not in skip:
                        ids.setdefault(spelling, self._ids[spelling])
            return _SpecialMatcher(ids) if ids else None

        return matcher((TokenType.USER_DEFINED,)), matcher((TokenType.USER_DEFINED, TokenType.CONTROL))

    def _split_special(self, text: str, parse_special: bool,
                       literal: Sequence[tuple[int, int]] = ()) -> Iterator[str | int]:
        """The text as plain-text fragments (str) and special tokens (their id), in order. Within the
        `literal` spans only user-defined spellings are matched; adjacent text fragments are joined, so
        text without special spellings tokenizes as if there were no spans."""
        if not parse_special or not literal:
            yield from self._split_with(self._parse_special if parse_special else self._always_special, text)
            return
        pending: list[str] = []
        done = 0
        for start, end in (*literal, (len(text), len(text))):
            if not done <= start <= end <= len(text):
                raise ValueError(f"literal spans must be sorted, disjoint and within the text: {literal!r}")
            for matcher, piece in ((self._parse_special, text[done:start]), (self._always_special, text[start:end])):
                for fragment in self._split_with(matcher, piece):
                    if isinstance(fragment, str):
                        pending.append(fragment)
                    else:
                        if pending:
                            yield "".join(pending)
                            pending.clear()
                        yield fragment
            done = end
        if pending:
            yield "".join(pending)

    @staticmethod
    def _split_with(matcher: _SpecialMatcher | None, text: str) -> Iterator[str | int]:
        if matcher is None:
            if text:
                yield text
            return
        yield from matcher.split(text)

    def _encode_bpe_text(self, text: str, after_special: bool) -> list[int]:
        ids: list[int] = []
        for word in self.pre_tokenize(text):
            ids.extend(self._encode_word(word))
        return ids

    def pre_tokenize(self, text: str) -> list[str]:
        """Byte-level BPE only: the words merges run within, as plain text."""
        pieces: Iterable[str] = (text,)
        for pattern in self._pre_patterns:
            pieces = _split_by(pieces, pattern)
        return list(pieces)

    def _encode_word_uncached(self, word: str) -> tuple[int, ...]:
        spelled = "".join(BYTE_TO_CHAR[b] for b in word.encode())
        if self._word_as_token_first and spelled in self._ids:
            return (self._ids[spelled],)
        ranks = self._ranks
        symbols = _merge_symbols(list(spelled), lambda a, b: ranks.get(a + " " + b))
        ids: list[int] = []
        for symbol in symbols:
            token_id = self._ids.get(symbol)
            if token_id is not None:
                ids.append(token_id)
            else:  # only a lone byte can be missing (e.g. SmolLM has no 0x04): dropped, as HF and llama.cpp do
                ids.extend(self._ids[c] for c in symbol if c in self._ids)
        return tuple(ids)

    def _encode_spm_text(self, text: str, after_special: bool) -> list[int]:
        """SentencePiece BPE over the whole fragment: two adjacent pieces join when both are vocabulary
        entries and so is their concatenation, a normal or user-defined token; best score (Gemma: lowest
        id) first. What stays unknown is spelled with byte tokens."""
        if self.add_space_prefix and after_special:
            text = " " + text
        ids, types, scores = self._ids, self._types, self._scores
        normal, user = int(TokenType.NORMAL), int(TokenType.USER_DEFINED)

        by_position = self._merge_by_position

        def rank(a: str, b: str) -> float | None:
            token_id = ids.get(a + b)
            if token_id is None or (types[token_id] != normal and types[token_id] != user):
                return None
            if a not in ids or b not in ids:
                return None
            return token_id if by_position else -scores[token_id]

        out: list[int] = []
        for symbol in _merge_symbols(list(text.replace(" ", "▁")), rank):
            token_id = ids.get(symbol)
            if token_id is not None and (types[token_id] == normal or types[token_id] == user):
                out.append(token_id)
            else:
                out.extend(self._byte_fallback(symbol))
        return out

    def _byte_token_ids(self) -> dict[int, int]:
        """byte value -> id of its '<0xXX>' token (SentencePiece byte fallback)."""
        found: dict[int, int] = {}
        for i in self._ids_of_type(TokenType.BYTE).tolist():
            if len(piece := self.token_bytes(i)) == 1:
                found.setdefault(piece[0], i)
        return found

    def _byte_fallback(self, symbol: str) -> list[int]:
        raw = symbol.encode()
        if all(b in self._byte_ids for b in raw):
            return [self._byte_ids[b] for b in raw]
        return [self._unknown()]

    def _unknown(self) -> int:
        if self.unknown_id is None:
            raise TokenizerError("text needs the unknown token but the vocabulary has no unknown_token_id")
        return self.unknown_id

    # --- decoding ---

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """The text for `ids`; invalid UTF-8 becomes U+FFFD. skip_special drops control tokens."""
        decoder = StreamDecoder(self, skip_special=skip_special)
        return "".join(decoder.push(i) for i in ids) + decoder.flush()

    def _strips_leading_space(self) -> bool:
        """SentencePiece decoding drops the space that add_space_prefix put in front of the text."""
        return self.model == "llama" and self.add_space_prefix


class StreamDecoder:
    """Token ids in, text out as it becomes complete: a character split across tokens is held back
    until its last byte arrives, so no chunk ever carries half a character (or a U+FFFD for one)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip_space = tokenizer._strips_leading_space()
        self._started = False

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes (often '', or more than the token when it ends a character)."""
        kind = self._tokenizer.token_type(token_id)
        if self._skip_special and kind == TokenType.CONTROL:
            return ""
        piece = self._tokenizer.token_bytes(token_id)
        if not self._started and piece:
            self._started = True
            if self._strip_space and kind == TokenType.NORMAL and piece.startswith(b" "):
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character shows as U+FFFD); ready for reuse."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._started = False
        return tail
