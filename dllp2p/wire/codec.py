"""The wire protocol's frames, sans I/O: typed messages (messages.py) <-> length-prefixed msgpack frames.

A frame is a fixed 10-byte header then a msgpack body (big-endian header; these offsets never change,
so any version can tell another version apart):

    magic    4 bytes  b"DLP2"
    version  u8       PROTOCOL_VERSION
    type     u8       MsgType
    length   u32      body bytes, at most MAX_FRAME
    body     msgpack map {field name: value}: exactly the message dataclass's fields, each of its type

Error handling: every problem with received bytes is a ProtocolError (a ValueError) with a one-line
message. `fatal` errors (BadMagic, ProtocolVersionError, FrameTooLarge) leave the byte stream
unusable: the decoder refuses everything after them and the connection must be closed. The others
(MalformedFrame, UnknownMessageType, ChunkError, SliceHashMismatch) concern one frame or one slice,
which is dropped; the decoder goes on with the next frame and the peer may be told with an Error.
"""

from __future__ import annotations

import dataclasses
import struct
import types
import typing
from enum import IntEnum
from typing import Any, Union

import msgpack

from ..election import Member
from ..error_codes import ErrorCode
from ..formats import ModelConfig
from ..pipeline import PipelinePlan, Stage
from ..scheduler import NodeSlice, Plan
from .limits import BUFFERED, MAX_BODY, SMALL, Budget, unpack
from .messages import (
    PROTOCOL_VERSION,
    ChatTurn,
    Done,
    Error,
    Generate,
    Goodbye,
    Hello,
    Mesh,
    MeshHello,
    Need,
    Ready,
    Session,
    SliceInfo,
    Step,
    Stop,
    TokenChunk,
    WeightChunk,
    WeightsReady,
)
from .reports import (LeftOut, LinkRtt, NodeStatus, PlanEstimate, ProgressStatus, PushStatus, RecoveryStatus,
                      Resources, ServingStatus, Status, StatusReply, StepStatus)

MAGIC = b"DLP2"
HEADER = struct.Struct(">4sBBI")  # magic, version, type, body length
HEADER_SIZE = HEADER.size  # 10
MAX_FRAME = 8 << 20  # body bytes of any frame (each type has its own, lower limit: MAX_BODY)


# --- errors ---------------------------------------------------------------------------------------


class ProtocolError(ValueError):
    """Bytes or a message from a peer that cannot be used. `fatal`: the stream must be closed."""

    fatal = False


class BadMagic(ProtocolError):
    fatal = True


class ProtocolVersionError(ProtocolError):
    fatal = True


class FrameTooLarge(ProtocolError):
    fatal = True


class MalformedFrame(ProtocolError):
    """A frame whose body is not a valid message (it is skipped)."""


class UnknownMessageType(MalformedFrame):
    """A well-framed message of a type this version does not know (it is skipped)."""


class ChunkError(ProtocolError):
    """Weight chunks that do not make up their slice (wrong order, inconsistent metadata)."""


class SliceHashMismatch(ChunkError):
    """A reassembled weight slice whose sha256 is not the one announced."""


class UnexpectedMessage(ProtocolError):
    """A valid message at the wrong time (a Step before any plan, a chunk nobody asked for)."""


_ERROR_CODES: tuple[tuple[type, ErrorCode], ...] = (
    (BadMagic, ErrorCode.BAD_MAGIC),
    (ProtocolVersionError, ErrorCode.VERSION),
    (FrameTooLarge, ErrorCode.TOO_LARGE),
    (UnknownMessageType, ErrorCode.UNKNOWN_TYPE),
    (MalformedFrame, ErrorCode.MALFORMED_FRAME),
    (SliceHashMismatch, ErrorCode.SLICE_HASH),
    (ChunkError, ErrorCode.CHUNK),
    (UnexpectedMessage, ErrorCode.UNEXPECTED),
)


def error_code(e: ProtocolError) -> ErrorCode:
    """The Error.code that tells a peer about e."""
    return next((code for cls, code in _ERROR_CODES if isinstance(e, cls)), ErrorCode.PROTOCOL)



# --- message types: each class's number on the wire ------------------------------------------------


class MsgType(IntEnum):
    HELLO = 1
    # 2 (PLAN), 6 (ACTIVATIONS), 7 (LOGITS): retired; never reused
    WEIGHT_CHUNK = 3
    WEIGHTS_READY = 4
    STEP = 5
    STOP = 8
    ERROR = 9
    SESSION = 10
    NEED = 11
    MESH = 12
    MESH_HELLO = 13
    READY = 14
    STATUS = 15
    STATUS_REPLY = 16
    GENERATE = 17
    TOKEN_CHUNK = 18
    DONE = 19
    GOODBYE = 20


Message = Union[Hello, WeightChunk, WeightsReady, Step, Stop, Error,
                Session, Need, Mesh, MeshHello, Ready, Status, StatusReply, Generate, TokenChunk, Done, Goodbye]

MESSAGE_TYPES: dict[MsgType, type] = {
    MsgType.HELLO: Hello,
    MsgType.WEIGHT_CHUNK: WeightChunk,
    MsgType.WEIGHTS_READY: WeightsReady,
    MsgType.STEP: Step,
    MsgType.STOP: Stop,
    MsgType.ERROR: Error,
    MsgType.SESSION: Session,
    MsgType.NEED: Need,
    MsgType.MESH: Mesh,
    MsgType.MESH_HELLO: MeshHello,
    MsgType.READY: Ready,
    MsgType.STATUS: Status,
    MsgType.STATUS_REPLY: StatusReply,
    MsgType.GENERATE: Generate,
    MsgType.TOKEN_CHUNK: TokenChunk,
    MsgType.DONE: Done,
    MsgType.GOODBYE: Goodbye,
}
TYPE_OF: dict[type, MsgType] = {cls: t for t, cls in MESSAGE_TYPES.items()}

def max_body(msg_type: int) -> int:
    """The most body bytes a frame of this type may carry (limits.MAX_BODY; an unknown type: SMALL)."""
    try:
        return MAX_BODY.get(MESSAGE_TYPES[MsgType(msg_type)], SMALL)
    except (ValueError, KeyError):
        return SMALL


# --- field schemas: each dataclass's fields and their resolved types -------------------------------

_FIELDS: dict[type, tuple[tuple[str, Any], ...]] = {}


def _fields(cls: type) -> tuple[tuple[str, Any], ...]:
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls))
    return _FIELDS[cls]


for _cls in (*MESSAGE_TYPES.values(), Plan, NodeSlice, PipelinePlan, Stage, SliceInfo, ModelConfig, Member, NodeStatus,
             StepStatus, Resources, LinkRtt, PushStatus, ProgressStatus, LeftOut, PlanEstimate, RecoveryStatus,
             ServingStatus, ChatTurn):
    _fields(_cls)  # resolve every schema at import: a bad annotation fails here, not mid-stream
del _cls


_OPTIONAL: dict[type, frozenset[str]] = {}


def _optional(cls: type) -> frozenset[str]:
    """cls's wire_optional fields."""
    if cls not in _OPTIONAL:
        _OPTIONAL[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("wire_optional"))
    return _OPTIONAL[cls]


def _bad(where: str, expected: str, value: object) -> MalformedFrame:
    return MalformedFrame(f"{where}: expected {expected}, got {type(value).__name__}")


def _from_wire(value: Any, tp: Any, where: str) -> Any:
    """A msgpack-decoded value -> the value of type tp, checked; raises MalformedFrame."""
    if tp is int:
        if type(value) is not int:
            raise _bad(where, "int", value)
        return value
    if tp is float:
        if type(value) not in (int, float):
            raise _bad(where, "float", value)
        return float(value)
    if tp in (str, bytes, bool):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if type(value) is not tuple:
            raise _bad(where, "array", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_wire(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise MalformedFrame(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_from_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _from_wire(value, inner[0] if len(inner) == 1 else Union[tuple(inner)], where)
    if origin in (Union, types.UnionType):  # of dataclasses: the one whose fields the map names
        if type(value) is not dict:
            raise _bad(where, "a map", value)
        for cls in args:
            names = {n for n, _ in _fields(cls)}
            if set(value) <= names and names - set(value) <= _optional(cls):
                return _dataclass_from_wire(cls, value, where)
        raise MalformedFrame(f"{where}: the fields are none of {', '.join(a.__name__ for a in args)}'s")
    if dataclasses.is_dataclass(tp):
        return _dataclass_from_wire(tp, value, where)
    raise TypeError(f"{where}: no wire form for {tp!r}")  # pragma: no cover - schemas are fixed


def _dataclass_from_wire(cls: type, value: Any, where: str) -> Any:
    if type(value) is not dict:
        raise _bad(where, f"a {cls.__name__} map", value)
    fields = _fields(cls)
    names = {name for name, _ in fields}
    optional = _optional(cls)
    missing = [n for n, _ in fields if n not in value and n not in optional]
    if missing:
        raise MalformedFrame(f"{where}: missing field {missing[0]!r}")
    extra = sorted(str(k) for k in value if k not in names)
    if extra:
        raise MalformedFrame(f"{where}: unexpected field {extra[0]!r}")
    kwargs = {n: _from_wire(value[n], tp, f"{where}.{n}") for n, tp in fields if n in value}
    try:
        return cls(**kwargs)
    except ValueError as e:  # the dataclass's own invariants (PlanError included)
        raise MalformedFrame(f"{where}: {e}") from None


def _to_wire(value: Any, tp: Any, where: str) -> Any:
    """A message's field value -> plain msgpack-able data, type-checked like _from_wire."""
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(where, "float", value)
        return float(value)
    if tp is bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise _bad(where, "bytes", value)
        return value
    if tp in (int, str, bool):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise _bad(where, "tuple", value)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise MalformedFrame(f"{where}: expected {len(item_types)} items, got {len(value)}")
        return [_to_wire(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, item_types))]
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return None if value is None else _to_wire(value, inner[0] if len(inner) == 1 else Union[tuple(inner)], where)
    if origin in (Union, types.UnionType):  # of dataclasses, told apart by their fields (_from_wire)
        if type(value) not in args:
            raise _bad(where, " or ".join(a.__name__ for a in args), value)
        return _to_wire(value, type(value), where)
    if dataclasses.is_dataclass(tp):
        if type(value) is not tp:
            raise _bad(where, tp.__name__, value)
        return {n: _to_wire(getattr(value, n), t, f"{where}.{n}") for n, t in _fields(tp)}
    raise TypeError(f"{where}: no wire form for {tp!r}")  # pragma: no cover


# --- frames ---------------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One message -> one frame. Raises MalformedFrame (a field of the wrong type), FrameTooLarge."""
    cls = type(msg)
    if cls not in TYPE_OF:
        raise MalformedFrame(f"{cls.__name__} is not a protocol message")
    try:
        body = msgpack.packb(_to_wire(msg, cls, cls.__name__), use_bin_type=True)
    except OverflowError as e:  # an int over 64 bits
        raise MalformedFrame(f"{cls.__name__}: {e}") from None
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"{cls.__name__} frame of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return HEADER.pack(MAGIC, PROTOCOL_VERSION, TYPE_OF[cls], len(body)) + body


def decode_body(msg_type: int, body: bytes) -> Message:
    """A frame's type and body -> its message. Raises UnknownMessageType, MalformedFrame."""
    try:
        cls = MESSAGE_TYPES[MsgType(msg_type)]
    except ValueError:
        raise UnknownMessageType(f"unknown message type {msg_type} ({len(body)}-byte frame skipped)") from None
    if len(body) > max_body(msg_type):
        raise FrameTooLarge(f"{cls.__name__} body of {len(body)} bytes is over its {max_body(msg_type)}-byte limit")
    try:
        value = unpack(body)
    except (ValueError, TypeError) as e:  # msgpack's own errors are ValueErrors; unhashable keys TypeError
        raise MalformedFrame(f"{cls.__name__} body is not valid msgpack: {e}") from None
    msg = _dataclass_from_wire(cls, value, cls.__name__)
    if cls is Hello and msg.protocol_version != PROTOCOL_VERSION:
        raise _version_error(msg.protocol_version)
    return msg


def _version_error(theirs: int) -> ProtocolVersionError:
    return ProtocolVersionError(
        f"peer speaks dllp2p protocol version {theirs}, this node speaks version {PROTOCOL_VERSION}"
    )


class FrameDecoder:
    """Bytes in, messages out, for one stream; no I/O. Bytes may arrive split or joined anyhow.

    `receive(data)` buffers; `next_message()` returns the next whole message or None, raising a
    ProtocolError exactly at a bad frame. `feed(data)` does both: it returns every message before the
    first bad frame and raises that frame's error then, or on the next call if messages came first
    (so none is lost). The header is checked as soon as its bytes arrive: a bad magic as soon as the
    first bytes differ, an oversized frame before any of its body is buffered.

    Error handling: after a fatal error (BadMagic, ProtocolVersionError, FrameTooLarge) the decoder
    drops its buffer, ignores further bytes and raises the same error on every call: close the
    stream. After MalformedFrame / UnknownMessageType the bad frame is consumed and decoding goes on.
    """

    def __init__(self, max_frame: int = MAX_FRAME, budget: Budget = BUFFERED) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._fatal: ProtocolError | None = None
        self._deferred: ProtocolError | None = None
        self._budget = budget
        self._taken = 0  # of the budget, for the large frame being buffered

    def __del__(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._taken:
            self._budget.give(self._taken)
            self._taken = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded."""
        return len(self._buf)

    def receive(self, data: bytes | bytearray | memoryview) -> None:
        if self._fatal is None:
            self._buf += data

    def next_message(self) -> Message | None:
        frame = self.next_frame()
        return None if frame is None else self.decode(*frame)

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next whole frame's (type, body), not decoded yet (decode it with `decode`), or None."""
        if self._fatal is not None:
            raise self._fatal
        try:
            header = self._check_header()
        except ProtocolError as e:
            self._fail(e)
            raise
        if header is None:
            return None
        msg_type, length = header
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:  # one copy of the body; the view is released before the del
            body = view[HEADER_SIZE:end].tobytes()
        del self._buf[:end]
        self._release()
        return msg_type, body

    def decode(self, msg_type: int, body: bytes) -> Message:
        """A frame from next_frame -> its message (may run in another thread: it touches no buffer)."""
        try:
            return decode_body(msg_type, body)
        except ProtocolError as e:
            if e.fatal:
                self._fail(e)
            raise

    def _fail(self, e: ProtocolError) -> None:
        self._fatal = e
        self._buf.clear()
        self._release()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        self.receive(data)
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err
        out: list[Message] = []
        while True:
            try:
                msg = self.next_message()
            except ProtocolError as e:
                if not out:
                    raise
                self._deferred = e
                return out
            if msg is None:
                return out
            out.append(msg)

    def eof(self) -> None:
        """The stream ended: raises a deferred error, or MalformedFrame if it ended inside a frame."""
        if self._fatal is not None:
            raise self._fatal
        if self._deferred is not None:
            err, self._deferred = self._deferred, None
            raise err
        if self._buf:
            raise MalformedFrame(f"stream ended inside a frame ({len(self._buf)} bytes left over)")

    def _check_header(self) -> tuple[int, int] | None:
        """-> (type, body length) once the header is whole and valid; None while it is incomplete."""
        buf = self._buf
        head = bytes(buf[: len(MAGIC)])
        if head != MAGIC[: len(head)]:
            raise BadMagic(f"not a dllp2p frame (magic {head!r}, expected {MAGIC!r})")
        if len(buf) > len(MAGIC) and buf[len(MAGIC)] != PROTOCOL_VERSION:
            raise _version_error(buf[len(MAGIC)])
        if len(buf) < HEADER_SIZE:
            return None
        _, _, msg_type, length = HEADER.unpack_from(buf)
        if length > self.max_frame:
            raise FrameTooLarge(f"frame of {length} bytes is over the {self.max_frame}-byte limit")
        if length > max_body(msg_type):
            raise FrameTooLarge(f"frame of type {msg_type} and {length} bytes is over that type's "
                                f"{max_body(msg_type)}-byte limit")
        if length > SMALL and not self._taken and len(buf) < HEADER_SIZE + length:
            if not self._budget.take(length):
                raise FrameTooLarge(f"frame of {length} bytes: the daemon's {self._budget.total}-byte budget of "
                                    "partial large frames is spent")
            self._taken = length
        return msg_type, length
