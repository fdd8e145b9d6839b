"""The worker daemon over loopback, in-process on trio: handshake, every kind of bad input answered with
an Error and survived, weight slices verified and cached, sessions that end and leave the node idle.

The compute module is tests/fake_tp.py (same API as dllp2p.tp); the real one is in test_cluster.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import trio

import fake_tp
from dllp2p import wire as P
from dllp2p.config import Timeouts
from dllp2p.daemon import Daemon, DaemonConfig
from dllp2p.session.slices import SliceCache, node_id, storage_array
from dllp2p.formats import QType
from dllp2p.wire.link import LinkClosed, MeshRefused, TrioLink, dial_mesh, open_link
from dllp2p.scheduler import Peer, plan

T = Timeouts(hello=2, idle=5, transfer=5, mesh=3, build=5, socket=3, slot=1)
ROOT = P.Hello(P.PROTOCOL_VERSION, "root-test", "root", 1, 1.0)
MODEL = fake_tp.model()


def serve(state_dir: Path, body, limit: float = 20) -> None:
    """Run body(daemon, address) against a daemon listening on 127.0.0.1, then stop the daemon."""

    async def main() -> None:
        with trio.fail_after(limit):
            async with trio.open_nursery() as nursery:
                d = Daemon(DaemonConfig("127.0.0.1", 0, 1, state_dir, timeouts=T, cluster=fake_tp.TEST_CLUSTER), tp=fake_tp)
                address = await nursery.start(d.serve)
                await body(d, address)
                nursery.cancel_scope.cancel()

    trio.run(main)


async def control(address: str) -> tuple[TrioLink, P.Hello]:
    link = await open_link(address, 2)
    await link.send(ROOT)
    hello = await link.receive(2)
    assert isinstance(hello, P.Hello), hello
    return link, hello


async def raw_exchange(address: str, data: bytes) -> tuple[P.Message, bool]:
    """Send raw bytes; -> (the daemon's first answer, whether it then closed the connection)."""
    link = await open_link(address, 2)
    await link.stream.send_all(data)
    reply = await link.receive(2)
    try:
        await link.receive(2)
        closed = False
    except LinkClosed:
        closed = True
    await link.aclose()
    return reply, closed


async def still_serves(address: str) -> None:
    link, hello = await control(address)
    assert hello.role == "worker"
    await link.aclose()


def session_for(worker_id: str, address: str = "127.0.0.1:9") -> tuple[P.Session, dict]:
    p = plan(MODEL.config, [Peer(ROOT.node_id, "", 1, 1.0), Peer(worker_id, address, 1, 1.0)], 0)
    tensors = fake_tp.node_tensors(MODEL, p, 1)
    slices = tuple(P.SliceInfo(n, n, int(t.qtype), t.shape, t.sha256) for n, t in tensors.items())
    return P.Session(p, MODEL.config, 32, slices), tensors


async def push(link: TrioLink, epoch: int, tensor, data: bytes | None = None) -> None:
    raw = np.ascontiguousarray(tensor.data).view(np.uint8).reshape(-1).tobytes() if data is None else data
    for chunk in P.weight_chunks(epoch, tensor.name, tensor.name, tensor.qtype, tensor.shape, raw, tensor.sha256,
                                 chunk_size=1000):
        await link.send(chunk)


# --- protocol additions (no sockets) ---


def test_session_messages_round_trip():
    s, _ = session_for("w1")
    sha = hashlib.sha256(b"x").hexdigest()
    for msg in (s, P.Need(0, (sha,)), P.Mesh(3), P.MeshHello(3, "w1", 1, 2), P.Ready(3, "w1")):
        [back] = P.FrameDecoder().feed(P.encode(msg))
        assert back == msg


@pytest.mark.parametrize("change, match", [
    ({"ctx": 0}, "ctx 0"),
    ({"slices": []}, "without tensors"),
    ({"config": {"n_heads": 0}}, "size < 1"),
])
def test_invalid_sessions_are_malformed(change, match):
    s, _ = session_for("w1")
    body = msgpack.unpackb(P.encode(s)[P.HEADER_SIZE:], raw=False)
    for k, v in change.items():
        if isinstance(v, dict):
            body[k].update(v)
        else:
            body[k] = v
    with pytest.raises(P.MalformedFrame, match=match):
        P.decode_body(P.MsgType.SESSION, msgpack.packb(body, use_bin_type=True))


def test_error_codes():
    assert P.error_code(P.SliceHashMismatch("x")) == "slice_hash"
    assert P.error_code(P.ProtocolVersionError("x")) == "version"
    assert P.error_code(P.UnknownMessageType("x")) == "unknown_type"
    assert P.error_code(P.UnexpectedMessage("x")) == "unexpected"


# --- state dir ---


def test_node_id_is_stable(tmp_path):
    first = node_id(tmp_path)
    assert node_id(tmp_path) == first
    (tmp_path / "node_id").write_text("not a valid id!\n")
    assert node_id(tmp_path) != first


def test_slice_cache_verifies_what_it_reads(tmp_path):
    cache = SliceCache(tmp_path / "slices")
    data = b"\x01\x02" * 100
    sha = hashlib.sha256(data).hexdigest()
    cache.store(sha, data)
    assert cache.load(sha, len(data)) == data and cache.keys() == [sha]
    assert not [p for p in cache.directory.iterdir() if p.name.endswith(".tmp")]
    cache.path(sha).write_bytes(b"\x00" * len(data))  # damaged on disk: dropped, asked for again
    assert cache.load(sha, len(data)) is None and not cache.path(sha).exists()
    assert cache.load(sha, len(data)) is None


def test_storage_array_forms():
    assert storage_array(QType.Q8_0, (2, 64), bytes(2 * 68)).shape == (2, 68)
    assert storage_array(QType.F32, (5,), bytes(20)).dtype == np.float32
    assert storage_array(QType.BF16, (2, 3), bytes(12)).dtype == np.uint16


# --- handshake and bad input ---


def test_handshake_and_node_id_survives_a_restart(tmp_path):
    ids = []

    async def body(d, address):
        link, hello = await control(address)
        assert (hello.protocol_version, hello.role, hello.threads, hello.node_id) == (
            P.PROTOCOL_VERSION, "worker", 1, d.node_id)
        ids.append(hello.node_id)
        await link.aclose()
        await still_serves(address)

    serve(tmp_path, body)
    serve(tmp_path, body)
    assert ids[0] == ids[1]


def _hello_body(**changes) -> bytes:
    body = msgpack.unpackb(P.encode(ROOT)[P.HEADER_SIZE:], raw=False)
    body.update(changes)
    return msgpack.packb(body, use_bin_type=True)


V = P.PROTOCOL_VERSION


@pytest.mark.parametrize("name, data, code, match", [
    ("other version in the header", P.HEADER.pack(P.MAGIC, V + 1, P.MsgType.HELLO, 50) + _hello_body(protocol_version=V + 1)[:50],
     "version", f"protocol version {V + 1}, this node speaks version {V}"),
    ("other version in the Hello", P.HEADER.pack(P.MAGIC, V, P.MsgType.HELLO, len(_hello_body(protocol_version=7)))
     + _hello_body(protocol_version=7), "version", "version 7"),
    ("malformed body", P.HEADER.pack(P.MAGIC, V, P.MsgType.HELLO, 3) + b"\xc1\xc1\xc1", "malformed_frame", "msgpack"),
    ("oversized frame", P.HEADER.pack(P.MAGIC, V, P.MsgType.HELLO, P.MAX_FRAME + 1), "too_large", "over the"),
    ("not dllp2p", b"GET / HTTP/1.1\r\n\r\n", "bad_magic", "not a dllp2p frame"),
    ("unknown type", P.HEADER.pack(P.MAGIC, V, 99, 1) + b"\x80", "unknown_type", "unknown message type 99"),
    ("wrong first message", P.encode(P.Step(0, 0, (1,), 0)), "unexpected", "must start with Hello"),
])
def test_bad_input_gets_an_error_and_the_daemon_serves_on(tmp_path, name, data, code, match):
    async def body(d, address):
        reply, closed = await raw_exchange(address, data)
        assert isinstance(reply, P.Error) and reply.code == code, reply
        assert match in reply.message and d.node_id in reply.message
        assert closed
        await still_serves(address)

    serve(tmp_path, body)


def test_bad_frame_after_the_handshake_closes_only_that_connection(tmp_path):
    async def body(d, address):
        link, _ = await control(address)
        await link.send(P.Step(0, 0, (1,), 0))  # no session yet
        reply = await link.receive(2)
        assert isinstance(reply, P.Error) and reply.code == "unexpected" and "no session" in reply.message
        with pytest.raises(LinkClosed):
            await link.receive(2)
        await still_serves(address)

    serve(tmp_path, body)


def test_silent_peer_is_dropped_after_the_hello_timeout(tmp_path):
    async def body(d, address):
        link = await open_link(address, 2)
        with pytest.raises(LinkClosed):
            await link.receive(T.hello + 2)
        await still_serves(address)

    serve(tmp_path, body)


# --- sessions: plan, weights, cache ---


def test_plan_without_this_node_is_refused_and_the_worker_stays_ready(tmp_path):
    async def body(d, address):
        link, hello = await control(address)
        await link.send(session_for("someone-else")[0])
        reply = await link.receive(2)
        assert reply.code == "plan" and "someone-else" not in reply.message and "not in the plan" in reply.message
        await link.send(session_for(hello.node_id)[0])  # the same connection goes on
        assert isinstance(await link.receive(2), P.Need)
        await link.aclose()

    serve(tmp_path, body)


def test_wrong_slice_hash_is_refused_then_the_slice_is_taken_and_cached(tmp_path):
    async def body(d, address):
        link, hello = await control(address)
        s, tensors = session_for(hello.node_id)
        await link.send(s)
        need = await link.receive(2)
        assert set(need.sha256s) == {t.sha256 for t in tensors.values()}
        first = tensors["blk.0.ffn_up.weight"]
        await push(link, s.epoch, first, data=bytes(first.data.nbytes))  # zeros, announced with the real hash
        reply = await link.receive(2)
        assert isinstance(reply, P.Error) and reply.code == "slice_hash" and first.name in reply.message
        for t in tensors.values():  # still ready: the right bytes are taken
            await push(link, s.epoch, t)
        ready = await link.receive(2)
        total = sum(t.data.nbytes for t in tensors.values())
        assert ready == P.WeightsReady(0, total + first.data.nbytes, 0)
        assert sorted(d.worker.cache.keys()) == sorted(t.sha256 for t in tensors.values())
        await link.send(P.Stop(0, "test"))
        await link.send(s)  # the same plan again on the same connection: nothing to send
        assert await link.receive(2) == P.Need(0, ())
        assert await link.receive(2) == P.WeightsReady(0, 0, len(tensors))
        await link.send(P.Stop(0, "test"))
        await link.aclose()

    serve(tmp_path, body)


def test_chunk_of_a_slice_nobody_asked_for_is_unexpected(tmp_path):
    async def body(d, address):
        link, hello = await control(address)
        s, tensors = session_for(hello.node_id)
        await link.send(s)
        await link.receive(2)
        other = fake_tp._tensor("x.weight", QType.Q8_0, (1, 32), (9,))
        await push(link, s.epoch, other)
        reply = await link.receive(2)
        assert reply.code == "unexpected"
        await still_serves(address)

    serve(tmp_path, body)


def test_a_second_root_is_told_the_node_is_busy(tmp_path):
    async def body(d, address):
        a, hello = await control(address)
        await a.send(session_for(hello.node_id)[0])
        await a.receive(2)  # Need: the session holds the node
        b, _ = await control(address)
        await b.send(session_for(hello.node_id)[0])
        reply = await b.receive(T.slot + 2)
        assert reply.code == "busy" and hello.node_id in reply.message
        await a.aclose()  # the first root goes away: the node is free again
        await b.send(session_for(hello.node_id)[0])
        assert isinstance(await b.receive(T.slot + 2), P.Need)
        await b.aclose()

    serve(tmp_path, body)


def test_mesh_connections_need_a_matching_session(tmp_path):
    async def body(d, address):
        with pytest.raises(MeshRefused, match="no session"):
            await dial_mesh(address, P.MeshHello(0, "root-test", 0, 1), 2, 2)
        link, hello = await control(address)
        await link.send(session_for(hello.node_id)[0])
        await link.receive(2)
        with pytest.raises(MeshRefused, match="epoch 5"):
            await dial_mesh(address, P.MeshHello(5, "root-test", 0, 1), 2, 2)
        with pytest.raises(MeshRefused, match="not intruder"):
            await dial_mesh(address, P.MeshHello(0, "intruder", 0, 1), 2, 2)
        await link.aclose()
        await still_serves(address)

    serve(tmp_path, body)


def _dead_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("ghost_capacity, problem", [
    (0.5, "cannot connect to"),  # the ghost is node 2: the worker (node 1) must dial it
    (2.0, "mesh not connected within 3 s (missing: ghost)"),  # the ghost is node 1 and never dials node 2
])
def test_mesh_failures_are_reported_and_the_worker_goes_idle(tmp_path, ghost_capacity, problem):
    async def body(d, address):
        link, hello = await control(address)
        peers = [Peer(ROOT.node_id, "", 1, 1.0), Peer(hello.node_id, address, 1, 1.0),
                 Peer("ghost", _dead_address(), 1, ghost_capacity)]
        p = plan(MODEL.config, peers, 0, "weighted")
        index = p.node(hello.node_id).index
        tensors = fake_tp.node_tensors(MODEL, p, index)
        slices = tuple(P.SliceInfo(n, n, int(t.qtype), t.shape, t.sha256) for n, t in tensors.items())
        await link.send(P.Session(p, MODEL.config, 32, slices))
        await link.receive(2)
        for t in tensors.values():
            await push(link, 0, t)
        assert isinstance(await link.receive(2), P.WeightsReady)
        await link.send(P.Mesh(0))
        if index == 2:  # the root's connection is taken; the ghost's never comes
            (await dial_mesh(address, P.MeshHello(0, ROOT.node_id, 0, 2), 2, 2))[0].close()  # (socket, exporter)
        reply = await link.receive(T.mesh + 2)
        assert reply.code == "mesh" and problem in reply.message, reply
        with pytest.raises(LinkClosed):
            await link.receive(2)
        assert d.worker.active is None
        await still_serves(address)

    serve(tmp_path, body)
