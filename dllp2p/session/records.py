"""The root service's records (session/service.py): a worker planned without for a while, the engine kept
warm for the next request, and the model loaded once."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..error_codes import ErrorCode
from ..pipeline import AnyPlan


@dataclass(frozen=True)
class _LeftOut:
    """A worker the root plans without until `until` (time.time()), and why."""

    node_id: str
    address: str
    code: ErrorCode | str  # "cpu_wait": left out while its CPU is busy (busy.py)
    reason: str
    until: float


@dataclass(frozen=True)
class _Warm:
    key: tuple  # (workers, ctx): what the next request must match to reuse the engine
    engine: Any
    plan: AnyPlan
    until: float  # trio.current_time() after which keep_warm closes it
    kv: tuple[int, ...] = ()  # the token ids at the positions its KV cache holds (the last request's)
    rates: dict = field(default_factory=dict)  # node id -> the weight its plan was made with (rate or capacity)


@dataclass
class _Loaded:
    model: Any  # formats.GGUFModel
    tokenizer: Any  # tokenizer.Tokenizer
