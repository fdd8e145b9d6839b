"""The wire: how nodes talk. Layer 4 of 8 (see README, Architecture): it knows the scheduler's Plan and
the election's Member (they travel in messages), never a session, a daemon or a command.

    messages.py  the typed messages, each valid by construction (frozen dataclasses); reports.py: the
                 Status and StatusReply family
    codec.py     messages <-> length-prefixed msgpack frames, sans I/O; ProtocolError and its kinds
    chunks.py    weight slices <-> WeightChunks, sha256 checked, sans I/O
    link.py      frames over trio streams and blocking sockets; the mesh sockets the engine uses
    client.py    the one client of a daemon: a prompt (Generate -> TokenChunk ... Done), Status

This package namespace re-exports the sans-I/O part (messages, codec, chunks), so `wire.Generate`,
`wire.encode`, `wire.FrameDecoder` need no trio; link and client are imported by name.
"""

from .chunks import AssembledSlice, SliceAssembler, weight_chunks
from .codec import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_FRAME,
    MESSAGE_TYPES,
    TYPE_OF,
    BadMagic,
    ChunkError,
    FrameDecoder,
    FrameTooLarge,
    MalformedFrame,
    Message,
    MsgType,
    ProtocolError,
    ProtocolVersionError,
    SliceHashMismatch,
    UnexpectedMessage,
    UnknownMessageType,
    decode_body,
    encode,
    error_code,
)
from .messages import (
    CHAT_ROLES,
    MAX_CHUNK,
    MAX_HOPS,
    MAX_STOPS,
    MAX_TOP,
    PROTOCOL_VERSION,
    ROLES,
    WIRE_OPTIONAL,
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
    slice_nbytes,
)
from .reports import (LinkRtt, NodeStatus, PlanEstimate, ProgressStatus, PushStatus, RecoveryStatus, Resources,
                      Status, StatusReply, StepStatus)
