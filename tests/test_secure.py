"""The secure channel (wire/secure.py) sans I/O, then over trio streams (link.py's secure_dial/secure_accept):
a handshake succeeds only when both ends hold the key, a replayed handshake is refused, a flipped bit in a
record fails it, garbage / truncated / slow handshakes end within the timeout."""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from dllp2p.clusterkey import ClusterKey
from dllp2p.wire import secure
from dllp2p.wire.link import LinkClosed, LinkTimeout, TrioLink, open_link, receive_one_frame, secure_accept
from dllp2p.wire.reports import Status
from dllp2p.wire.secure import Channel, HandshakeFailed, Initiator, RecordError, Responder

K1 = ClusterKey(bytes(range(32)))
K2 = ClusterKey(bytes(range(1, 33)))


def handshake(ki: ClusterKey, kr: ClusterKey) -> tuple[Channel, Channel]:
    i, r = Initiator(ki.psk), Responder(kr.psk)
    answer = r.hello(i.hello())
    finish, ci = i.answer(answer)
    return ci, r.finish(finish)


def test_handshake_and_records_both_ways():
    ci, cr = handshake(K1, K1)
    assert cr.receive(ci.seal(b"hello")) == b"hello"
    assert ci.receive(cr.seal(b"world")) == b"world"
    big = bytes(range(256)) * 1000  # 256000 bytes: several records
    sealed = ci.seal(big)
    assert len(sealed) == len(big) + secure.RECORD_OVERHEAD * -(-len(big) // secure.MAX_RECORD)
    # fed in odd pieces
    out = b"".join(cr.receive(sealed[k:k + 777]) for k in range(0, len(sealed), 777))
    assert out == big and cr.pending == 0


def test_ciphertext_hides_plaintext():
    ci, _ = handshake(K1, K1)
    assert b"secret prompt" not in ci.seal(b"secret prompt" * 10)


def test_wrong_key_either_side():
    i, r = Initiator(K1.psk), Responder(K2.psk)
    with pytest.raises(HandshakeFailed):
        i.answer(r.hello(i.hello()))  # the initiator catches a responder without its key
    # an initiator with the wrong key that ignores the responder's proof is caught by the responder
    i, r = Initiator(K2.psk), Responder(K1.psk)
    answer = r.hello(i.hello())
    with pytest.raises(HandshakeFailed):
        i.answer(answer)
    forged_finish = bytes(32)
    with pytest.raises(HandshakeFailed):
        r.finish(forged_finish)


def test_replayed_handshake_refused():
    """An eavesdropper records a whole real handshake and replays the initiator's half to the responder."""
    i, r = Initiator(K1.psk), Responder(K1.psk)
    hello = i.hello()
    answer = r.hello(hello)
    finish, _ = i.answer(answer)
    r.finish(finish)  # the real one succeeds
    r2 = Responder(K1.psk)  # the replay: a new connection, same hello and finish
    r2.hello(hello)
    with pytest.raises(HandshakeFailed):
        r2.finish(finish)
    # and the responder's recorded answer replayed to a new initiator
    with pytest.raises(HandshakeFailed):
        Initiator(K1.psk).answer(answer)


def test_flipped_bit_replay_reorder_fail():
    ci, cr = handshake(K1, K1)
    rec = bytearray(ci.seal(b"step 1"))
    rec[10] ^= 1
    with pytest.raises(RecordError):
        cr.receive(rec)
    ci, cr = handshake(K1, K1)
    a, b = ci.seal(b"a"), ci.seal(b"b")
    with pytest.raises(RecordError):  # reordered
        cr.receive(b)
    ci, cr = handshake(K1, K1)
    a = ci.seal(b"a")
    cr.receive(a)
    with pytest.raises(RecordError):  # replayed
        cr.receive(a)
    ci, cr = handshake(K1, K1)
    with pytest.raises(RecordError):  # reflected back to its sender
        ci.receive(ci.seal(b"x"))
    _, cr = handshake(K1, K1)
    with pytest.raises(RecordError):  # absurd length
        cr.receive(b"\xff\xff\xff\xff")


def test_garbage_hello_and_bad_point():
    with pytest.raises(HandshakeFailed):
        Responder(K1.psk).hello(b"GET / HTTP/1.1\r\n" + bytes(36))
    with pytest.raises(HandshakeFailed):  # the all-zero point gives an all-zero secret: refused
        Responder(K1.psk).hello(secure.MAGIC + bytes(48))


def test_handshake_time():
    n = 50
    t0 = time.perf_counter()
    for _ in range(n):
        handshake(K1, K1)
    per = (time.perf_counter() - t0) / n
    print(f"handshake (both sides, in memory): {per * 1e3:.2f} ms")
    assert per < 0.5  # loose: only catches something absurd on a loaded machine


# --- over trio streams ------------------------------------------------------------------------------


async def _serve(key: ClusterKey, timeout: float, results: list, task_status=trio.TASK_STATUS_IGNORED):  # noqa: ANN001
    async def handler(stream: trio.SocketStream) -> None:
        t0 = trio.current_time()
        try:
            channel = await secure_accept(stream, key, "client", timeout)
            msg = await receive_one_frame(stream, "client", timeout, channel)
            await TrioLink(stream, "client", channel=channel).send(Status(msg.seq + 1))
            results.append(("ok", trio.current_time() - t0))
        except (HandshakeFailed, RecordError, LinkClosed, LinkTimeout) as e:
            results.append((type(e).__name__, trio.current_time() - t0))
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(handler, listeners, handler_nursery=nursery)


async def _with_server(key: ClusterKey, timeout: float, client) -> list:  # noqa: ANN001
    results: list = []
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve, key, timeout, results)
        await client(f"127.0.0.1:{port}")
        with trio.fail_after(timeout + 3):
            while not results:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    return results


def test_over_tcp_success_and_wrong_key():
    async def good(address: str) -> None:
        link = await open_link(address, 5.0, K1)
        await link.send(Status(41))
        reply = await link.receive(5.0)
        assert isinstance(reply, Status) and reply.seq == 42
        await link.aclose()

    assert trio.run(_with_server, K1, 5.0, good)[0][0] == "ok"

    async def wrong(address: str) -> None:
        with pytest.raises(HandshakeFailed):
            await open_link(address, 5.0, K2)

    assert trio.run(_with_server, K1, 5.0, wrong)[0][0] in ("LinkClosed", "HandshakeFailed")


@pytest.mark.parametrize("attack", ["plain", "garbage", "truncated", "slow_drip", "silent"])
def test_bad_handshakes_dropped_within_timeout(attack: str):
    timeout = 1.0

    async def client(address: str) -> None:
        host, port = address.split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        try:
            if attack == "plain":  # a dllp2p client without a key: its first frame is not a hello
                from dllp2p.wire.codec import encode
                await stream.send_all(encode(Status(0)) + bytes(64))
            elif attack == "garbage":
                await stream.send_all(b"\x00" * secure.HELLO_SIZE)
            elif attack == "truncated":
                await stream.send_all(Initiator(K1.psk).hello()[:20])
                await stream.send_eof()
            elif attack == "slow_drip":
                for b in Initiator(K1.psk).hello():
                    await stream.send_all(bytes([b]))
                    await trio.sleep(0.1)  # 52 bytes take 5 s: far past the 1 s timeout
            # silent: sends nothing
            with trio.move_on_after(timeout + 2):
                got = await stream.receive_some(1000)
                assert got == b"", f"the server told an unauthenticated client {got!r}"
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    [(outcome, took)] = trio.run(_with_server, K1, timeout, client)
    assert outcome != "ok"
    assert took <= timeout + 1.5  # the timeout, and slack for a loaded machine


def test_bit_flip_in_flight_over_tcp():
    """A proxy flips one bit of the first record after the handshake: the receiver drops the link."""

    async def client(address: str) -> None:
        host, port = address.split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        hs = Initiator(K1.psk)
        await stream.send_all(hs.hello())
        answer = b""
        while len(answer) < secure.ANSWER_SIZE:
            answer += await stream.receive_some(secure.ANSWER_SIZE - len(answer))
        finish, channel = hs.answer(answer)
        await stream.send_all(finish)
        from dllp2p.wire.codec import encode
        record = bytearray(channel.seal(encode(Status(1))))
        record[-3] ^= 0x10
        await stream.send_all(record)
        with trio.move_on_after(3):
            assert await stream.receive_some(100) == b""
        await trio.aclose_forcefully(stream)

    [(outcome, _)] = trio.run(_with_server, K1, 5.0, client)
    assert outcome == "RecordError"
