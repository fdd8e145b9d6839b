"""Command line: parse arguments into frozen configs, then hand off. Errors become one line on stderr."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Sequence

from . import __version__
from .sampler import SamplerConfig

EXIT_USAGE = 2
EXIT_FAILED = 1


@dataclass(frozen=True)
class RunConfig:
    model: str | None
    prompt: str
    steps: int
    ctx: int
    chat: bool
    system: str | None
    engine: str
    sampler: SamplerConfig
    threads: int | None = None  # None: one per CPU this process may run on
    workers: tuple[str, ...] = ()  # "host:port" of worker daemons: this process becomes their root
    plan: str = "pow2"  # scheduler policy with --workers
    stats: bool = False  # print per-token cluster statistics at the end


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllp2p", description="Run LLMs across the computers on your LAN.")
    parser.add_argument("--version", action="version", version=f"dllp2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="measure prefill and decode speed (and llama.cpp's, if installed)"))

    run = sub.add_parser("run", help="generate text from a prompt")
    run.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    run.add_argument("--model", help="GGUF model path (default: the installed SmolLM2-135M-Instruct)")
    run.add_argument("--steps", type=int, default=256, help="tokens to generate at most (default 256)")
    run.add_argument("--ctx", type=int, default=2048, help="KV cache positions (default 2048)")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", help="system prompt for --chat")
    run.add_argument("--engine", choices=["jit", "reference"], default="jit",
                     help="jit: compiled for this CPU (default); reference: the slow numpy oracle")
    run.add_argument("--threads", type=int, help="compute threads (default: one per CPU core)")
    run.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    run.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    run.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    run.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    run.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default 1.0)")
    run.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    run.add_argument("--workers", nargs="+", metavar="HOST:PORT", default=[],
                     help="worker daemons (dllp2p daemon) to split the model across; this process is the root")
    run.add_argument("--plan", choices=["pow2", "weighted"], default="pow2",
                     help="with --workers: pow2 = 2^n nodes, equal slices (default); weighted = every node the "
                          "model's KV heads allow, slices by capacity")
    run.add_argument("--stats", action="store_true",
                     help="with --workers: print per-token inference ms, sync ms and bytes sent/received")

    daemon = sub.add_parser("daemon", help="serve as a worker node for roots on the LAN (dllp2p run --workers)")
    daemon.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: all IPv4)")
    daemon.add_argument("--port", type=int, default=7340, help="TCP port (default 7340; 0 = any free port)")
    daemon.add_argument("--threads", type=int, help="compute threads (default: one per CPU core)")
    daemon.add_argument("--state-dir", help="node id and weight cache (default ~/.local/state/dllp2p)")
    return parser


def run_config(ns: argparse.Namespace) -> RunConfig:
    if ns.steps < 1:
        raise ValueError("--steps must be at least 1")
    if ns.ctx < 2:
        raise ValueError("--ctx must be at least 2")
    sampler = SamplerConfig(
        temperature=ns.temperature,
        top_k=ns.top_k,
        top_p=ns.top_p,
        min_p=ns.min_p,
        repeat_penalty=ns.repeat_penalty,
        seed=ns.seed,
    )
    if ns.threads is not None and ns.threads < 1:
        raise ValueError("--threads must be at least 1")
    from .link import parse_address

    for address in ns.workers:
        parse_address(address)
    return RunConfig(ns.model, ns.prompt, ns.steps, ns.ctx, ns.chat, ns.system, ns.engine, sampler, ns.threads,
                     tuple(ns.workers), ns.plan, ns.stats)


def daemon_config(ns: argparse.Namespace):  # -> daemon.DaemonConfig (imported lazily)
    import os
    from pathlib import Path

    from .daemon import DaemonConfig
    from .jit.engine import default_threads

    if not 0 <= ns.port < 65536:
        raise ValueError("--port must be in 0..65535")
    if ns.threads is not None and ns.threads < 1:
        raise ValueError("--threads must be at least 1")
    state = ns.state_dir or Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dllp2p"
    return DaemonConfig(ns.host, ns.port, ns.threads or default_threads(), Path(state).expanduser())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .errors import user_facing_errors

    try:
        if ns.command == "run":
            from .run import run_local

            return run_local(run_config(ns))
        if ns.command == "bench":
            from . import bench

            return bench.main(ns)
        if ns.command == "daemon":
            import logging

            from . import daemon

            logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="dllp2p daemon: %(message)s")
            return daemon.main(daemon_config(ns))
    except user_facing_errors() as e:
        print(f"dllp2p: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ndllp2p: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {ns.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
