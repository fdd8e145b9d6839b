"""The root's side of the set-up's conversations with each worker (session/root.py's `start` drives them):
the Hello both ways, one expected answer, the mesh dial; the error every failure becomes (ClusterError,
naming the worker), and the record of a worker (Worker).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..error_codes import ErrorCode
from ..pipeline import AnyPlan
from ..wire.codec import ProtocolError
from ..wire.link import LinkClosed, LinkTimeout, MeshRefused, dial_mesh, first_error, open_link
from ..wire.messages import Error, Hello, MeshHello
from ..wire.secure import HandshakeFailed
from .progress import Note, Sink


class ClusterError(ConnectionError):
    """A worker refused, failed or was lost; the message names it. `code`: the ErrorCode the worker
    answered with, if any (DISK_FULL: service.py plans without it); `address`, `node_id`: which worker."""

    def __init__(self, message: str, code: ErrorCode | None = None, address: str = "", node_id: str = "",
                 lost: bool = False, recoverable: bool = True):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.address, self.node_id = address, node_id
        self.lost, self.recoverable = lost, recoverable  # lost mid-generation; worth a re-plan without it


@dataclass
class Worker:
    address: str
    hello: Hello
    link: Any  # TrioLink during set-up, BlockingLink after
    index: int = -1  # in the plan; -1: left out
    received_bytes: int = 0  # weight bytes pushed to it
    cached: int = 0  # slices it had already
    rtt_ms: float = 0.0  # Hello sent -> its Hello received
    push_s: float = 0.0  # Need received -> WeightsReady received, when it received bytes

    @property
    def name(self) -> str:
        return f"worker {self.address} (node {self.hello.node_id})"


async def gather(fns: Sequence[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run fns concurrently; -> their results in order. The first failure cancels the rest and is raised."""
    results: list[Any] = [None] * len(fns)

    async def one(i: int) -> None:
        results[i] = await fns[i]()

    try:
        async with trio.open_nursery() as nursery:
            for i in range(len(fns)):
                nursery.start_soon(one, i)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    return results


async def say_hello_or_skip(address: str, root: Hello, t: Timeouts, key: ClusterKey | None, *,
                            events: Sink) -> Worker | None:
    try:
        return await say_hello(address, root, t, key)
    except ClusterError as e:
        events(Note(f"{e}; planning without it"))
        return None


async def say_hello(address: str, root: Hello, t: Timeouts, key: ClusterKey | None = None) -> Worker:
    try:
        link = await open_link(address, t.hello, key)
    except (LinkClosed, LinkTimeout, HandshakeFailed) as e:
        raise ClusterError(f"worker {address}: {said(address, e)}") from None
    try:
        t0 = time.perf_counter()
        await link.send(root)
        reply = await link.receive(t.hello)
        rtt_ms = (time.perf_counter() - t0) * 1e3
        if isinstance(reply, Error):
            raise ClusterError(f"worker {address} refused: {reply.message}")
        if not isinstance(reply, Hello) or reply.role != "worker":
            raise ClusterError(f"worker {address} answered {type(reply).__name__} {getattr(reply, 'role', '')}, "
                               f"not a worker's Hello")
    except (LinkClosed, LinkTimeout, ProtocolError) as e:
        await link.aclose()
        hint = " (it may hold a cluster key: give this side one, --key-file)" if key is None and isinstance(
            e, LinkClosed) else ""
        raise ClusterError(f"worker {address}: {said(address, e)}{hint}") from None
    except BaseException:
        await link.aclose()
        raise
    return Worker(address, reply, link, rtt_ms=rtt_ms)


def dropped(w: Worker, e: BaseException, what: str = "") -> ClusterError:
    """A connected worker's link closed or timed out while the session was set up: the ClusterError names it
    and is `lost` (a root serving requests together plans again without it: session/batching.py)."""
    return ClusterError(f"{w.name}: {what}{said(w.address, e)}", address=w.address, node_id=w.hello.node_id, lost=True)


async def expect(w: Worker, cls: type, timeout: float) -> Any:
    try:
        msg = await w.link.receive(timeout)
    except (LinkClosed, LinkTimeout) as e:
        raise dropped(w, e) from None
    except ProtocolError as e:
        raise ClusterError(f"{w.name}: {said(w.address, e)}") from None
    if isinstance(msg, Error):
        code = ErrorCode.parse(str(msg.code))  # passed on only where the root acts on it (a full disk)
        raise ClusterError(f"{w.name}: {msg.message}", code if code == ErrorCode.DISK_FULL else None,
                           w.address, w.hello.node_id)
    if not isinstance(msg, cls):
        raise ClusterError(f"{w.name} sent {type(msg).__name__} where {cls.__name__} was expected")
    return msg


async def dial(w: Worker, the_plan: AnyPlan, root_id: str, t: Timeouts,
               key: ClusterKey | None = None) -> tuple[socket.socket, bytes | None]:
    hello = MeshHello(the_plan.epoch, root_id, 0, w.index)
    try:
        return await dial_mesh(w.address, hello, t.mesh, t.socket, key)
    except (LinkClosed, LinkTimeout) as e:
        raise dropped(w, e, "mesh connection failed: ") from None
    except (MeshRefused, ProtocolError) as e:
        raise ClusterError(f"{w.name}: mesh connection failed: {said(w.address, e)}") from None


def said(address: str, e: BaseException) -> str:
    """e's message without the address it starts with (the worker is named already)."""
    return str(e).removeprefix(f"{address}: ").removeprefix(f"{address} ")
