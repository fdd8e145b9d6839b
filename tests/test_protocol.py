"""The wire protocol without sockets: round trips, any byte split, and a named error for every bad input."""

from __future__ import annotations

import dataclasses
import hashlib
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dllp2p import wire as P
from dllp2p.formats import ModelConfig
from dllp2p.formats.quant import TRAITS, QType, quantize
from dllp2p.scheduler import Peer, plan

SHA = hashlib.sha256(b"x").hexdigest()
CONFIG = ModelConfig("llama", 576, 30, 9, 3, 64, 1536, 49152, 8192, 100000.0, 64, 1e-5, True)
PLAN = plan(CONFIG, [Peer("root", "", 2, 1.0), Peer("w1", "10.0.0.2:7000", 4, 2.5)], epoch=7)
SESSION = P.Session(PLAN, CONFIG, 64, (P.SliceInfo("blk.0.attn_q.weight", "rows 0:2", int(QType.Q4_0), (2, 64), SHA),))


def _samples() -> list[P.Message]:
    return [
        P.Hello(P.PROTOCOL_VERSION, "node-a", "worker", 4, 12.5, (SHA,)),
        P.Hello(P.PROTOCOL_VERSION, "root-1", "root", 1, 3.0),
        SESSION,
        P.WeightChunk(7, "blk.0.attn_q.weight", "blk.0.attn_q.weight[0:2, :]", int(QType.Q4_0), (2, 64), 4, 72, SHA,
                      b"\x01" * 60),
        P.WeightsReady(7, 123456, 3),
        P.Step(7, 0, (1, 2, 3), 0),
        P.Step(7, 1, (1, 2, 3, 9), 0, 4, rows=((2, 17, 1), (0, 0, 3)), copies=((2, 1, 16),)),  # a batch
        P.Session(PLAN, CONFIG, 64, SESSION.slices, 8),
        P.Session(PLAN, CONFIG, 64, SESSION.slices, 8, 100),  # a batching root's KV budget: 100 positions
        P.Stop(7, "done"),
        P.Error("slice_hash", "blk.0.attn_q.weight: hash mismatch"),
        P.Error("peer_lost", "node w1 lost node 2 (w2, 10.0.0.3:7000): timed out", 2),
    ]


def _frame(msg_type: int, body: bytes, version: int = P.PROTOCOL_VERSION, magic: bytes = P.MAGIC) -> bytes:
    return P.HEADER.pack(magic, version, msg_type, len(body)) + body


def _body(msg) -> dict:
    return msgpack.unpackb(P.encode(msg)[P.HEADER_SIZE:], raw=False)


def _pack(d: dict) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


# --- round trips ---


@pytest.mark.parametrize("msg", _samples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips(msg):
    frame = P.encode(msg)
    magic, version, msg_type, length = P.HEADER.unpack_from(frame)
    assert (magic, version, length) == (b"DLP2", P.PROTOCOL_VERSION, len(frame) - 10)
    assert P.MESSAGE_TYPES[msg_type] is type(msg)
    (back,) = P.FrameDecoder().feed(frame)
    assert back == msg and type(back) is type(msg)


def test_plan_round_trips_as_data():
    (back,) = P.FrameDecoder().feed(P.encode(SESSION))
    assert back.plan == PLAN and back.plan.nodes[1].address == "10.0.0.2:7000" and back.plan.nodes[1].q_rows == (384, 576)


def test_a_stream_fed_byte_by_byte_and_all_at_once():
    msgs = _samples()
    stream = b"".join(P.encode(m) for m in msgs)
    dec = P.FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == msgs and dec.buffered == 0
    assert P.FrameDecoder().feed(stream) == msgs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(_samples()) - 1), min_size=1, max_size=12), st.lists(st.integers(1, 400), max_size=30))
def test_any_split_of_any_stream(order, cuts):
    msgs = [_samples()[i] for i in order]
    stream = b"".join(P.encode(m) for m in msgs)
    dec, out, pos = P.FrameDecoder(), [], 0
    for c in cuts:
        out += dec.feed(stream[pos : pos + c])
        pos += c
    out += dec.feed(stream[pos:])
    dec.eof()
    assert out == msgs


ints = st.integers(0, 2**63)
names = st.text(min_size=1, max_size=40)
texts = st.text(max_size=200)


@st.composite
def weight_chunks(draw):
    rows, blocks, qtype = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.sampled_from(list(QType)))
    shape = (rows, blocks * TRAITS[qtype].block_values)  # 256 for the K-quants
    total = P.slice_nbytes(qtype, shape)
    offset = draw(st.integers(0, total - 1))
    data = draw(st.binary(min_size=1, max_size=total - offset))
    sha = draw(st.binary(min_size=32, max_size=32)).hex()
    return P.WeightChunk(draw(ints), draw(names), draw(texts), int(qtype), shape, offset, total, sha, data)


messages = st.one_of(
    st.builds(P.Hello, st.just(P.PROTOCOL_VERSION), names, st.sampled_from(P.ROLES), st.integers(1, 1024),
              st.floats(1e-3, 1e6), st.lists(st.binary(min_size=32, max_size=32).map(bytes.hex), max_size=5).map(tuple)),
    weight_chunks(),
    st.builds(P.WeightsReady, ints, ints, ints),
    st.builds(P.Step, ints, ints, st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=50).map(tuple), ints),
    st.builds(P.Stop, ints, texts),
    st.builds(P.Error, names, texts),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_generated_messages_round_trip(msg):
    (back,) = P.FrameDecoder().feed(P.encode(msg))
    assert back == msg


# --- header errors: fatal, the stream must be closed ---


def test_bad_magic_is_caught_on_the_first_wrong_byte():
    dec = P.FrameDecoder()
    assert dec.feed(b"DL") == []
    with pytest.raises(P.BadMagic, match=r"not a dllp2p frame \(magic b'DLX'"):
        dec.feed(b"X")
    assert dec.buffered == 0


def test_http_request_is_bad_magic():
    with pytest.raises(P.BadMagic):
        P.FrameDecoder().feed(b"GET / HTTP/1.1\r\n\r\n")


def test_other_protocol_version_names_both():
    v = P.PROTOCOL_VERSION
    frame = _frame(P.MsgType.HELLO, _pack({}), version=v + 1)
    with pytest.raises(P.ProtocolVersionError, match=f"peer speaks dllp2p protocol version {v + 1}, this node speaks version {v}"):
        P.FrameDecoder().feed(frame[:5])  # caught as soon as the version byte arrives


def test_hello_claiming_another_version_is_a_version_error():
    v = P.PROTOCOL_VERSION
    body = _body(P.Hello(v, "a", "worker", 1, 1.0)) | {"protocol_version": v + 2}
    with pytest.raises(P.ProtocolVersionError, match=f"version {v + 2}, this node speaks version {v}"):
        P.FrameDecoder().feed(_frame(P.MsgType.HELLO, _pack(body)))


def test_oversized_frame_is_refused_before_its_body_is_buffered():
    dec = P.FrameDecoder()
    header = P.HEADER.pack(P.MAGIC, P.PROTOCOL_VERSION, P.MsgType.WEIGHT_CHUNK, P.MAX_FRAME + 1)
    with pytest.raises(P.FrameTooLarge, match=f"frame of {P.MAX_FRAME + 1} bytes is over the {P.MAX_FRAME}-byte limit"):
        dec.feed(header)
    with pytest.raises(P.FrameTooLarge):  # still fatal, and nothing more is kept
        dec.feed(b"\0" * 1000)
    assert dec.buffered == 0


def test_fatal_errors_repeat_and_the_decoder_refuses_everything_after():
    dec = P.FrameDecoder()
    with pytest.raises(P.BadMagic):
        dec.feed(b"nope")
    with pytest.raises(P.BadMagic):
        dec.feed(P.encode(P.Stop(0, "")))
    with pytest.raises(P.BadMagic):
        dec.eof()


def test_encode_refuses_oversized_frames(monkeypatch):
    monkeypatch.setattr(P.codec, "MAX_FRAME", 100)
    with pytest.raises(P.FrameTooLarge, match="WeightChunk frame of"):
        P.encode(_samples()[3])


# --- body errors: the frame is skipped, the decoder goes on ---

GOOD = P.encode(P.Stop(1, "ok"))
STEP_BODY = _body(P.Step(1, 0, (5,), 0))


@pytest.mark.parametrize(
    "msg_type,body,error,match",
    [
        (200, b"", P.UnknownMessageType, "unknown message type 200"),
        (P.MsgType.STEP, b"\xc1", P.MalformedFrame, "Step body is not valid msgpack"),
        (P.MsgType.STEP, b"", P.MalformedFrame, "Step body is not valid msgpack"),
        (P.MsgType.STEP, _pack(STEP_BODY) + b"\x00", P.MalformedFrame, "not valid msgpack"),
        (P.MsgType.STEP, _pack([1, 2]), P.MalformedFrame, "Step: expected a Step map, got tuple"),
        (P.MsgType.STEP, _pack({1: 2}), P.MalformedFrame, "not valid msgpack"),
        (P.MsgType.STEP, _pack({k: v for k, v in STEP_BODY.items() if k != "seq"}), P.MalformedFrame,
         "Step: missing field 'seq'"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"extra": 1}), P.MalformedFrame, "Step: unexpected field 'extra'"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"seq": "0"}), P.MalformedFrame, "Step.seq: expected int, got str"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"seq": True}), P.MalformedFrame, "Step.seq: expected int, got bool"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"seq": 1.0}), P.MalformedFrame, "Step.seq: expected int, got float"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"tokens": [1, "a"]}), P.MalformedFrame, r"Step.tokens\[1\]: expected int"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"tokens": []}), P.MalformedFrame, "tokens must be one or more"),
        (P.MsgType.STEP, _pack(STEP_BODY | {"epoch": -1}), P.MalformedFrame, "negative epoch"),
        (P.MsgType.STOP, _pack({"epoch": 0, "reason": b"bytes"}), P.MalformedFrame, "Stop.reason: expected str, got bytes"),
        (P.MsgType.STOP, _pack({"epoch": 0, "reason": msgpack.ExtType(1, b"")}), P.MalformedFrame, "expected str, got ExtType"),
        (P.MsgType.STOP, b"\x82\xa5epoch\x00\xa6reason\xa2\xff\xfe", P.MalformedFrame, "not valid msgpack"),  # bad UTF-8
        (P.MsgType.HELLO, _pack(_body(P.Hello(1, "a", "worker", 1, 1.0)) | {"role": "boss"}), P.MalformedFrame,
         "role 'boss' is not one of"),
        (P.MsgType.HELLO, _pack(_body(P.Hello(1, "a", "worker", 1, 1.0)) | {"capacity": float("nan")}),
         P.MalformedFrame, "capacity nan"),
        (P.MsgType.HELLO, _pack(_body(P.Hello(1, "a", "worker", 1, 1.0)) | {"cache_keys": ["zz"]}),
         P.MalformedFrame, "cache_keys"),
        (2, _pack(_body(SESSION)["plan"]), P.UnknownMessageType, "unknown message type 2"),  # the retired PLAN
        (6, b"\x80", P.UnknownMessageType, "unknown message type 6"),  # ACTIVATIONS
        (7, b"\x80", P.UnknownMessageType, "unknown message type 7"),  # LOGITS
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"total": 71}), P.MalformedFrame,
         r"total 71 is not the size of Q4_0\[2, 64\]"),
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"offset": 20}), P.MalformedFrame, "outside the slice"),
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"qtype": 99}), P.MalformedFrame, "unknown tensor type 99"),
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"sha256": SHA.upper()}), P.MalformedFrame, "sha256"),
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"shape": [2, 48]}), P.MalformedFrame,
         "not a multiple of the block size"),
        (P.MsgType.WEIGHT_CHUNK, _pack(_body(_samples()[3]) | {"data": "text"}), P.MalformedFrame, "expected bytes"),
    ],
)
def test_bad_bodies_are_named_and_skipped(msg_type, body, error, match):
    dec = P.FrameDecoder()
    with pytest.raises(error, match=match) as info:
        dec.feed(_frame(msg_type, body))
    assert not info.value.fatal and "\n" not in str(info.value)
    assert dec.feed(GOOD) == [P.Stop(1, "ok")]  # the decoder stays usable


def _plan_body(**node1_changes) -> bytes:
    """A Session body whose plan's node 1 has node1_changes."""
    body = _body(SESSION)
    body["plan"]["nodes"][1] |= node1_changes
    return _pack(body)


@pytest.mark.parametrize(
    "body,match",
    [
        (_plan_body(kv_heads=[2, 4], q_heads=[6, 12]), "kv_heads end at 4, expected 3"),
        (_plan_body(ffn_rows=[700, 1536]), "does not follow"),
        (_plan_body(kv_heads=[2]), r"Session.plan.nodes\[1\].kv_heads: expected 2 items, got 1"),
        (_plan_body(threads="4"), r"Session.plan.nodes\[1\].threads: expected int"),
        (_plan_body(extra=1), r"Session.plan.nodes\[1\]: unexpected field 'extra'"),
    ],
)
def test_invalid_plans_are_malformed_frames(body, match):
    with pytest.raises(P.MalformedFrame, match=match):
        P.FrameDecoder().feed(_frame(P.MsgType.SESSION, body))


def test_an_error_after_good_frames_comes_on_the_next_call_and_nothing_is_lost():
    dec = P.FrameDecoder()
    bad = _frame(P.MsgType.STEP, b"\xc1")
    assert dec.feed(GOOD + bad + GOOD) == [P.Stop(1, "ok")]
    with pytest.raises(P.MalformedFrame):
        dec.feed(b"")
    assert dec.feed(b"") == [P.Stop(1, "ok")]


def test_next_message_raises_exactly_at_the_bad_frame():
    dec = P.FrameDecoder()
    dec.receive(GOOD + _frame(99, b"") + GOOD)
    assert dec.next_message() == P.Stop(1, "ok")
    with pytest.raises(P.UnknownMessageType):
        dec.next_message()
    assert dec.next_message() == P.Stop(1, "ok")
    assert dec.next_message() is None


def test_eof_inside_a_frame():
    dec = P.FrameDecoder()
    assert dec.feed(GOOD[:-1]) == []
    with pytest.raises(P.MalformedFrame, match="stream ended inside a frame"):
        dec.eof()
    P.FrameDecoder().eof()  # a clean end is fine


def test_every_error_is_a_value_error():
    for cls in (P.BadMagic, P.ProtocolVersionError, P.FrameTooLarge, P.MalformedFrame, P.UnknownMessageType,
                P.ChunkError, P.SliceHashMismatch):
        assert issubclass(cls, P.ProtocolError) and issubclass(cls, ValueError)


# --- encode refuses messages that would be malformed ---


@pytest.mark.parametrize(
    "msg,match",
    [
        (P.Step(0, 0, (np.int64(3),), 0), r"Step.tokens\[0\]: expected int, got int64"),
        (P.Step(0, 0, [3], 0), "Step.tokens: expected tuple, got list"),
        (P.Stop(0, 5), "Stop.reason: expected str"),
        ("not a message", "is not a protocol message"),
    ],
)
def test_encode_checks_types(msg, match):
    with pytest.raises(P.MalformedFrame, match=match):
        P.encode(msg)


def test_messages_check_their_invariants_when_built():
    with pytest.raises(ValueError, match="role"):
        P.Hello(1, "a", "king", 1, 1.0)
    with pytest.raises(ValueError, match="chunk of 0 bytes"):
        P.WeightChunk(0, "t", "t", int(QType.F32), (1,), 0, 4, SHA, b"")


# --- weight slices in chunks ---


def _slice(n_rows=100, seed=0):
    raw = quantize(np.random.default_rng(seed).standard_normal((n_rows, 64)).astype(np.float32), QType.Q4_0)
    return raw, hashlib.sha256(raw.data).hexdigest()


def test_weight_chunks_reassemble_and_verify():
    raw, sha = _slice()
    chunks = list(P.weight_chunks(3, "blk.0.attn_q.weight", "src[0:100, :]", QType.Q4_0, (100, 64), raw, sha, 1000))
    assert [c.offset for c in chunks] == [0, 1000, 2000, 3000] and chunks[-1].total == raw.nbytes == 3600
    dec, asm = P.FrameDecoder(), P.SliceAssembler()
    got = [asm.add(m) for m in dec.feed(b"".join(P.encode(c) for c in chunks))]
    assert got[:-1] == [None] * 3 and asm.received_bytes == 3600 and asm.pending == ()
    done = got[-1]
    assert done.data == raw.tobytes() and done.sha256 == sha and done.qtype == QType.Q4_0 and done.shape == (100, 64)


def test_wrong_hash_is_named_and_the_assembler_goes_on():
    raw, sha = _slice()
    other_raw, other_sha = _slice(n_rows=10, seed=1)
    asm = P.SliceAssembler()
    bad = list(P.weight_chunks(0, "blk.0.attn_k.weight", "", QType.Q4_0, (100, 64), raw, SHA, 2000))
    good = list(P.weight_chunks(0, "blk.0.attn_v.weight", "", QType.Q4_0, (10, 64), other_raw, other_sha, 100))
    assert asm.add(bad[0]) is None
    for c in good[:-1]:
        assert asm.add(c) is None
    with pytest.raises(P.SliceHashMismatch, match=r"blk.0.attn_k.weight: received bytes hash to [0-9a-f]{16}.., announced"):
        asm.add(bad[1])
    assert asm.add(good[-1]).data == other_raw.tobytes()


def test_chunks_out_of_order_or_inconsistent():
    raw, sha = _slice()
    chunks = list(P.weight_chunks(0, "t", "", QType.Q4_0, (100, 64), raw, sha, 1000))
    asm = P.SliceAssembler()
    with pytest.raises(P.ChunkError, match="chunk at byte 1000, expected byte 0"):
        asm.add(chunks[1])
    asm.add(chunks[0])
    with pytest.raises(P.ChunkError, match="disagrees"):
        asm.add(dataclasses.replace(chunks[1], epoch=1))
    assert asm.pending == ()  # the broken slice was dropped; it can start over
    assert [asm.add(c) is None for c in chunks] == [True, True, True, False]


def test_weight_chunks_chunk_size_bounds():
    raw, sha = _slice()
    with pytest.raises(ValueError, match="chunk size"):
        list(P.weight_chunks(0, "t", "", QType.Q4_0, (100, 64), raw, sha, P.MAX_CHUNK + 1))


def test_hello_gives_a_scheduler_peer():
    assert P.Hello(1, "w", "worker", 3, 2.0).peer("h:1") == Peer("w", "h:1", 3, 2.0)


def test_header_layout_is_fixed():
    assert P.HEADER_SIZE == 10 and struct.calcsize(">4sBBI") == 10


# --- StatusReply's later fields: memory and load, link round-trips, weight-push progress ---

STATUS = P.StatusReply(
    4, "pi-1", (), None, None, 0,
    resources=P.Resources(50 << 20, 8 << 30, 6 << 30, 0.75, 4),
    links=(P.LinkRtt("pi-2", 0.42, 1000.0), P.LinkRtt("pi-3", 1.5, 1001.0)),
    push=P.PushStatus(9, 300, 1200, 999.5, False),
)


def test_status_reply_new_fields_round_trip():
    (back,) = P.FrameDecoder().feed(P.encode(STATUS))
    assert back == STATUS and back.push.fraction == 0.25 and back.links[0].rtt_ms == pytest.approx(0.42)
    assert P.PushStatus(0, 0, 0, 1.0, True).fraction == 1.0  # nothing needed: done


def test_status_reply_from_an_older_daemon_decodes_with_defaults():
    body = _body(STATUS)
    for name in ("resources", "links", "push"):
        del body[name]
    back = P.decode_body(P.MsgType.STATUS_REPLY, _pack(body))
    assert (back.resources, back.links, back.push) == (None, (), None) and back.seq == 4
    del body["sessions"]  # the fields every version sends are still required
    with pytest.raises(P.MalformedFrame, match="missing field 'sessions'"):
        P.decode_body(P.MsgType.STATUS_REPLY, _pack(body))


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b["push"].update(done=1201), "push progress 1201 of 1200"),
    (lambda b: b["push"].update(finished=True), "finished push with bytes missing"),
    (lambda b: b["push"].pop("total"), "missing field 'total'"),
    (lambda b: b["resources"].update(rss=-1), "negative memory"),
    (lambda b: b["resources"].update(load1=float("nan")), "load must be finite"),
    (lambda b: b["resources"].update(cores=0), "cores 0"),
    (lambda b: b["links"][0].update(rtt_ms=-0.1), "round-trip"),
    (lambda b: b["links"][1].update(node_id="pi-2"), "link is listed twice"),
    (lambda b: b.update(links={}), "expected array"),
    (lambda b: b.update(extra=1), "unexpected field 'extra'"),
])
def test_bad_status_reply_new_fields_are_malformed(mutate, match):
    body = _body(STATUS)
    mutate(body)
    with pytest.raises(P.MalformedFrame, match=match):
        P.decode_body(P.MsgType.STATUS_REPLY, _pack(body))
