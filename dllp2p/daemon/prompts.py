"""A daemon's prompt slot: a Generate is served here when this node is the root, else forwarded to the root
and its answers relayed back. A root alone serves its requests together (session/batching.py, which holds
the slot while any runs); a root with workers one at a time in the slot (as does a worker session).

Handover (a root lost or stopping mid-request): the daemon that forwarded a request keeps what resuming
it needs, the Generate and the ids of every TokenChunk relayed (forwarding.forward -> RootLost). When the
root's link closes (kill), it falls silent, or it answers draining (SIGTERM), this daemon takes it out of
the membership at once (Membership.root_lost: it said so, or a Status to it fails), waits for the
election to name the next root (Timeouts.handover at most), and resubmits the request there with those ids
as Generate.already; the next root (this node itself, when it is next in line) prefills prompt + ids and
streams only what follows, so the client's stream simply continues. At most MAX_HANDOVERS times a request.

Draining (the daemon's SIGTERM): new requests are refused with ErrorCode.DRAINING (retryable: a daemon
forwarding one resubmits it to the next root, `dllp2p run` asks again); those taken here (served as
root, or forwarded by this daemon) get up to `drain_s` seconds to finish, then are ended with a DRAINING
Error too, which whoever sent them resumes elsewhere.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..election import Election
from ..error_codes import ErrorCode
from ..session import forwarding, service
from ..session.recovery import Recovery
from ..wire.link import LinkClosed, TrioLink
from ..wire.messages import Done, Error, Generate, TokenChunk
from .membership import Membership

log = logging.getLogger("dllp2p.daemon")

MAX_HANDOVERS = 3  # roots one request may lose before it fails


class PromptSlot:
    def __init__(self, node_id: str, membership: Membership, root_service: service.RootService, slot: trio.Lock,
                 timeouts: Timeouts, key: ClusterKey | None = None):
        self.node_id = node_id
        self.key = key  # a forward to the root goes through the secure channel under it
        self.membership = membership
        self.root_service = root_service
        self._slot = slot
        self.t = timeouts
        self.draining = False  # stopping: no new request is served here
        self._inflight: set[trio.CancelScope] = set()  # the requests taken here (served as root or forwarded)
        self._idle = trio.Event()  # set whenever _inflight is empty
        self._idle.set()

    async def generate(self, link: TrioLink, g: Generate) -> None:
        """A prompt: served here if this node is root (one request or session at a time), else forwarded,
        and resubmitted to the next root when the one it went to is lost or stops. While draining: refused
        (DRAINING); one in flight when drain() runs out of time is ended with DRAINING."""
        if self.draining:
            await _send_quietly(link, self._draining_error())
            return
        with trio.CancelScope() as scope:
            self._inflight.add(scope)
            self._idle = trio.Event() if len(self._inflight) == 1 else self._idle
            try:
                await self._generate(link, g)
            finally:
                self._inflight.discard(scope)
                if not self._inflight:
                    self._idle.set()
        if scope.cancelled_caught:  # a forwarding daemon (or `dllp2p run`) resumes it elsewhere
            with trio.CancelScope(shield=True):
                await _send_quietly(link, self._draining_error("before the request was done"))

    async def _generate(self, link: TrioLink, g: Generate) -> None:
        watch = _Resumed(link, self.root_service.handed_over)
        for _ in range(MAX_HANDOVERS + 1):
            e = self.membership.election()
            if e.root is None or e.root.node_id == self.node_id:
                await self._serve_here(watch, g, e)
                return
            log.info("request from %s: forwarded to the root %s (%s)", link.peer, e.root.node_id, e.root.address)
            lost = await forwarding.forward(watch, g, e.root.address, self.node_id, self.t, self.key)
            if lost is None:
                return
            log.warning("request from %s: %s after %d tokens; handing it to the next root", link.peer, lost.cause,
                        len(lost.already))
            g = replace(g, already=lost.already)
            members = len(e.succession)
            await self.membership.root_lost(e.root, left=lost.left, limit=self.t.handover)
            how = "stopped" if lost.left else "lost"
            watch.lost(f"root {e.root.node_id} {how}; resumed on the next root", lost, members,
                       len(self.membership.election().succession))
        await _send_quietly(link, Error(ErrorCode.UNREACHABLE, f"node {self.node_id}: the request lost "
                                                               f"{MAX_HANDOVERS + 1} roots in a row"))

    async def _serve_here(self, link: TrioLink, g: Generate, e: Election) -> None:
        ids = await self.root_service.prompt_ids(link, g)  # outside the slot: tokenizing holds up nobody
        if ids is None:
            return
        workers = [m.address for m in e.succession if m.node_id != self.node_id]
        if await self.root_service.serve_batched(link, g, workers, ids):  # alone: with the others (it takes the slot)
            return
        with trio.move_on_after(self.t.idle) as waited:
            await self._slot.acquire()
        if waited.cancelled_caught:
            await link.send(Error(ErrorCode.BUSY, f"node {self.node_id} is busy"))
            return
        try:
            if self.draining:  # began while this request waited for the slot
                await _send_quietly(link, self._draining_error())
                return
            await self.root_service.serve(link, g, workers, ids, g.already)
        finally:
            self._slot.release()

    def _draining_error(self, when: str = "") -> Error:
        return Error(ErrorCode.DRAINING, f"node {self.node_id} is stopping{' ' + when if when else ''}; "
                                         "the next root takes the request")

    async def drain(self, limit: float) -> None:
        """(SIGTERM) Refuse new requests; give those taken here (served as root, or forwarded) `limit`
        seconds to finish, then end them with a DRAINING Error: a forwarding daemon resumes one it sent
        here on the next root; `dllp2p run` asks again (wire.client.ask)."""
        self.draining = True
        with trio.move_on_after(limit):
            await self._idle.wait()
        if self._inflight:
            log.warning("draining: %d request(s) not done after %.1f s; ended with 'draining' (resumed elsewhere "
                        "by whoever sent them)", len(self._inflight), limit)
        for scope in list(self._inflight):
            scope.cancel()
        with trio.move_on_after(5.0):
            await self._idle.wait()


class _Resumed:
    """The client's link, noting the first text after a handover: the pause the client saw (from the last
    text before the root was lost), reported as a recovery (RootService.handed_over: Status, the log)."""

    def __init__(self, link: TrioLink, report: Callable[[Recovery], None]):
        self.link, self.peer, self._report = link, link.peer, report
        self._pending: tuple[str, float, int, int, int] | None = None  # cause, since, replayed, members before, after

    def lost(self, cause: str, lost: forwarding.RootLost, before: int, after: int) -> None:
        if self._pending is None:  # a second loss before any text: the same pause goes on
            self._pending = (cause, lost.since, len(lost.already), before, after)

    async def send(self, msg: object) -> None:
        await self.link.send(msg)
        if self._pending is not None and isinstance(msg, (TokenChunk, Done)):
            cause, since, replayed, before, after = self._pending
            self._pending = None
            self._report(Recovery(cause, time.monotonic() - since, replayed, before, after, time.time()))


async def _send_quietly(link: TrioLink, msg: Error) -> None:
    with trio.move_on_after(5.0):
        try:
            await link.send(msg)
        except LinkClosed:
            pass
