"""What one peer may make this process hold: per message type, the most body bytes a frame may carry (checked
from its header, before the body is buffered: codec.FrameDecoder); how many values msgpack may decode out
of one body; the budget of partially received large frames of all connections together. Sans I/O.

    MAX_BODY  body bytes per message class (a Status is a seq number; only weight chunks are large)
    unpack    msgpack with every container counted: 8 MiB of empty maps is refused after MAX_ITEMS
    Budget    bytes of partial large frames, shared by every decoder of the process (BUFFERED)

The connection caps are the daemon's (daemon/node.py), the send timeout the link's (link.SEND_TIMEOUT).
"""

from __future__ import annotations

import threading
from typing import Any

import msgpack

from .messages import MAX_CHUNK, Generate, Hello, Need, Session, Step, WeightChunk
from .reports import Status, StatusReply

SMALL = 64 << 10  # body bytes of the small messages (Mesh, Ready, Stop, Error, Done, ...) and of unknown types
MAX_BODY: dict[type, int] = {
    WeightChunk: MAX_CHUNK + SMALL,  # the only large one: MAX_CHUNK weight bytes plus their metadata
    Session: 2 << 20,  # plan + config + the slice list (an 80-layer model: ~200 kB)
    Step: 4 << 20,  # a prefill's tokens (up to the context, at most 9 bytes each)
    Generate: 1 << 20,  # a prompt's text or tokens; the root checks it against the context
    Hello: 1 << 20,  # cache_keys: 65 bytes a slice
    Need: 1 << 20,
    Status: 1 << 10,  # a seq number (room for a few fields more: under 100 bytes today)
    StatusReply: 1 << 20,  # every member's record and status
}
MAX_ITEMS = 1 << 19  # msgpack values (array items, map entries, containers) one body may decode into
MAX_MAP = 64  # entries of one map: a message or a nested record (ModelConfig has ~25 fields)
OFF_LOOP = SMALL  # bodies over this many bytes are decoded in a thread (link.TrioLink.receive)


class _TooMany(ValueError):
    pass


def unpack(body: bytes) -> Any:
    """msgpack with limits: no container over MAX_ITEMS items or MAX_MAP entries, no more than MAX_ITEMS
    values in all (each container's hook counts them), no ext types. Raises ValueError."""
    count = 0

    def counted(container: Any) -> Any:
        nonlocal count
        count += len(container) + 1
        if count > MAX_ITEMS:
            raise _TooMany(f"more than {MAX_ITEMS} values")
        return container

    return msgpack.unpackb(body, raw=False, use_list=False, strict_map_key=True, list_hook=counted,
                           object_hook=counted, max_array_len=MAX_ITEMS, max_map_len=MAX_MAP,
                           max_str_len=len(body), max_bin_len=len(body), max_ext_len=0)


class Budget:
    """Bytes of partial large frames (bodies over SMALL) buffered by every decoder of the process together:
    a header announcing a large body takes its length from the budget (FrameTooLarge when it is spent), the
    decoded frame or the decoder's end gives it back. Small bodies are bounded by the connection cap."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._lock = threading.Lock()  # decoders run on trio's thread and in session threads

    def take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.total:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.used -= n


BUFFERED = Budget(48 << 20)  # the process's budget (one daemon a process; tests share it, far under it)
