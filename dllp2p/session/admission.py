"""What a root checks of a Generate before it serves it: the prompt's length before tokenizing, its
token ids against the vocabulary, the context against the model, checks.MAX_CTX and the memory this node
has. Pure but for meminfo(), which reads /proc/meminfo. Each raises CodedError with the ErrorCode the
client sees (context_length_exceeded or invalid_token: HTTP 400)."""

from __future__ import annotations

from typing import Any, Sequence

from ..error_codes import CodedError, ErrorCode
from ..wire.messages import Generate
from .checks import MAX_CTX, MEMORY_SHARE, mem_available

MAX_TOKEN_BYTES = 256  # no token of any vocabulary spans more bytes: a text over ctx x this cannot fit


def check_length(g: Generate) -> None:
    """The cheap check before tokenizing: a prompt of more bytes than ctx tokens could ever hold is refused."""
    chars = len(g.prompt) + len(g.system or "") + sum(len(t.content) for t in g.messages)
    if chars > g.ctx * MAX_TOKEN_BYTES or len(g.tokens) >= g.ctx:  # a character is at least one byte
        n = len(g.tokens) or chars
        raise CodedError(f"the prompt ({n} {'tokens' if g.tokens else 'characters'}) cannot fit a context of "
                         f"{g.ctx} tokens", ErrorCode.CONTEXT_LENGTH)


def check_ctx(ctx: int, config: Any, available: int | None) -> None:
    """A context the root can allocate: within the model's, checks.MAX_CTX and (the whole model's f16 KV
    cache, as when the root runs alone) the memory available. Else a CodedError (HTTP 400)."""
    most = min(config.context_length, MAX_CTX)
    if ctx > most:
        raise CodedError(f"ctx {ctx} is over this model's {most} positions", ErrorCode.CONTEXT_LENGTH)
    kv = 2 * config.n_layers * ctx * config.n_kv_heads * config.head_dim * 2
    if available is not None and kv > available * MEMORY_SHARE:
        raise CodedError(f"ctx {ctx} needs {kv / 2**20:.0f} MiB of KV cache; this node has {available / 2**20:.0f} MiB "
                         "available", ErrorCode.CONTEXT_LENGTH)


def meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            return mem_available(f.read())
    except OSError:
        return None


def check_vocabulary(ids: Sequence[int], vocab: int) -> None:
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise CodedError(f"token id {bad} is not in the model's vocabulary (0..{vocab - 1})", ErrorCode.INVALID_TOKEN)


def check_prompt(ids: list[int], vocab: int, ctx: int) -> None:
    """A prompt the root can run, else a CodedError the client caused (HTTP 400)."""
    check_vocabulary(ids, vocab)
    if len(ids) >= ctx:
        raise CodedError(f"the prompt has {len(ids)} tokens; the context holds {ctx} (fewer prompt tokens, or a "
                         "larger ctx)", ErrorCode.CONTEXT_LENGTH)
