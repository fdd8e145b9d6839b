"""Protocol frames over connections: a trio link for set-up, a blocking twin for the per-token path,
and the node-to-node mesh sockets handed to the compute engine.

    TrioLink       one trio SocketStream: send(msg) under one write lock, receive(timeout) -> message
    BlockingLink   the same connection as a blocking-with-timeout socket (a dup of the fd), for code
                   that runs in one thread per session; both share one FrameDecoder, so no byte is
                   lost when a connection moves from trio to a thread and back
    dial_mesh /    a node-to-node connection: MeshHello both ways, read exactly (no byte past the
    mesh_socket    frame), then the fd becomes a plain blocking socket.socket with TCP_NODELAY, 1 MiB
                   buffers and SO_RCVTIMEO / SO_SNDTIMEO, which the JIT engine reads and writes natively

File descriptors: a trio socket's fd is non-blocking; O_NONBLOCK is shared by every dup of it. A
control connection's dup stays non-blocking (Python's own timeouts poll), so trio can take it back. A
mesh socket is switched to blocking, so its trio stream is closed right away and never used again.

With a cluster key every connection starts with wire/secure.py's handshake (secure_dial / secure_accept,
within the hello timeout) and every frame after it travels sealed: the links hold the Channel (shared by
a TrioLink and its blocking twin like the decoder). A mesh socket's set-up (MeshHello both ways) is sealed
too; the activation exchange the JIT engine then runs natively on it is not (see README, Security).

Error handling: a closed or broken connection is LinkClosed (a ConnectionError); a wait past its
timeout is LinkTimeout (a TimeoutError); bad bytes are codec.ProtocolError. Each names the peer.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable

import trio

from ..clusterkey import ClusterKey
from .codec import HEADER, HEADER_SIZE, MAGIC, FrameDecoder, Message, encode
from .limits import OFF_LOOP
from .messages import Error, MeshHello
from .secure import ANSWER_SIZE, FINISH_SIZE, HELLO_SIZE, LENGTH, Channel, Initiator, Responder
from .secure import MAGIC as SECURE_MAGIC

RECV_BYTES = 1 << 16
FIRST_FRAME = 1 << 20  # body bytes of a connection's first frame (Hello, MeshHello, Status, Generate)
SEND_TIMEOUT = 30.0  # seconds a send may wait for a peer to read: one that stops reading is dropped
MESH_BUFFER = 1 << 20  # SO_SNDBUF / SO_RCVBUF of mesh sockets


class LinkClosed(ConnectionError):
    """The peer closed the connection, or it broke."""


class LinkTimeout(TimeoutError):
    """Nothing (or not enough) arrived in time."""


def parse_address(address: str, *, listen: bool = False) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); port 0 (any free one) only to `listen` on. Raises ValueError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not (0 if listen else 1) <= int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _why(e: OSError) -> str:
    """An OSError's reason for a person: trio's "all attempts to connect ... failed" names the last
    attempt's (e.g. "Connection refused")."""
    attempts = getattr(e.__cause__, "exceptions", ())
    last = attempts[-1] if attempts else e
    errno = getattr(last, "errno", None)
    return os.strerror(errno) if errno else str(last)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- trio side ------------------------------------------------------------------------------------


class TrioLink:
    """Messages over one trio stream. Sends are serialized by one lock; one task receives at a time."""

    def __init__(self, stream: trio.SocketStream, peer: str, decoder: FrameDecoder | None = None,
                 channel: Channel | None = None):
        self.stream = stream
        self.peer = peer  # "host:port", for messages
        self.decoder = decoder or FrameDecoder()
        self.channel = channel  # None: plain frames (no cluster key: loopback only)
        self._write_lock = trio.StrictFIFOLock()
        self.send_timeout = SEND_TIMEOUT

    async def send(self, msg: Message) -> None:
        await self.send_frame(encode(msg))

    async def send_frame(self, frame: bytes | bytearray | memoryview) -> None:
        async with self._write_lock:
            if self.channel is not None:
                frame = self.channel.seal(frame)
            with trio.move_on_after(self.send_timeout) as scope:
                try:
                    await self.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise LinkClosed(f"{self.peer}: connection lost while sending ({e})") from None
            if scope.cancelled_caught:  # a peer that stops reading is dropped: the stream is unusable now
                await trio.aclose_forcefully(self.stream)
                raise LinkTimeout(f"{self.peer}: did not read for {self.send_timeout:g} s; dropped")

    async def receive(self, timeout: float) -> Message:
        """The next message. Raises LinkClosed (EOF included), LinkTimeout, ProtocolError."""
        with trio.move_on_after(timeout) as scope:
            while (frame := self.decoder.next_frame()) is None:
                data = await self._receive_some()
                if not data:
                    self.decoder.eof()
                    raise LinkClosed(f"{self.peer} closed the connection")
                self.decoder.receive(data if self.channel is None else self.channel.receive(data))
        if not scope.cancelled_caught:
            return await _decode(self.decoder, frame)  # a weight chunk, a Session: in a thread
        raise LinkTimeout(f"{self.peer}: nothing received for {timeout:g} s")

    async def _receive_some(self) -> bytes:
        try:
            return await self.stream.receive_some(RECV_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkClosed(f"{self.peer}: connection lost ({e})") from None

    def blocking(self, timeout: float) -> BlockingLink:
        """A blocking twin on a dup of the fd, sharing the decoder; close it before using this link again."""
        sock = _dup(self.stream)
        sock.settimeout(timeout)  # Python's timeouts keep the fd non-blocking: trio can take it back
        return BlockingLink(sock, self.peer, self.decoder, self.channel)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def receive_one_frame(stream: trio.SocketStream, peer: str, timeout: float,
                            channel: Channel | None = None) -> Message:
    """Exactly one frame off the stream, not a byte more (with a channel: the records that hold it). A bad
    header byte raises as soon as it arrives.

    Raises LinkClosed, LinkTimeout, ProtocolError (SecureError: a record that does not open)."""
    if channel is not None:
        return await _receive_one_sealed_frame(stream, peer, timeout, channel)
    decoder = FrameDecoder(FIRST_FRAME)
    header = bytearray()
    read = 0
    with trio.move_on_after(timeout):
        while (frame := decoder.next_frame()) is None:
            end = HEADER_SIZE if read < HEADER_SIZE else HEADER_SIZE + HEADER.unpack(header)[3]
            try:
                data = await stream.receive_some(end - read)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise LinkClosed(f"{peer}: connection lost ({e})") from None
            if not data:
                raise LinkClosed(f"{peer} closed the connection" + (" inside a frame" if read else ""))
            if read < HEADER_SIZE:
                header += data
            read += len(data)
            decoder.receive(data)
        return await _decode(decoder, frame)
    raise LinkTimeout(f"{peer}: no whole frame within {timeout:g} s")


async def _decode(decoder: FrameDecoder, frame: tuple[int, bytes]) -> Message:
    """A frame's message; a body over OFF_LOOP is decoded in a thread (trio's loop serves on meanwhile)."""
    if len(frame[1]) > OFF_LOOP:
        return await trio.to_thread.run_sync(decoder.decode, *frame)
    return decoder.decode(*frame)


async def _receive_one_sealed_frame(stream: trio.SocketStream, peer: str, timeout: float,
                                    channel: Channel) -> Message:
    decoder = FrameDecoder(FIRST_FRAME)
    with trio.move_on_after(timeout):
        while (frame := decoder.next_frame()) is None:
            length = await _receive_exactly(stream, LENGTH.size, peer)
            channel.receive(length)
            size = channel.next_record_size()
            assert size is not None
            decoder.receive(channel.receive(await _receive_exactly(stream, size, peer)))
        return await _decode(decoder, frame)
    raise LinkTimeout(f"{peer}: no whole frame within {timeout:g} s")


async def _receive_exactly(stream: trio.SocketStream, n: int, peer: str) -> bytes:
    """n bytes, not one more. Raises LinkClosed (EOF before n)."""
    buf = bytearray()
    while len(buf) < n:
        try:
            data = await stream.receive_some(n - len(buf))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkClosed(f"{peer}: connection lost ({e})") from None
        if not data:
            raise LinkClosed(f"{peer} closed the connection" + (f" after {len(buf)} of {n} bytes" if buf else ""))
        buf += data
    return bytes(buf)


async def _send_all(stream: trio.SocketStream, data: bytes, peer: str) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        raise LinkClosed(f"{peer}: connection lost while sending ({e})") from None


async def secure_dial(stream: trio.SocketStream, key: ClusterKey, peer: str, timeout: float) -> Channel:
    """The initiator's side of the handshake (secure.py), all of it within timeout seconds.

    Raises HandshakeFailed (the peer lacks the key), LinkClosed, LinkTimeout."""
    with trio.move_on_after(timeout):
        hs = Initiator(key.psk)
        await _send_all(stream, hs.hello(), peer)
        head = await _receive_exactly(stream, 4, peer)  # a daemon without a key answers a plain frame: said at once
        if head == MAGIC:
            hs.answer(head + bytes(ANSWER_SIZE - 4))  # raises HandshakeFailed, naming it
        finish, channel = hs.answer(head + await _receive_exactly(stream, ANSWER_SIZE - 4, peer))
        await _send_all(stream, finish, peer)
        return channel
    raise LinkTimeout(f"{peer}: no secure handshake within {timeout:g} s")


async def secure_accept(stream: trio.SocketStream, key: ClusterKey, peer: str, timeout: float) -> Channel:
    """The responder's side of the handshake, all of it within timeout seconds: a peer that sends garbage
    fails at once, one that stops or drips bytes fails at the timeout.

    Raises HandshakeFailed, LinkClosed, LinkTimeout."""
    with trio.move_on_after(timeout):
        hs = Responder(key.psk)
        head = await _receive_exactly(stream, 4, peer)  # a client without a key: refused at its first bytes
        if head != SECURE_MAGIC:
            hs.hello(head)  # raises HandshakeFailed
        await _send_all(stream, hs.hello(head + await _receive_exactly(stream, HELLO_SIZE - 4, peer)), peer)
        return hs.finish(await _receive_exactly(stream, FINISH_SIZE, peer))
    raise LinkTimeout(f"{peer}: no secure handshake within {timeout:g} s")


async def open_link(address: str, timeout: float, key: ClusterKey | None = None) -> TrioLink:
    """Connect to 'host:port' (and with a key, run the handshake), all within timeout seconds.

    Raises LinkClosed (refused, unreachable), LinkTimeout, HandshakeFailed (the peer lacks the key)."""
    host, port = parse_address(address)
    with trio.move_on_after(timeout) as scope:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise LinkClosed(f"cannot connect to {address}: {_why(e)}") from None
    if scope.cancelled_caught:
        raise LinkTimeout(f"cannot connect to {address}: no answer within {timeout:g} s")
    stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if key is None:
        return TrioLink(stream, address)
    try:
        channel = await secure_dial(stream, key, address, timeout)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return TrioLink(stream, address, channel=channel)


# --- blocking side --------------------------------------------------------------------------------


class BlockingLink:
    """Messages over a socket with a timeout, for one thread. The twin of TrioLink."""

    def __init__(self, sock: socket.socket, peer: str, decoder: FrameDecoder | None = None,
                 channel: Channel | None = None):
        self.sock = sock
        self.peer = peer
        self.decoder = decoder or FrameDecoder()
        self.channel = channel

    def send(self, msg: Message) -> None:
        self.send_frame(encode(msg))

    def send_frame(self, frame: bytes | bytearray | memoryview) -> None:
        if self.channel is not None:
            frame = self.channel.seal(frame)
        try:
            self.sock.sendall(frame)
        except TimeoutError:
            raise LinkTimeout(f"{self.peer}: could not send for {self.sock.gettimeout():g} s") from None
        except OSError as e:
            raise LinkClosed(f"{self.peer}: connection lost while sending ({e.strerror or e})") from None

    def receive(self, timeout: float) -> Message:
        """The next message. Raises LinkClosed (EOF included), LinkTimeout, ProtocolError."""
        msg = self.poll(timeout)
        if msg is None:
            raise LinkTimeout(f"{self.peer}: nothing received for {timeout:g} s")
        return msg

    def poll(self, timeout: float) -> Message | None:
        """The next message, or None if none is whole within `timeout` seconds of silence."""
        before = self.sock.gettimeout()  # the one sends use
        self.sock.settimeout(timeout)
        try:
            while (msg := self.decoder.next_message()) is None:
                try:
                    data = self.sock.recv(RECV_BYTES)
                except TimeoutError:
                    return None
                except OSError as e:
                    raise LinkClosed(f"{self.peer}: connection lost ({e.strerror or e})") from None
                if not data:
                    self.decoder.eof()
                    raise LinkClosed(f"{self.peer} closed the connection")
                self.decoder.receive(data if self.channel is None else self.channel.receive(data))
            return msg
        finally:
            self.sock.settimeout(before)

    def shutdown(self) -> None:
        """Wake a thread blocked on this socket (it sees the connection closed). Safe from any thread."""
        shutdown(self.sock)

    def close(self) -> None:
        self.sock.close()


def shutdown(sock: socket.socket | None) -> None:
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _dup(stream: trio.SocketStream) -> socket.socket:
    return socket.socket(fileno=os.dup(stream.socket.fileno()))


# --- mesh sockets ---------------------------------------------------------------------------------


def mesh_socket(stream: trio.SocketStream, timeout: float) -> socket.socket:
    """The stream's connection as a blocking socket for native I/O. The stream must not be used after."""
    sock = _dup(stream)
    try:
        sock.setblocking(True)  # clears O_NONBLOCK for the stream's fd too
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, MESH_BUFFER)
        tv = struct.pack("@ll", int(timeout), int((timeout % 1) * 1e6))
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            sock.setsockopt(socket.SOL_SOCKET, opt, tv)
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_mesh(address: str, hello: MeshHello, timeout: float, socket_timeout: float,
                    key: ClusterKey | None = None) -> tuple[socket.socket, bytes | None]:
    """Connect to node hello.dst at address for the mesh: (the handshake,) MeshHello both ways -> a
    blocking socket, and the secure channel's exporter secret (None without a key) from which both ends
    derive the sealed activation exchange's keys (secure.mesh_keys).

    Raises LinkClosed, LinkTimeout, ProtocolError, MeshRefused (the other side answered an Error)."""
    link = await open_link(address, timeout, key)
    try:
        await link.send(hello)
        reply = await receive_one_frame(link.stream, address, timeout, link.channel)
        if isinstance(reply, Error):
            raise MeshRefused(f"{address} refused the mesh connection: {reply.message}")
        want = (hello.epoch, hello.dst, hello.src)
        if not isinstance(reply, MeshHello) or (reply.epoch, reply.src, reply.dst) != want:
            raise MeshRefused(f"{address} answered {type(reply).__name__} {reply}, not the MeshHello {want}")
        return mesh_socket(link.stream, socket_timeout), None if link.channel is None else link.channel.exporter
    finally:
        await link.aclose()


class MeshRefused(ConnectionError):
    """A node would not take a mesh connection (wrong epoch or index, or no session)."""


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The error to report from a nursery's group: a KeyboardInterrupt, else the first that is not a
    cancellation; a group of cancellations only is returned as it is (its cancel scope catches it)."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    for kind in (KeyboardInterrupt, Exception):
        for e in leaves:
            if isinstance(e, kind):
                return e
    return group


async def run_in_thread(fn: Callable[[], object], interrupt: Callable[[], None]) -> object:
    """fn() in one worker thread. If this task is cancelled meanwhile, interrupt() (from the trio thread:
    shut down the sockets fn blocks on) makes fn return early; the cancellation goes on after it has."""
    done = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            try:
                await trio.sleep_forever()
            finally:
                if not done:
                    interrupt()

        nursery.start_soon(watch)
        try:
            return await trio.to_thread.run_sync(fn)
        finally:
            done = True
            nursery.cancel_scope.cancel()
