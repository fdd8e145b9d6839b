"""Command line: parse arguments into frozen configs, then hand off. Errors become one line on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from . import __version__, bench, bench_concurrency, clusterkey, config, daemon
from .clusterkey import ClusterKey
from .commands import chat, key, plan, run, status
from .config import DEFAULT_API_PORT, DEFAULT_PORT, EXCHANGES, LOCAL_DAEMON, PLANS, POLICIES
from .config import cache_dir, state_dir
from .daemon import DaemonConfig
from .errors import user_facing_errors
from .formats import load_metadata
from .jit.cpus import cap_threads, read_cpu_facts
from .memlimit import mem_budget
from .models import NoModel, default_model_path
from .sampler import SamplerConfig
from .session.batcher import BatchConfig
from .textsafe import SafeFormatter, printable
from .wire.link import format_address, parse_address

EXIT_USAGE = 2
EXIT_FAILED = 1
DEFAULT_DAEMON = LOCAL_DAEMON


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
    fallback: bool = False  # run in this process if no daemon listens at `daemon` (the default one, not named)
    cache_dir: Path | None = None  # compiled kernels and packed weights (config.cache_dir)
    key: ClusterKey | None = None  # the cluster key the daemon and workers are reached with
    mem_limit: int | None = None  # bytes this process's engine may use (--mem-limit); beyond it, weights stream


MEM_LIMIT_HELP = ("memory the engine may use: a size (1500M, 1.5G; a bare number is MiB), 'off', or 'auto' (the "
                  "default: the cgroup's limit, else the RAM available, less 192 MiB); weights beyond it stream from disk")
THREADS_HELP = ("compute threads (default: one per core this process may use, less the cores other programs keep "
                "busy; more than the cores are capped, with a warning)")
KEY_FILE_HELP = ("the cluster key file (default: $DLLP2P_KEY_FILE, config key_file, else /etc/dllp2p/cluster.key "
                 "for root, ~/.config/dllp2p/cluster.key otherwise, if it exists; 'off': none)")


def _add_generation_flags(p: argparse.ArgumentParser, what: str) -> None:
    """The flags `run` and `chat` share: the model, its context, the sampler, where it runs."""
    p.add_argument("--model", help="GGUF model path (default: the installed SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--ctx", type=int, default=2048, help="KV cache positions (default 2048)")
    p.add_argument("--threads", type=int, help=THREADS_HELP)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="1 = off (default 1.0)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--daemon", metavar="HOST:PORT",
                   help=f"the daemon to send {what} to (default {LOCAL_DAEMON}; if none answers there, "
                        "it runs in this process; one named here must answer)")
    p.add_argument("--local", action="store_true", help="run in this process, never through a daemon")
    p.add_argument("--key-file", help=KEY_FILE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllp2p", description="Run LLMs across the computers on your LAN.")
    parser.add_argument("--version", action="version", version=f"dllp2p {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    bench_parser = sub.add_parser("bench", help="measure prefill and decode speed (and llama.cpp's, if installed)")
    bench.add_arguments(bench_parser)
    bench_concurrency.add_arguments(bench_parser)

    run = sub.add_parser("run", help="generate text from a prompt")
    run.add_argument("--prompt", required=True, help="the prompt text (with --chat: the user's message)")
    _add_generation_flags(run, "the prompt")
    run.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    run.add_argument("--system", help="system prompt for --chat")
    run.add_argument("--mem-limit", dest="mem_limit", default="auto", metavar="SIZE", help=MEM_LIMIT_HELP)
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
    daemon.add_argument("--port", type=int, default=DEFAULT_PORT, action=_Given,
                        help=f"TCP port (default {DEFAULT_PORT}; 0 = any free port)")
    daemon.add_argument("--threads", type=int, action=_Given, help=THREADS_HELP)
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
    daemon.add_argument("--plan", choices=PLANS, action=_Given,
                        help="as root: auto (default) = the cost model picks how many nodes from this machine's "
                             "measured compute, the workers' and the links' (`dllp2p plan`); pow2 = 2^n nodes, "
                             "equal slices; weighted = every node the model's KV heads allow, slices by capacity")
    daemon.add_argument("--api", metavar="HOST:PORT", action=_Given,
                        help=f"where to serve the OpenAI-compatible HTTP API (default 127.0.0.1:{DEFAULT_API_PORT}; 'off': "
                             "none; beyond loopback it needs the cluster key, and clients the bearer key of `dllp2p key show "
                             "--api-token`)")
    daemon.add_argument("--api-host", dest="api_hosts", nargs="+", metavar="NAME", action=_Given,
                        help="host names the HTTP API answers to besides IP addresses, localhost and its --api host "
                             "(other Host headers get 421: DNS rebinding)")
    daemon.add_argument("--api-ctx", dest="api_ctx", type=int, metavar="N", action=_Given,
                        help="the context (KV positions) of the API's requests: the longest prompt + reply "
                             "(default 2048)")
    daemon.add_argument("--max-batch", dest="max_batch", type=int, metavar="N", action=_Given,
                        help="as root alone: requests generated together, continuous batching (default 8)")
    daemon.add_argument("--queue", type=int, metavar="N", action=_Given,
                        help="requests waiting beyond --max-batch, first come first served; more are refused "
                             "(HTTP 429) (default 16)")
    daemon.add_argument("--cluster-batch", dest="cluster_batch", action=_GivenTrue, default=False,
                        help="as root with workers: batch their requests too (over the tensor-parallel cluster); "
                             "default: one at a time (the path that recovers from a lost worker mid-request)")
    daemon.add_argument("--keep-busy", dest="drop_busy", action=_GivenFalse, default=True,
                        help="as root: keep planning with a worker whose CPU another program keeps busy (default: "
                             "leave it out while its CPU wait costs more than its share saves, try it again later)")
    daemon.add_argument("--kv-budget-mb", dest="kv_budget_mb", type=int, metavar="MIB", action=_Given,
                        help="KV cache of all batched requests together (default 0: --max-batch full contexts)")
    daemon.add_argument("--model", action=_Given,
                        help="GGUF model served when this daemon is root (default: the installed SmolLM2)")

    daemon.add_argument("--key-file", dest="key_file", action=_Given, help=KEY_FILE_HELP)
    daemon.add_argument("--mem-limit", dest="mem_limit", metavar="SIZE", action=_Given, help=MEM_LIMIT_HELP)
    daemon.add_argument("--cache-mb", dest="cache_mb", type=int, metavar="MIB", action=_Given,
                        help="size budget of each weight cache (received slices, packed slices); the least "
                             "recently used files go beyond it (default 4096)")

    daemon.add_argument("--drain-s", dest="drain_s", type=int, metavar="S", action=_Given,
                        help="on SIGTERM (systemctl stop), the seconds the requests it has taken may take to "
                             "finish before the daemons that forwarded them resume them on the next root (default 30)")

    keys = sub.add_parser("key", help="the cluster key: make it (new), print it (show), paste it on another device (set)")
    key_sub = keys.add_subparsers(dest="key_command", required=True)
    new = key_sub.add_parser("new", help="write a new random 256-bit cluster key (mode 0600)")
    new.add_argument("--out", help="where (default /etc/dllp2p/cluster.key as root, else ~/.config/dllp2p/cluster.key)")
    show = key_sub.add_parser("show", help="print the key in a form to paste on the next device")
    show.add_argument("--key-file", help=KEY_FILE_HELP)
    show.add_argument("--api-token", action="store_true",
                      help="print the HTTP API's bearer key instead (for OpenAI clients' api_key)")
    kset = key_sub.add_parser("set", help="store a key printed by `dllp2p key show` on another device")
    kset.add_argument("text", nargs="?", help="the key (default: read one line from stdin, which keeps it out of ps)")
    kset.add_argument("--out", help="where (default as for new)")

    status = sub.add_parser("status", help="show the cluster as a daemon sees it (live, or --json once)")
    status.add_argument("--host", default="127.0.0.1", help="the daemon to ask (default 127.0.0.1)")
    status.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"its port (default {DEFAULT_PORT})")
    status.add_argument("--json", action="store_true", help='print {"nodes": [...]} once, for scripts')
    status.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    status.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the daemon (default 2)")
    status.add_argument("--key-file", help=KEY_FILE_HELP)

    plan_ = sub.add_parser("plan", help="the plans the root priced (cost model): predicted and measured ms/token")
    plan_.add_argument("--host", default="127.0.0.1", help="the daemon to ask (default 127.0.0.1)")
    plan_.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"its port (default {DEFAULT_PORT})")
    plan_.add_argument("--json", action="store_true", help="print the candidates and figures as JSON")
    plan_.add_argument("--explain", action="store_true", help="where the time goes, and every node's figures")
    plan_.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for a daemon (default 2)")
    plan_.add_argument("--key-file", help=KEY_FILE_HELP)
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


class _GivenTrue(_Given):
    def __init__(self, *args, **kwargs):  # noqa: ANN002, ANN003
        super().__init__(*args, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001
        super().__call__(parser, namespace, True, option_string)


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
    fallback: bool = False  # as RunConfig.fallback
    cache_dir: Path | None = None
    key: ClusterKey | None = None  # as RunConfig.key


def chat_config(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ChatConfig:
    sampler = _generation_flags(ns)
    daemon = None if ns.local or (ns.model and not ns.daemon) else ns.daemon or DEFAULT_DAEMON
    environ = os.environ if environ is None else environ
    threads = asked_threads(ns.threads)
    return ChatConfig(ns.model, ns.system, ns.steps, ns.ctx, sampler, threads, daemon, ns.daemon is None,
                      cache_dir(environ), client_key(ns.key_file, environ) if daemon else None)


def run_config(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> RunConfig:
    sampler = _generation_flags(ns)
    for address in ns.workers:
        parse_address(address)
    if ns.exchange is not None and not ns.workers:
        raise ValueError("--exchange applies to a cluster given by --workers (a root daemon uses its own: "
                         "dllp2p daemon --exchange, or exchange in its config)")
    # through a daemon unless told otherwise, or asked for what only this process does (--workers, the
    # reference engine, a model file of its own without naming a daemon)
    own = ns.local or ns.workers or ns.engine != "jit" or (ns.model and not ns.daemon)
    daemon = None if own else ns.daemon or DEFAULT_DAEMON
    environ = os.environ if environ is None else environ
    threads = asked_threads(ns.threads)
    return RunConfig(ns.model, ns.prompt, ns.steps, ns.ctx, ns.chat, ns.system, ns.engine, sampler, threads,
                     tuple(ns.workers), ns.plan, ns.exchange or "exact", ns.stats, daemon, ns.daemon is None,
                     cache_dir(environ), client_key(ns.key_file, environ) if daemon or ns.workers else None,
                     None if daemon else mem_budget(ns.mem_limit)[0])


def asked_threads(asked: int | None, err=None, facts=None) -> int | None:  # noqa: ANN001
    """--threads (or config threads) checked, and capped to the cores this process can use (affinity mask,
    cgroup quota) with a one-line warning on err; None (not given) stays None: the engine's default
    (jit.engine.default_thread_choice) measures the load when it starts."""
    if asked is None:
        return None
    if asked < 1:
        raise ValueError("--threads must be at least 1")
    threads, warning = cap_threads(asked, facts or read_cpu_facts(measure_load=False))
    if warning:
        print(f"dllp2p: warning: {warning}", file=err or sys.stderr)
    return threads


def key_setting(flag: str | None, environ: Mapping[str, str]) -> str | None:
    """A client's key_file setting: --key-file, else DLLP2P_KEY_FILE, else the config file's key_file."""
    if flag is not None:
        return flag
    if environ.get("DLLP2P_KEY_FILE", "").strip():
        return environ["DLLP2P_KEY_FILE"].strip()
    path, required = config.config_path(environ, None)
    return config.load_file(path, required).get("key_file")


def client_key(flag: str | None, environ: Mapping[str, str]) -> ClusterKey | None:
    """The key a command reaches daemons with, read once here. Raises KeyFileError (one line)."""
    path = clusterkey.configured_path(key_setting(flag, environ), environ)
    return None if path is None else clusterkey.load(path)


def daemon_settings(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> dict:
    """Config file < DLLP2P_* environment < the flags given (see dllp2p/config.py)."""
    given = getattr(ns, "given", frozenset())
    flags = {key: getattr(ns, key) for key in given}
    return config.daemon_settings(flags, ns.config, environ)


def daemon_config(ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> DaemonConfig:
    environ = os.environ if environ is None else environ
    return config_of_settings(daemon_settings(ns, environ), environ)


def config_of_settings(s: dict, environ: Mapping[str, str]) -> DaemonConfig:
    from .jit.engine import default_thread_choice  # llvmlite: only a daemon's start needs it

    if not 0 <= s["port"] < 65536:
        raise ValueError("--port must be in 0..65535")
    threads = asked_threads(s["threads"])
    why, auto = f"{threads} threads, as configured", threads is None
    if threads is None:
        choice = default_thread_choice()
        threads, why = choice.threads, choice.reason
    if s["cache_mb"] < 1:
        raise ValueError("--cache-mb must be at least 1")
    if s["drain_s"] < 0:
        raise ValueError("--drain-s must be at least 0")
    if s["max_batch"] < 1 or s["queue"] < 0 or s["kv_budget_mb"] < 0 or s["pipeline_groups"] < 0:
        raise ValueError("--max-batch must be at least 1, --queue, --kv-budget-mb and pipeline_groups at least 0")
    batch = BatchConfig(s["max_batch"], s["queue"], s["kv_budget_mb"] << 20, cluster=s["cluster_batch"],
                        groups=s["pipeline_groups"])
    model = Path(s["model"]).expanduser() if s.get("model") else _installed_model()
    key_path = clusterkey.configured_path(s["key_file"], environ)
    key = None if key_path is None else clusterkey.load(key_path)
    mem_limit, mem_why = mem_budget(s["mem_limit"])
    return DaemonConfig(s["host"], s["port"], threads, state_dir(environ, s["state_dir"]), threads_why=why,
                        threads_auto=auto,
                        cluster=s["cluster"], key=key, discovery=s["discovery"], interfaces=tuple(s["interfaces"]),
                        peers=tuple(s["peers"]), model=model, exchange=s["exchange"], policy=s["plan"],
                        api=None if s["api"] in ("", "off") else s["api"], api_ctx=s["api_ctx"],
                        api_hosts=tuple(s["api_hosts"]), cache_dir=cache_dir(environ), cache_mb=s["cache_mb"],
                        drain_s=float(s["drain_s"]), batch=batch, drop_busy=s["drop_busy"],
                        plan_figures=tuple(config.parse_plan_figures(s["plan_figures"]).items()),
                        mem_limit=mem_limit, mem_limit_why=mem_why)


def _installed_model() -> Path | None:
    try:
        return default_model_path()
    except NoModel:
        return None


def check_model(path: Path | None) -> None:
    """A daemon's --model must be a readable GGUF now, not at its first prompt. Raises ModelFileError,
    OSError (one line each)."""
    if path is not None:
        load_metadata(path)


def configure_logging(level: str, fmt: str, stream=None) -> logging.Handler:  # noqa: ANN001
    """The daemon's log on stderr (or `stream`), every message escaped (textsafe: peers' text in it)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(SafeFormatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])
    return handler


def status_main(ns: argparse.Namespace) -> int:
    address = format_address(ns.host, ns.port)
    if ns.interval <= 0 or ns.timeout <= 0:
        raise ValueError("--interval and --timeout must be > 0")
    cluster_key = client_key(ns.key_file, os.environ)
    if ns.json:
        print(json.dumps(status.to_json(status.survey(address, ns.timeout, key=cluster_key)), indent=2))
        return 0
    return status.watch(address, ns.interval, ns.timeout, key=cluster_key)


def plan_main(ns: argparse.Namespace) -> int:
    if ns.timeout <= 0:
        raise ValueError("--timeout must be > 0")
    doc = plan.show(format_address(ns.host, ns.port), ns.timeout, as_json=ns.json, explain=ns.explain,
                    key=client_key(ns.key_file, os.environ))
    print(json.dumps(doc, indent=2) if ns.json else plan.render(doc, ns.explain))
    return 0


def key_main(ns: argparse.Namespace) -> int:
    """dllp2p key new | show | set."""
    if ns.key_command == "show":
        path = clusterkey.configured_path(key_setting(ns.key_file, os.environ), os.environ)
        if path is None:
            raise clusterkey.KeyFileError(f"no key file at {clusterkey.default_path(os.environ)} "
                                          "(make one: dllp2p key new; or name one: --key-file PATH)")
        return key.show(path, ns.api_token)
    out = Path(ns.out).expanduser() if ns.out else clusterkey.default_path(os.environ)
    if ns.key_command == "new":
        return key.new(out)
    return key.set_key(out, ns.text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if os.environ.get("DLLP2P_TARGET_CPU"):  # read here, once, for every compile of this process
            from .jit.compiler import default_target

            default_target()
        if ns.command == "run":
            return run.run(run_config(ns))
        if ns.command == "chat":
            return chat.chat(chat_config(ns))
        if ns.command == "bench":
            if ns.concurrency:
                key = client_key(ns.key_file, os.environ) if ns.workers else None
                return bench_concurrency.main(ns, cache_dir=cache_dir(os.environ), key=key)
            return bench.main(ns, cache_dir=cache_dir(os.environ))
        if ns.command == "daemon":
            settings = daemon_settings(ns)
            cfg = config_of_settings(settings, os.environ)
            level = settings["log_level"].upper()
            # journald stamps every line itself; anywhere else the log says when
            stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s "
            configure_logging(level, f"{stamp}dllp2p daemon: %(levelname)s %(message)s")
            check_model(cfg.model)
            return daemon.main(cfg)
        if ns.command == "status":
            return status_main(ns)
        if ns.command == "plan":
            return plan_main(ns)
        if ns.command == "key":
            return key_main(ns)
    except user_facing_errors() as e:  # may quote a peer (a daemon's Error): escaped
        print(f"dllp2p: error: {printable(str(e))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("\ndllp2p: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {ns.command!r}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
