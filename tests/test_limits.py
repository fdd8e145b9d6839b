"""The limits of wire/limits.py and the Session checks of session/checks.py, without a daemon (test_fuzz.py
replays them against a live one): per-type body limits from the header, msgpack value counting, the budget
of partial large frames, the send timeout, the worker's shape / memory / address checks."""

from __future__ import annotations

import dataclasses
import socket

import msgpack
import pytest
import trio

import fake_tp
from dllp2p.formats.quant import QType
from dllp2p.scheduler import Peer, plan
from dllp2p.session.checks import (MEMORY_SHARE, SessionRefused, allowed_hosts, check_addresses, check_config,
                                   check_shapes, expected_shape, kv_bytes)
from dllp2p.wire import codec, limits
from dllp2p.wire.link import LinkTimeout, TrioLink
from dllp2p.wire.messages import PROTOCOL_VERSION, Generate, Session, SliceInfo, Step
from dllp2p.wire.reports import Status

V = PROTOCOL_VERSION


def header(msg_type: int, length: int) -> bytes:
    return codec.HEADER.pack(codec.MAGIC, V, msg_type, length)


@pytest.mark.parametrize("msg_type, length", [(codec.MsgType.STATUS, 1025), (codec.MsgType.SESSION, (2 << 20) + 1),
                                              (codec.MsgType.MESH, limits.SMALL + 1), (77, limits.SMALL + 1),
                                              (codec.MsgType.WEIGHT_CHUNK, (8 << 20) + 1)])
def test_a_body_over_its_types_limit_is_refused_at_the_header(msg_type, length):
    d = codec.FrameDecoder()
    with pytest.raises(codec.FrameTooLarge):
        d.feed(header(msg_type, length))
    assert d.buffered == 0


def test_msgpack_values_are_counted_and_limited():
    with pytest.raises(codec.MalformedFrame, match="max_array_len"):  # one array over the limit
        codec.decode_body(codec.MsgType.STEP, msgpack.packb([0] * (limits.MAX_ITEMS + 1)))
    half = [{}] * (limits.MAX_ITEMS // 2)
    with pytest.raises(codec.MalformedFrame, match="values"):  # arrays under it, too many values in all
        codec.decode_body(codec.MsgType.STEP, msgpack.packb([half, half]))
    with pytest.raises(codec.MalformedFrame):  # a map of 65 entries
        codec.decode_body(codec.MsgType.STOP, msgpack.packb({str(i): i for i in range(65)}))
    assert codec.FrameDecoder().feed(codec.encode(Status(3))) == [Status(3)]


def test_the_budget_of_partial_large_frames_is_shared_and_given_back():
    budget = limits.Budget(10 << 20)
    a, b, c = (codec.FrameDecoder(budget=budget) for _ in range(3))
    a.feed(header(codec.MsgType.WEIGHT_CHUNK, 4 << 20))
    b.feed(header(codec.MsgType.WEIGHT_CHUNK, 4 << 20))
    assert budget.used == 8 << 20
    with pytest.raises(codec.FrameTooLarge, match="budget"):
        c.feed(header(codec.MsgType.WEIGHT_CHUNK, 4 << 20))
    del a
    assert budget.used == 4 << 20  # a dropped decoder gives its share back
    c = codec.FrameDecoder(budget=budget)
    c.feed(header(codec.MsgType.WEIGHT_CHUNK, 4 << 20))
    assert budget.used == 8 << 20


def test_token_ids_over_int32_are_refused_by_the_messages():
    with pytest.raises(ValueError):
        Step(1, 0, (1 << 31,), 0)
    with pytest.raises(ValueError):
        Generate("", (2**63,), False, None, 1, 8, 0.0, 0, 1.0, 0.0, 1.0, None)


def test_a_peer_that_stops_reading_is_dropped_after_the_send_timeout():
    async def main():
        a, b = socket.socketpair()
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        link = TrioLink(trio.SocketStream(trio.socket.from_stdlib_socket(a)), "peer")
        link.send_timeout = 0.3
        with trio.fail_after(5):
            with pytest.raises(LinkTimeout, match="did not read"):
                for _ in range(1000):
                    await link.send(Generate("x" * 60000, (), False, None, 1, 8, 0.0, 0, 1.0, 0.0, 1.0, None))
        b.close()

    trio.run(main)


CFG = fake_tp.CONFIG


def _session(config=CFG, ctx=16, slices=None, address="127.0.0.1:9"):
    peers = [Peer("r", "", 1, 1.0), Peer("w", "127.0.0.1:1", 1, 1.0), Peer("x", address, 1, 1.0), Peer("y", "127.0.0.1:2", 1, 1.0)]
    p = plan(config, peers, 1, "pow2")
    assert p.n_nodes == 4
    node = p.nodes[1]
    if slices is None:
        slices = tuple(SliceInfo(n, n, int(QType.Q8_0 if len(s) > 1 else QType.F32), s, f"{i:064x}")
                       for i, n in enumerate(("token_embd.weight", "output_norm.weight", "blk.0.ffn_down.weight"))
                       if (s := expected_shape(n, config, node, p.exchange)))
    return Session(p, config, ctx, slices)


def test_the_worker_checks_shapes_sizes_and_addresses():
    s = _session()
    check_shapes(s, 1)
    check_config(s, 1, 1 << 30)
    bad = dataclasses.replace(s, slices=(SliceInfo("token_embd.weight", "t", int(QType.Q8_0), (32, CFG.dim), "a" * 64),))
    with pytest.raises(SessionRefused, match="token_embd.weight: shape"):
        check_shapes(bad, 1)
    with pytest.raises(SessionRefused, match="available"):
        check_config(s, 1, 1000)
    kv = kv_bytes(CFG, s.plan.nodes[1], s.ctx)  # one slot's KV: a batching root's session holds max_seqs of them
    enough = int((kv + sum(x.nbytes for x in s.slices)) / MEMORY_SHARE) + 1
    check_config(s, 1, enough)
    with pytest.raises(SessionRefused, match=r"x 8 slots and 3 slices need .* MiB available"):
        check_config(dataclasses.replace(s, max_seqs=8), 1, enough)
    check_config(dataclasses.replace(s, max_seqs=8, kv_positions=s.ctx), 1, enough)  # the root's budget: one context
    with pytest.raises(SessionRefused, match=rf"\({s.ctx + 1} positions in 8 slots\) and 3 slices"):
        check_config(dataclasses.replace(s, max_seqs=8, kv_positions=s.ctx + 1), 1, enough)  # one more
    with pytest.raises(ValueError, match="kv_positions"):
        dataclasses.replace(s, max_seqs=2, kv_positions=2 * s.ctx + 1)
    with pytest.raises(SessionRefused, match="maximum"):
        check_config(dataclasses.replace(s, config=dataclasses.replace(CFG, context_length=1 << 24), ctx=1 << 24), 1, None)
    check_addresses(s.plan, 1, allowed_hosts(set(), "127.0.0.1"))  # the root's own host
    far = _session(address="10.1.2.3:7340")
    with pytest.raises(SessionRefused, match="neither on a member"):
        check_addresses(far.plan, 1, allowed_hosts(set(), "127.0.0.1"))
    check_addresses(far.plan, 1, allowed_hosts({"10.1.2.3:7340"}, "127.0.0.1"))
    named = _session(address="pi2.lan:7340")  # a member known by its IP, named in the plan
    with pytest.raises(SessionRefused):
        check_addresses(named.plan, 1, allowed_hosts({"10.1.2.3:7340"}, "127.0.0.1"))
    check_addresses(named.plan, 1, allowed_hosts({"10.1.2.3:7340"}, "127.0.0.1"), {"pi2.lan": {"10.1.2.3"}})
