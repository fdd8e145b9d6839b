"""A non-root daemon's half of a request: pass the Generate on to the root and relay its answers back,
keeping the ids of every TokenChunk relayed, so that a root lost or stopping mid-request (RootLost) can
be replaced: the prompt slot (daemon/prompts.py) resubmits the request to the next root with those ids as
Generate.already."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..error_codes import ErrorCode
from ..wire.client import GenerateCall
from ..wire.codec import ProtocolError
from ..wire.link import LinkClosed, LinkTimeout, TrioLink
from ..wire.messages import MAX_HOPS, Error, Generate, TokenChunk
from ..wire.secure import HandshakeFailed


@dataclass(frozen=True)
class RootLost:
    """forward's answer when the root went away before the request was done: what resubmitting it needs."""

    already: tuple[int, ...]  # every id whose text the client has been sent (Generate.already of the next try)
    cause: str
    left: bool = False  # the root said it is stopping (draining), rather than died or fell silent
    since: float = 0.0  # time.monotonic() of the last text relayed (or of the start): the client's pause runs from it


async def forward(link: TrioLink, g: Generate, root: str, node_id: str, timeouts: Timeouts,
                  key: ClusterKey | None = None) -> RootLost | None:
    """Pass g on to the root daemon at `root` (through the secure channel under key) and relay its answers
    until Done or Error. -> None once the request has ended here (answered, or refused); RootLost when the
    root was lost first: its link closed (killed), it was silent for timeouts.progress after its first
    token (timeouts.build before it), or it answered draining (stopping), with the ids streamed so far."""
    if g.hops >= MAX_HOPS:
        await _send_error(link, Error(ErrorCode.FORWARD_LOOP, f"node {node_id}: the request was forwarded {g.hops} times; "
                                                  "the daemons do not agree on a root"))
        return None
    try:
        up = await GenerateCall.open(root, replace(g, hops=g.hops + 1), timeouts.hello, key)
    except HandshakeFailed as e:
        await _send_error(link, Error(ErrorCode.UNREACHABLE, f"node {node_id}: the root is unreachable: {e}"))
        return None
    except (LinkClosed, LinkTimeout) as e:
        return RootLost(g.already, f"the root {root} is unreachable: {e}", since=time.monotonic())
    already, resumable, since = list(g.already), True, time.monotonic()
    try:
        while True:
            try:
                msg = await up.receive(timeouts.progress if len(already) > len(g.already) else timeouts.build)
            except (LinkClosed, LinkTimeout, ProtocolError) as e:
                lost = RootLost(tuple(already), f"root {root} failed: {e}", since=since)
                if resumable:
                    return lost
                await _send_error(link, Error(ErrorCode.GENERATE, f"node {node_id}: {lost.cause}"))
                return None
            if isinstance(msg, Error) and msg.kind is ErrorCode.DRAINING and resumable:
                return RootLost(tuple(already), msg.message, left=True, since=since)
            await link.send(msg)  # LinkClosed: the client went away; closing `up` stops the root
            if not isinstance(msg, TokenChunk):
                return None
            already.extend(msg.ids)
            since = time.monotonic()
            resumable = resumable and (bool(msg.ids) or not msg.text)  # a root that sends no ids cannot be resumed
    finally:
        await up.aclose()


async def _send_error(link: TrioLink, msg: Error) -> None:
    try:
        await link.send(msg)
    except LinkClosed:
        pass
