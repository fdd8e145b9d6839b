"""Command line: parse arguments into frozen configs, then hand off. Errors become one line on stderr."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Sequence

from . import __version__
from .config import EXCHANGES, POLICIES
from .sampler import SamplerConfig

EXIT_USAGE = 2
EXIT_FAILED = 1
DEFAULT_DAEMON = "127.0.0.1:7340"


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
    exchange: str = "exact"  # how the nodes combine their shares with --workers (scheduler.EXCHANGES)
    stats: bool = False  # print per-token cluster statistics at the end
    daemon: str | None = None  # "host:port" of the daemon to send the prompt to; None: in-process only


def _add_generation_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The flags `run` and `chat` share: the model, its context, the sampler, where it runs."""
    p.add_argument("--model", help="GGUF model path (default: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--ctx", type=int, default=2048, help="KV cache positions (default 2048)")
    p.add_argument("--threads", type=int, help="compute threads (default: one per CPU core)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default 1.0)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--daemon", metavar="HOST:PORT",
                   help=f"the daemon to send {what} to (default 127.0.0.1:7340; if none answers there, "
                        "it runs in this process)")
    p.add_argument("--local", action="store_true", help="run in this process, never through a daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllp2p", description="Run LLMs across the computers on your LAN.")
    parser.add_argument("--version", action="version", version=f"dllp2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="measure prefill and decode speed (and llama.cpp's, if installed)"))

    run = sub.add_parser("run", help="generate text from a prompt")
    run.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    _add_generation_flags(run, "the prompt")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", help="system prompt for --chat")
    run.add_argument("--engine", choices=["jit", "reference"], default="jit",
                     help="jit: compiled for this CPU (default); reference: the slow numpy oracle")
    run.add_argument("--workers", nargs="+", metavar="HOST:PORT", default=[],
                     help="worker daemons (dllp2p daemon) to split the model across; this process is the root")
    run.add_argument("--plan", choices=POLICIES, default="pow2",
                     help="with --workers: pow2 = 2^n nodes, equal slices (default); weighted = every node the "
                          "model's KV heads allow, slices by capacity")
    run.add_argument("--exchange", choices=EXCHANGES,
                     help="with --workers: exact = output bit-identical to one node, 4 exchanges per layer "
                          "(default); q8 = Megatron partial sums in Q8_0, 2 exchanges per layer, a third of "
                          "the bytes, output within quantization noise of one node's")
    run.add_argument("--stats", action="store_true",
                     help="with --workers: print per-token inference ms, sync ms and bytes sent/received")

    chat = sub.add_parser("chat", help="talk with the model, turn by turn (lines from stdin; /reset, /exit)")
    chat.add_argument("--system", help="system prompt (default: the chat template's)")
    _add_generation_flags(chat, "each turn")

    daemon = sub.add_parser("daemon", help="serve as a node of the LAN cluster (found by mDNS, or --peer)",
                            description="Settings come from /etc/dllp2p/config.toml ([daemon] table), then "
                                        "DLLP2P_* environment variables, then these flags.")
    daemon.add_argument("--config", help="config file (default /etc/dllp2p/config.toml, or $DLLP2P_CONFIG)")
    daemon.add_argument("--host", default="0.0.0.0", action=_Given,
                        help="address to listen on (default 0.0.0.0: all IPv4)")
    daemon.add_argument("--port", type=int, default=7340, action=_Given,
                        help="TCP port (default 7340; 0 = any free port)")
    daemon.add_argument("--threads", type=int, action=_Given, help="compute threads (default: one per CPU core)")
    daemon.add_argument("--state-dir", action=_Given, help="node id and weight cache (default ~/.local/state/dllp2p)")
    daemon.add_argument("--cluster", action=_Given, help="cluster name: only daemons of the same name join "
                                                         "(default 'default')")
    daemon.add_argument("--peer", dest="peers", nargs="+", metavar="HOST:PORT", action=_Given,
                        help="daemons to poll directly, where multicast (mDNS) does not get through")
    daemon.add_argument("--interface", dest="interfaces", nargs="+", metavar="IP", action=_Given,
                        help="use mDNS only on the interfaces with these IPv4 addresses (default: all; with "
                             "--host ADDRESS: that one)")
    daemon.add_argument("--no-discovery", dest="discovery", action=_GivenFalse, default=True,
                        help="no mDNS: neither advertise nor browse (--peer still works)")
    daemon.add_argument("--log-level", choices=["debug", "info", "warning", "error"], action=_Given,
                        help="default info")
    daemon.add_argument("--exchange", choices=EXCHANGES, action=_Given,
                        help="as root: exact (default, bit-identical to one node) or q8 (fewer bytes; see run)")
    daemon.add_argument("--plan", choices=POLICIES, action=_Given,
                        help="as root: pow2 (default) = 2^n nodes, equal slices; weighted = every node the "
                             "model's KV heads allow, slices by capacity (see run)")
    daemon.add_argument("--api", metavar="HOST:PORT", action=_Given,
                        help="where to serve the OpenAI-compatible HTTP API (default 127.0.0.1:7341; 'off': "
                             "none; no authentication yet: keep it on loopback)")
    daemon.add_argument("--model", action=_Given,
                        help="GGUF model served when this daemon is root (default: the installed SmolLM2)")

    status = sub.add_parser("status", help="show the cluster as a daemon sees it (live, or --json once)")
    status.add_argument("--host", default="127.0.0.1", help="the daemon to ask (default 127.0.0.1)")
    status.add_argument("--port", type=int, default=7340, help="its port (default 7340)")
    status.add_argument("--json", action="store_true", help='print {"nodes": [...]} once, for scripts')
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the daemon (default 2)")
    return parser


class _Given(argparse.Action):
    """Stores the value and notes that the flag was given: only given flags override the config file."""

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        setattr(namespace, self.dest, values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


class _GivenFalse(_Given):
    def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        super().__init__(*args, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        super().__call__(parser, namespace, False, option_string)


def _generation_flags(ns: argparse.Namespace) -> SamplerConfig:
    """Check the shared flags; -> the sampler they describe."""
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

    if ns.daemon is not None:
        parse_address(ns.daemon)
    if ns.local and ns.daemon:
        raise ValueError("--local and --daemon exclude each other")
    return sampler


@dataclass(frozen=True)
class ChatConfig:
    model: str | None
    system: str | None
    steps: int  # per reply
    ctx: int
    sampler: SamplerConfig
    threads: int | None = None
    daemon: str | None = None  # as RunConfig.daemon


def chat_config(ns: argparse.Namespace) -> ChatConfig:
    sampler = _generation_flags(ns)
    daemon = None if ns.local or (ns.model and not ns.daemon) else ns.daemon or DEFAULT_DAEMON
    return ChatConfig(ns.model, ns.system, ns.steps, ns.ctx, sampler, ns.threads, daemon)


def run_config(ns: argparse.Namespace) -> RunConfig:
    sampler = _generation_flags(ns)
    from .link import parse_address

    for address in ns.workers:
        parse_address(address)
    if ns.exchange is not None and not ns.workers:
        raise ValueError("--exchange applies to a cluster given by --workers (a root daemon uses its own: "
                         "dllp2p daemon --exchange, or exchange in its config)")
    # through a daemon unless told otherwise, or asked for what only this process does (--workers, the
    # reference engine, a model file of its own without naming a daemon)
    own = ns.local or ns.workers or ns.engine != "jit" or (ns.model and not ns.daemon)
    daemon = None if own else ns.daemon or DEFAULT_DAEMON
    return RunConfig(ns.model, ns.prompt, ns.steps, ns.ctx, ns.chat, ns.system, ns.engine, sampler, ns.threads,
                     tuple(ns.workers), ns.plan, ns.exchange or "exact", ns.stats, daemon)


def daemon_settings(ns: argparse.Namespace, environ=None) -> dict:  # noqa: ANN001
    """Config file < DLLP2P_* environment < the flags given (see dllp2p/config.py)."""
    from .config import daemon_settings

    given = getattr(ns, "given", frozenset())
    flags = {key: getattr(ns, key) for key in given}
    return daemon_settings(flags, ns.config, environ)


def daemon_config(ns: argparse.Namespace, environ=None):  # noqa: ANN001 -> daemon.DaemonConfig (lazily)
    import os

    environ = os.environ if environ is None else environ
    return config_of_settings(daemon_settings(ns, environ), environ)


def config_of_settings(s: dict, environ):  # noqa: ANN001 -> daemon.DaemonConfig
    from pathlib import Path

    from .daemon import DaemonConfig
    from .jit.engine import default_threads

    if not 0 <= s["port"] < 65536:
        raise ValueError("--port must be in 0..65535")
    if s["threads"] is not None and s["threads"] < 1:
        raise ValueError("--threads must be at least 1")
    state = s["state_dir"] or Path(environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "dllp2p"
    model = Path(s["model"]).expanduser() if s.get("model") else _installed_model()
    return DaemonConfig(s["host"], s["port"], s["threads"] or default_threads(), Path(state).expanduser(),
                        cluster=s["cluster"], discovery=s["discovery"], interfaces=tuple(s["interfaces"]),
                        peers=tuple(s["peers"]), model=model, exchange=s["exchange"], policy=s["plan"],
                        api=None if s["api"] in ("", "off") else s["api"])


def _installed_model():  # -> Path | None
    from .models import NoModel, default_model_path

    try:
        return default_model_path()
    except NoModel:
        return None


def status_main(ns: argparse.Namespace) -> int:
    import json

    from . import status
    from .link import format_address

    address = format_address(ns.host, ns.port)
    if ns.interval <= 0 or ns.timeout <= 0:
        raise ValueError("--interval and --timeout must be > 0")
    if ns.json:
        print(json.dumps(status.to_json(status.survey(address, ns.timeout)), indent=2))
        return 0
    return status.watch(address, ns.interval, ns.timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    from .errors import user_facing_errors

    try:
        if os.environ.get("DLLP2P_TARGET_CPU"):  # read here, once, for every compile of this process
            from .jit.compiler import default_target

            default_target()
        if ns.command == "run":
            from .run import run

            return run(run_config(ns))
        if ns.command == "chat":
            from .repl import chat

            return chat(chat_config(ns))
        if ns.command == "bench":
            from . import bench

            return bench.main(ns)
        if ns.command == "daemon":
            import logging

            from . import daemon

            settings = daemon_settings(ns)
            config = config_of_settings(settings, os.environ)
            level = settings["log_level"].upper()
            logging.basicConfig(stream=sys.stderr, level=level, format="dllp2p daemon: %(levelname)s %(message)s")
            return daemon.main(config)
        if ns.command == "status":
            return status_main(ns)
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
