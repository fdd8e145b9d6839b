"""The cluster key end to end on loopback: daemons of another key (or none) never join, never get a session,
cannot become root by an earlier start time; a client without the key learns nothing and is dropped; a
replayed handshake is refused; a bit flipped in flight drops the link with a logged error; mDNS records
need their MAC; the HTTP API beyond loopback needs its bearer key; without a key a daemon keeps to its
own machine."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from pathlib import Path

import pytest
import trio

import fake_tp
from dllp2p import api, discovery
from dllp2p.clusterkey import ClusterKey
from dllp2p.config import Timeouts
from dllp2p.daemon import Daemon, DaemonConfig
from dllp2p.discovery import StaticOptions
from dllp2p.election import Member
from dllp2p.wire import PROTOCOL_VERSION, Status, StatusReply, TokenChunk, encode
from dllp2p.wire.client import ask_status
from dllp2p.wire.link import LinkClosed, LinkTimeout
from dllp2p.wire.secure import HandshakeFailed

T = Timeouts(hello=3, idle=5, transfer=5, mesh=3, build=5, socket=3, slot=1)
# polls often, but a member of the cluster is dropped only after many misses: a poll (handshake included)
# slower than its timeout on a loaded machine must not make the test flaky
FAST = StaticOptions(interval=0.05, timeout=3, misses=10)
K1 = fake_tp.TEST_KEY
K2 = ClusterKey(hashlib.sha256(b"the neighbours' key").digest())


def _daemon(tmp_path: Path, name: str, key: ClusterKey | None, peers: tuple[str, ...] = (),
            started_at: float | None = None) -> Daemon:
    d = Daemon(DaemonConfig("127.0.0.1", 0, 1, tmp_path / name, timeouts=T, static=FAST, cluster=fake_tp.TEST_CLUSTER,
                            peers=peers, key=key), tp=fake_tp)
    if started_at is not None:  # claims to be the oldest: the election's first criterion
        d.started_at = d.membership.started_at = started_at
    return d


def test_foreign_and_keyless_daemons_never_join_get_a_session_or_become_root(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main() -> None:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                a = _daemon(tmp_path, "a", K1)
                x = _daemon(tmp_path, "x", K2, started_at=0.0)  # another household's, "oldest"
                y = _daemon(tmp_path, "y", None, started_at=0.0)  # no key at all, "oldest"
                addr = {n: await nursery.start(d.serve) for n, d in (("a", a), ("x", x), ("y", y))}
                # x and y poll a too: their own view is theirs, but a never hears of them
                b = _daemon(tmp_path, "b", K1, peers=(addr["a"], addr["x"], addr["y"]))
                addr["b"] = await nursery.start(b.serve)
                for d, others in ((x, (addr["a"],)), (y, (addr["a"],))):
                    nursery.start_soon(discovery.poll_static, others[0], d.membership._fetch_member,
                                       trio.open_memory_channel(0)[0], FAST)
                with trio.fail_after(10):
                    while len(b.election().succession) < 2:
                        await trio.sleep(0.05)
                await trio.sleep(0.5)  # many poll rounds
                reply = await ask_status(addr["b"], 2, key=K1)
                ids = {n.member.node_id for n in reply.nodes}
                assert ids == {a.node_id, b.node_id}, ids
                assert b.election().root.node_id in (a.node_id, b.node_id)
                assert not b.election().excluded  # never even seen: they failed the handshake before any Status

                # a root of the cluster offered x and y as workers (as `run --workers` would) plans without them
                def run_root() -> list[str]:
                    from dllp2p.session.root import ClusterEngine, ClusterOptions

                    options = ClusterOptions((addr["a"], addr["x"], addr["y"]), "weighted", T,
                                             skip_unreachable=True, key=K1)
                    e = ClusterEngine.connect(fake_tp.model(), options, 32, 1, tp=fake_tp)
                    try:
                        e.forward([5, 7], 0)
                        return [n.address for n in e.plan.nodes]
                    finally:
                        e.close()

                planned = await trio.to_thread.run_sync(run_root)
                assert addr["a"] in planned and addr["x"] not in planned and addr["y"] not in planned
                for d in (x, y):
                    assert d.worker.sessions == 0 and d.worker.push is None and d.worker.last_step is None
                # the member of the cluster did compute: it notes its step after sending its part, so the
                # root's forward may return first (bounded wait)
                with trio.fail_after(10):
                    while a.worker.last_step is None:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert "does not hold this cluster's key" in caplog.text or "has no cluster key" in caplog.text


def test_client_without_the_key_learns_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = _daemon(tmp_path, "a", K1)
            address = await nursery.start(a.serve)
            host, port = address.rsplit(":", 1)
            for first in (encode(Status(0)), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(100), b""):
                t0 = trio.current_time()
                stream = await trio.open_tcp_stream(host, int(port))
                await stream.send_all(first)
                got = b""
                with trio.fail_after(T.hello + 2):
                    try:
                        while chunk := await stream.receive_some(4096):
                            got += chunk
                    except trio.BrokenResourceError:
                        pass
                assert got == b"", f"the daemon told a stranger {got!r}"
                assert trio.current_time() - t0 <= T.hello + 1.5  # slack for a loaded machine
                await stream.aclose()
            # a dllp2p client with another key: refused in the handshake, no Status
            with pytest.raises(HandshakeFailed):
                await ask_status(address, 2, key=K2)
            # and the right key works on the same daemon, which served on
            assert isinstance(await ask_status(address, 2, key=K1), StatusReply)
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _proxy(upstream: str, record: list[bytearray], flip_at: int | None,
                 task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
    """A TCP proxy to upstream that records what each client sends; flip_at: flip one bit of the byte at
    that offset of the client's stream."""
    host, port = upstream.rsplit(":", 1)

    async def handler(client: trio.SocketStream) -> None:
        sent = bytearray()
        record.append(sent)
        server = await trio.open_tcp_stream(host, int(port))

        async def up() -> None:
            try:
                while data := await client.receive_some(4096):
                    data = bytearray(data)
                    if flip_at is not None and len(sent) <= flip_at < len(sent) + len(data):
                        data[flip_at - len(sent)] ^= 0x04
                    sent.extend(data)
                    await server.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(server)

        async def down() -> None:
            try:
                while data := await server.receive_some(4096):
                    await client.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                await trio.aclose_forcefully(client)

        async with trio.open_nursery() as n:
            n.start_soon(up)
            n.start_soon(down)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(f"127.0.0.1:{listeners[0].socket.getsockname()[1]}")
    await trio.serve_listeners(handler, listeners)


def test_replayed_handshake_is_refused(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = _daemon(tmp_path, "a", K1)
            address = await nursery.start(a.serve)
            record: list[bytearray] = []
            via = await nursery.start(_proxy, address, record, None)
            assert isinstance(await ask_status(via, 2, key=K1), StatusReply)  # the real exchange, recorded
            await trio.sleep(0.1)
            host, port = address.rsplit(":", 1)
            stream = await trio.open_tcp_stream(host, int(port))
            await stream.send_all(bytes(record[0]))  # hello, finish, the sealed Status: all of it again
            got = b""
            with trio.fail_after(T.hello + 2):
                try:
                    while chunk := await stream.receive_some(4096):
                        got += chunk
                except trio.BrokenResourceError:
                    pass
            # the daemon answered the replayed hello with a fresh ANSWER (80 bytes), then dropped it
            assert len(got) <= 80, "the replay got more than a handshake answer"
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "handshake proof is wrong" in caplog.text


def test_bit_flipped_in_flight_drops_the_link_with_a_logged_error(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            a = _daemon(tmp_path, "a", K1)
            address = await nursery.start(a.serve)
            # the client's bytes: hello 52, finish 32, then its first record: flip a bit inside it
            via = await nursery.start(_proxy, address, [], 52 + 32 + 10)
            with pytest.raises((LinkClosed, LinkTimeout)):
                await ask_status(via, 2, key=K1)
            assert isinstance(await ask_status(address, 2, key=K1), StatusReply)  # serving on
            nursery.cancel_scope.cancel()

    trio.run(main)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "failed authentication" in r.getMessage()]
    assert errors, caplog.text


def test_without_a_key_a_daemon_keeps_to_this_machine(tmp_path, caplog):
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            d = Daemon(DaemonConfig("0.0.0.0", 0, 1, tmp_path / "d", timeouts=T, cluster=fake_tp.TEST_CLUSTER,
                                    discovery=True, peers=("10.9.9.9:7340", "127.0.0.1:9")), tp=fake_tp)
            address = await nursery.start(d.serve)
            assert address.startswith("127.0.0.1:")
            assert isinstance(await ask_status(address, 2), StatusReply)  # plain, on this machine
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "no cluster key: serving this machine only" in caplog.text and "dllp2p key new" in caplog.text
    assert "ignored 10.9.9.9:7340" in caplog.text and "advertising" not in caplog.text


# --- mDNS ---------------------------------------------------------------------------------------------


M = Member("pi-1", "10.0.0.1:7340", 100.0, PROTOCOL_VERSION, "home.abcd0123", 4, 8 << 30, ("asimd",))


def test_mdns_records_need_their_mac():
    key = K1.mdns_key
    txt = discovery.encode_txt(M, 7340, key)
    assert discovery.parse_txt(txt, "10.0.0.1:7340", version=PROTOCOL_VERSION, cluster=M.cluster, mac_key=key) == M
    cases = {
        "no mac": discovery.encode_txt(M),
        "another key": discovery.encode_txt(M, 7340, K2.mdns_key),
        "earlier start claimed": {**txt, "t": "0.000"},
        "another node id": {**txt, "id": "rogue"},
    }
    for why, record in cases.items():
        with pytest.raises(discovery.Rejected, match="no valid MAC"):
            discovery.parse_txt(record, "10.0.0.1:7340", version=PROTOCOL_VERSION, cluster=M.cluster, mac_key=key)
    with pytest.raises(discovery.Rejected, match="no valid MAC"):  # moved to another port
        discovery.parse_txt(txt, "10.0.0.1:7341", version=PROTOCOL_VERSION, cluster=M.cluster, mac_key=key)


def test_mdns_rejections_logged_once_per_address(caplog):
    class Info:
        name = "rogue._dllp2p._tcp.local."
        port = 7340
        properties = {k.encode(): v.encode() for k, v in discovery.encode_txt(M).items()}

        def parsed_addresses(self) -> list[str]:
            return ["10.0.0.66"]

    caplog.set_level(logging.WARNING, logger="dllp2p.discovery")
    warned: set[str] = set()
    me = Member("me", "10.0.0.2:7340", 50.0, PROTOCOL_VERSION, M.cluster)
    for _ in range(5):
        assert discovery._member_of(Info(), me, K1.mdns_key, warned) is None
    assert caplog.text.count("no valid MAC") == 1


# --- HTTP API -----------------------------------------------------------------------------------------


def test_api_bearer_key(tmp_path):
    token = K1.api_token

    async def submit(sink, g) -> None:  # noqa: ANN001
        await sink.send(TokenChunk("hi"))
        from dllp2p.wire import Done
        await sink.send(Done(1, 1, 1.0, 1.0, 1, "n", ()))

    def request(port: int, auth: str | None) -> tuple[int, dict]:
        head = f"Authorization: {auth}\r\n" if auth else ""
        body = json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode()
        raw = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{head}"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head_bytes, _, payload = data.partition(b"\r\n\r\n")
        return int(head_bytes.split()[1]), json.loads(payload)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, api.Api(submit, "m", api.Limits(), token).connection, listeners)
            for auth in (None, "Bearer wrong", f"Basic {token}", f"Bearer {K2.api_token}"):
                status, body = await trio.to_thread.run_sync(request, port, auth)
                assert status == 401 and body["error"]["code"] == "invalid_api_key", (auth, body)
                assert body["error"]["type"] == "invalid_request_error" and "message" in body["error"]
            status, body = await trio.to_thread.run_sync(request, port, f"Bearer {token}")
            assert status == 200 and body["choices"][0]["message"]["content"] == "hi"
            # beyond loopback without a key: not served at all
            assert await api.start(nursery, "0.0.0.0:0", submit, "m") is None
            nursery.cancel_scope.cancel()

    trio.run(main)
