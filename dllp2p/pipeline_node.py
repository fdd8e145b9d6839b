"""Pipeline and hybrid plans, compute side: a node of a stage, and what it holds.

    tensors = plan_tensors(model, plan, i)        # root: what node i of any plan holds
    node = plan_node(config, plan, i, tensors, peers, ctx, threads)
    logits = node.forward(tokens, start_pos)     # on every node, same arguments; node 0 gets the logits

This module is the compute module the session layer drives (it re-exports tp's NodeTensor, PeerLost,
ExchangeAuthFailed and split_block beside these two).

For a scheduler.Plan these are tp.node_tensors and tp.TPNode. For a pipeline.PipelinePlan, node i (the
plan's flattened index; peers[j] its socket to flattened node j, as the session's mesh connects every
pair) is a StageNode: a TPNode of its stage's group whose program (jit/tp_stage.py) runs only the stage's
layers and hands the residual on natively, so the root drives it exactly as a tensor-parallel cluster:
a Step to every worker, then its own forward, which returns the logits (the root leads the last stage).
"""

from __future__ import annotations

import socket
from typing import Any, Mapping, Sequence

import numpy as np

from .formats import GGUFModel, ModelConfig
from .jit.engine import _kernel_type
from .jit.layout import aligned_zeros
from .jit.program import LAYER_MATRICES, ProgramSpec
from .jit.tp_partition import Partition
from .jit.tp_seal import TAG
from .jit.tp_stage import StageLinks, StageSlots, build_stage_program, resid_bytes
from .pipeline import AnyPlan, PipelinePlan
from .scheduler import Plan
from .tp import ExchangeAuthFailed, NodeTensor, PeerLost, TPNode, node_tensors, sealed_bytes, split_block

# the compute module the session layer drives (session/root.py, worker.py; tests/fake_tp.py is another)
__all__ = ["ExchangeAuthFailed", "NodeTensor", "PeerLost", "StageNode", "plan_node", "plan_tensors", "split_block"]


def plan_tensors(model: GGUFModel, plan: AnyPlan, index: int) -> dict[str, NodeTensor]:
    """What node `index` of `plan` holds: its stage's layers only, the embedding's vocabulary rows in the
    first stage, the final norm and output projection in the last (tp.node_tensors)."""
    if isinstance(plan, Plan):
        return node_tensors(model, plan, index)
    k, j = plan.locate(index)
    stage = plan.stages[k]
    return node_tensors(model, stage.plan, j, stage.layers, embed=k == 0, output=k == len(plan.stages) - 1)


def plan_node(config: ModelConfig, plan: AnyPlan, index: int, tensors: Mapping[str, NodeTensor],
              peers: Sequence[socket.socket | None], ctx: int, threads: int | None = None, **options: Any) -> TPNode:
    """The engine of node `index` of any plan (options: TPNode's keywords)."""
    if isinstance(plan, Plan):
        return TPNode(config, plan, index, tensors, peers, ctx, threads, **options)
    return StageNode(config, plan, index, tensors, peers, ctx, threads, **options)


class StageNode(TPNode):
    """Node `index` of a PipelinePlan. peers[j]: a connected blocking socket to flattened node j (None at
    `index`; only those of its group, the previous stage's leader and, for a leader, the next stage's
    nodes are used); exchange_keys likewise (TPNode). forward as TPNode's: node 0 gets the logits."""

    slots_class = StageSlots

    def __init__(self, config: ModelConfig, plan: PipelinePlan, index: int, tensors: Mapping[str, NodeTensor],
                 peers: Sequence[socket.socket | None], ctx: int, threads: int | None = None, *,
                 exchange_keys: Sequence[tuple[bytes, bytes] | None] | None = None, **options: Any):
        if len(peers) != plan.n_nodes or peers[index] is not None:
            raise ValueError(f"need one socket per other node of the plan ({plan.n_nodes - 1}), None at {index}")
        k, j = plan.locate(index)
        last = len(plan.stages) - 1
        self.stage_index, self.pipeline = k, plan
        stage = plan.stages[k]
        group = [plan.index_of(k, x) for x in range(stage.plan.n_nodes)]
        extra = [plan.index_of(k - 1, 0)] if k else []
        nxt = [plan.index_of(k + 1, x) for x in range(plan.stages[k + 1].plan.n_nodes)] if j == 0 and k < last else []
        n = len(group)
        self.links = StageLinks(n if k else None, tuple(range(n + len(extra), n + len(extra) + len(nxt))))
        self.link_nodes = group + extra + nxt  # link -> flattened node index
        self._layers, self._embeds, self._logits = stage.layers, k == 0, k == last
        links = [None if g == index else peers[g] for g in self.link_nodes]
        keys = None if exchange_keys is None else [None if g == index else exchange_keys[g] for g in self.link_nodes]
        super().__init__(config, stage.plan, j, tensors, links, ctx, threads, exchange_keys=keys, **options)

    def _n_links(self, part: Partition) -> int:
        return len(self.link_nodes)

    def _spec(self, config: ModelConfig, tensors: Mapping[str, NodeTensor], max_chunk: int) -> ProgramSpec:
        l0, l1 = self._layers
        mine = {i: tuple(_kernel_type(tensors[f"blk.{i}.{n}.weight"].qtype) for n in LAYER_MATRICES)
                for i in range(l0, l1)}
        layer_types = tuple(mine.get(i, ()) for i in range(config.n_layers))
        stand_in = mine[l0][0]  # the embedding's or output's type where the stage has none (never called)
        embed = _kernel_type(tensors["token_embd.weight"].qtype) if self._embeds else stand_in
        out_name = "token_embd.weight" if config.tied_output else "output.weight"
        output = _kernel_type(tensors[out_name].qtype) if self._logits else stand_in
        return ProgramSpec(config, layer_types, embed, output, max_chunk, layers=(l0, l1), embeds=self._embeds,
                           emits_logits=self._logits, dynamic=self._dynamic)

    def _program_key(self) -> str:
        return super()._program_key() + f"|stage {self.links}|" + ",".join(StageSlots.BUFFERS)

    def _build_program(self, module) -> None:
        build_stage_program(module, self.spec, self.part, self.links, self.sealed)

    def _extra_buffers(self) -> dict[str, np.ndarray]:
        return {**super()._extra_buffers(), "resid": aligned_zeros(resid_bytes(self.spec), np.uint8)}

    def _sealed_bytes(self) -> int:
        return max(sealed_bytes(self.spec, self.part), resid_bytes(self.spec) + TAG)

    def forward(self, tokens: Sequence[int], start_pos: int, top: int = 0) -> np.ndarray | None:
        """TPNode.forward; stats count the residual handed on (bytes_sent) and taken in (bytes_received)."""
        result = super().forward(tokens, start_pos, top)
        hand_off = len(tokens) * self.config.dim * 4 + (TAG if self.sealed else 0)
        self.stats["bytes_sent"] += hand_off * len(self.links.next)
        self.stats["bytes_received"] += hand_off * (self.links.prev is not None)
        return result

    def _after_step(self) -> None:
        try:
            super()._after_step()
        except ExchangeAuthFailed as e:  # link -> the flattened node it reaches
            raise ExchangeAuthFailed(self.link_nodes[e.node], str(e).split(": ", 1)[-1]) from None
        except PeerLost as e:
            raise PeerLost(self.link_nodes[e.node], str(e).split(": ", 1)[-1]) from None

    @property
    def gets_logits(self) -> bool:
        """The last stage's leader (the root) only: `index` is this node's place in its stage."""
        return self._logits and self.index == 0
