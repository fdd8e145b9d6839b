"""A pipeline stage's node program: tp_program's tensor-parallel step over the stage's layers only, with
the residual handed from stage to stage inside the compiled code (dllp2p/pipeline.py has the plan).

    first stage    embedding (the tokens this node's group owns, swapped as in tp_program) -> layers
    later stage    thread 0 receives x f32[n, dim] from the previous stage's leader on link `prev` into
                   `resid`; a barrier; every thread copies it into its private x_t -> layers
    not the last   thread 0 (every thread's x_t is the same) copies x_t into `resid` and, if this node
                   leads its stage, sends it on each link of `next` (every node of the next stage)
    the last       final norm and logits, gathered to the group's node 0 as in tp_program

Links: the socket table `fds` (and the sealed exchange's keys and counters, tp_seal) is indexed by link:
0 .. n_nodes - 1 are the stage group's nodes (as in tp_program), links after those the other stages'
nodes this one talks to. A failed transfer records link + 1 in `error`, as an exchange does; the engine
(dllp2p/pipeline_node.py) names the node. The hand-off is one message per chunk per link: dim * 4 bytes
a token (SmolLM2: 2.3 kB; a 4096-dim model 16 kB), against 2-4 exchanges a layer inside a group.

Deadlock-free: stages wait only on earlier stages (and on their own group), never on later ones; a send
is at most max_chunk * dim * 4 bytes, within the sockets' 1 MiB buffers (tp.prepare_peer_socket).
"""

from __future__ import annotations

from dataclasses import dataclass

import llvmlite.ir as ir

from .irutil import i64
from .program import ProgramSpec, _emit_step, _emit_worker
from .tp_partition import Partition, TPSlots
from .tp_program import MSG_NOSIGNAL, MSG_WAITALL, _TPForward


class StageSlots(TPSlots):
    BUFFERS = TPSlots.BUFFERS + ("resid",)  # f32[max_chunk, dim]: the residual handed between stages


@dataclass(frozen=True)
class StageLinks:
    """Which links carry the residual: `prev` (receive; None in the first stage), `next` (send; empty
    but for the leader of a stage before the last)."""

    prev: int | None
    next: tuple[int, ...]


def resid_bytes(spec: ProgramSpec) -> int:
    return spec.max_chunk * spec.config.dim * 4


def build_stage_program(module: ir.Module, spec: ProgramSpec, part: Partition, links: StageLinks,
                        sealed: bool = False) -> None:
    if spec.embeds != (links.prev is None):
        raise ValueError("a stage embeds the tokens exactly when it receives no residual")
    if links.next and spec.emits_logits:
        raise ValueError("the last stage sends no residual on")
    _StageForward(module, spec, part, links, sealed).emit()
    _emit_worker(module)
    _emit_step(module)


class _StageForward(_TPForward):
    def __init__(self, module: ir.Module, spec: ProgramSpec, part: Partition, links: StageLinks, sealed: bool):
        super().__init__(module, spec, part, sealed)
        self.slots = StageSlots(spec.config.n_layers)
        self.links = links

    def receive_residual(self) -> None:
        row = self.c.dim * 4

        def body(resid: ir.Value) -> None:
            t0 = self.now_ns()
            self.transfer(self.recv, self.links.prev, resid, self.b.mul(self.n, i64(row)), MSG_WAITALL)
            self.count_exchange(t0)

        self.on_thread0("resid_in", self.ptr("resid"), body)
        self.copy(self.x_t, self.ptr("resid"), self.b.mul(self.n, i64(row)))

    def send_residual(self) -> None:
        b, row = self.b, self.c.dim * 4
        with b.if_then(b.icmp_signed("==", self.tid, i64(0))):
            resid, nbytes = self.ptr("resid"), b.mul(self.n, i64(row))
            self.copy(resid, self.x_t, nbytes)
            t0 = self.now_ns()
            for link in self.links.next:
                self.transfer(self.send, link, resid, nbytes, MSG_NOSIGNAL)
            self.count_exchange(t0)

