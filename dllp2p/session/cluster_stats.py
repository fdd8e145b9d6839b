"""What a cluster's root measures of a request: the set-up (nodes, plan, bytes pushed) and every step
(tokens, wall and sync ms, bytes each way, CPU waits), summarized in distributed-llama's terms."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepStats:
    tokens: int
    step_ms: float  # wall time of the root's forward (the whole cluster's step)
    sync_ms: float  # of which waiting for and moving activations
    bytes_sent: int  # by the root, this step
    bytes_received: int
    delay_ms: float = 0.0  # of the step, the root's step thread waited for a CPU (session/rates.py)


@dataclass
class ClusterStats:
    nodes: int = 0
    policy: str = ""
    exchange: str = ""
    pushed_bytes: int = 0
    cached_slices: int = 0
    setup_s: float = 0.0
    steps: list[StepStats] = field(default_factory=list)
    kept: bool = False  # serving a later request of the session (service.py's warm sessions)
    timeout: float = 30.0  # the mesh sockets' receive timeout before a step was measured (Timeouts.socket)

    def summary(self) -> list[str]:
        """Lines like distributed-llama's: per token inference ms, sync ms, bytes sent and received."""
        head = f"cluster of {self.nodes} nodes ({self.policy} plan, {self.exchange} exchange): "
        if self.kept:
            head += "session kept from the last request (weights pushed 0.0 MB, set-up 0.00 s)"
        else:
            head += (f"weights pushed {self.pushed_bytes / 1e6:.1f} MB, {self.cached_slices} slices cached; "
                     f"set-up {self.setup_s:.2f} s")
        lines = [head]
        prefill = [s for s in self.steps if s.tokens > 1]
        decode = [s for s in self.steps if s.tokens == 1]
        for label, steps in (("prefill", prefill), ("decode", decode)):
            n = sum(s.tokens for s in steps)
            if not n:
                continue
            ms = sum(s.step_ms for s in steps) / n
            sync = sum(s.sync_ms for s in steps) / n
            sent = sum(s.bytes_sent for s in steps) / n / 1e3
            recv = sum(s.bytes_received for s in steps) / n / 1e3
            lines.append(f"{label} per token ({n} tokens): {ms:.2f} ms, inference {ms - sync:.2f} ms, "
                         f"sync {sync:.2f} ms; sent {sent:.1f} kB, received {recv:.1f} kB")
        return lines
