"""A daemon's prompt slot: a Generate is served here when this node is the root, else forwarded to the root
and its answers relayed back. A root alone serves its requests together (session/batching.py, which holds
the slot while any runs); a root with workers one at a time in the slot (as does a worker session)."""

from __future__ import annotations

import logging

import trio

from ..clusterkey import ClusterKey
from ..config import Timeouts
from ..error_codes import ErrorCode
from ..session import service
from ..wire.link import TrioLink
from ..wire.messages import Error, Generate
from .membership import Membership

log = logging.getLogger("dllp2p.daemon")


class PromptSlot:
    def __init__(self, node_id: str, membership: Membership, root_service: service.RootService, slot: trio.Lock,
                 timeouts: Timeouts, key: ClusterKey | None = None):
        self.node_id = node_id
        self.key = key  # a forward to the root goes through the secure channel under it
        self.membership = membership
        self.root_service = root_service
        self._slot = slot
        self.t = timeouts

    async def generate(self, link: TrioLink, g: Generate) -> None:
        """A prompt: served here if this node is root (one request or session at a time), else forwarded."""
        e = self.membership.election()
        if e.root is not None and e.root.node_id != self.node_id:
            log.info("request from %s: forwarded to the root %s (%s)", link.peer, e.root.node_id, e.root.address)
            await service.forward(link, g, e.root.address, self.node_id, self.t, self.key)
            return
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
            await self.root_service.serve(link, g, workers, ids)
        finally:
            self._slot.release()
