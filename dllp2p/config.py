"""The daemon's settings from three places, later ones winning: the config file, DLLP2P_* environment
variables, command-line flags. Pure functions over plain dicts; the CLI builds the frozen DaemonConfig.

File: /etc/dllp2p/config.toml (DLLP2P_CONFIG or --config name another), a [daemon] table:

    [daemon]
    host = "0.0.0.0"            # listening address
    port = 7340
    threads = 4                 # compute threads (default: the free cores; more than the cores: capped)
    state_dir = "/var/lib/dllp2p"
    cluster = "home"            # only daemons with the same name join
    discovery = true            # mDNS
    interfaces = ["192.168.1.20"]          # mDNS on these interfaces only (their IPv4 addresses)
    peers = ["192.168.1.21:7340"]          # static peers, where multicast is blocked
    log_level = "info"          # debug, info, warning, error
    model = "/srv/models/m.gguf"           # served when this daemon is root (default: the installed SmolLM2)
    exchange = "exact"          # as root: "exact" (bit-identical to one node) or "q8" (fewer bytes, 2 exchanges/layer)
    plan = "auto"               # as root: "auto" (the cost model picks the nodes: measured compute, links; the
                                # default), "pow2" (2^n nodes, equal slices), "weighted" (every node the heads allow)
                                # tensor parallel; "pipeline" (a layer range per node) or "hybrid" (stages of 2-node groups)
    api = "127.0.0.1:7341"      # the OpenAI-compatible HTTP API (loopback: no credential; beyond: bearer key); "off"
    api_ctx = 2048              # the context (KV positions) of its requests: the longest prompt + reply
    api_hosts = ["pi.home"]     # names the API answers to besides IP literals, localhost and its listen host
    key_file = "/etc/dllp2p/cluster.key"   # the cluster key (dllp2p key new); "off": none, this machine only
    cache_mb = 4096             # size budget of each cache: the weight slices (state dir) and the packed
                                # slices (cache dir); the least recently used files go beyond it
    drain_s = 30                # SIGTERM (systemctl stop): the seconds requests in flight on the root may take
                                # to finish; then the daemons that forwarded them resume them on the next root
    max_batch = 8               # as root alone: requests generated together (continuous batching)
    queue = 16                  # requests waiting beyond them (FIFO); more are refused (HTTP 429)
    kv_budget_mb = 0            # KV cache of all of them together, MiB; 0: max_batch full contexts
    cluster_batch = false       # as root with workers: batch too (default: one request at a time)
    pipeline_groups = 0         # with cluster_batch over a pipeline plan: groups of requests in flight at once
                                # (0: one per stage, so every stage works; 1: one batch, as a tensor-parallel plan)
    drop_busy = true            # as root: plan without a worker while its CPU wait costs more than its share saves
    plan_figures = "rtt_ms=0.3"  # as root with plan auto: figures stated for every node and link in place of
                                # the measured ones (gbps, disk_gbps, ram_mb, rtt_ms, mbps; tests, odd LANs)
    mem_limit = "auto"          # memory its engines may use: "auto" (the cgroup's limit, else the RAM available,
                                # less 192 MiB), "off", or a size ("1500M", "1.5G"); a share beyond it streams from disk

Environment: DLLP2P_HOST, DLLP2P_PORT, DLLP2P_THREADS, DLLP2P_STATE_DIR, DLLP2P_CLUSTER, DLLP2P_DISCOVERY
(1/0, true/false, yes/no, on/off), DLLP2P_INTERFACES and DLLP2P_PEERS (separated by commas or spaces),
DLLP2P_LOG_LEVEL, DLLP2P_MODEL, DLLP2P_EXCHANGE, DLLP2P_PLAN, DLLP2P_API, DLLP2P_API_CTX, DLLP2P_API_HOSTS,
DLLP2P_KEY_FILE, DLLP2P_CACHE_MB, DLLP2P_DRAIN_S, DLLP2P_MAX_BATCH, DLLP2P_QUEUE, DLLP2P_KV_BUDGET_MB,
DLLP2P_CLUSTER_BATCH, DLLP2P_PIPELINE_GROUPS, DLLP2P_DROP_BUSY, DLLP2P_PLAN_FIGURES, DLLP2P_MEM_LIMIT.

Built once, at the edge: the CLI calls these functions with os.environ and hands the frozen results
down (DaemonConfig, Timeouts, the cache and state directories); nothing below it reads the environment.
The ports' defaults live here and only here (DEFAULT_PORT, DEFAULT_API_PORT).

Error handling: a file that is not TOML, an unknown key, a value of the wrong type: ConfigError (a
ValueError) naming the file or variable and the key. A missing default file is no error.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .memlimit import parse_mem_limit

DEFAULT_PATH = Path("/etc/dllp2p/config.toml")
DEFAULT_PORT = 7340  # a daemon's control port (TCP): sessions, mesh, Status, Generate
DEFAULT_API_PORT = 7341  # its OpenAI-compatible HTTP API, on loopback by default
DEFAULT_CLUSTER = "default"
LOCAL_DAEMON = f"127.0.0.1:{DEFAULT_PORT}"  # where `run`, `chat` and `status` look for a daemon by default
LOG_LEVELS = ("debug", "info", "warning", "error")

# key -> type of its value
DAEMON_KEYS: dict[str, type] = {
    "host": str,
    "port": int,
    "threads": int,
    "state_dir": str,
    "cluster": str,
    "discovery": bool,
    "interfaces": list,
    "peers": list,
    "log_level": str,
    "model": str,
    "exchange": str,
    "plan": str,
    "api": str,
    "api_ctx": int,
    "api_hosts": list,
    "key_file": str,
    "cache_mb": int,
    "drain_s": int,
    "max_batch": int,
    "queue": int,
    "kv_budget_mb": int,
    "cluster_batch": bool,
    "pipeline_groups": int,
    "drop_busy": bool,
    "plan_figures": str,
    "mem_limit": str,
}
DEFAULTS: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": DEFAULT_PORT,
    "threads": None,  # one per core
    "state_dir": None,  # $XDG_STATE_HOME/dllp2p or ~/.local/state/dllp2p
    "cluster": DEFAULT_CLUSTER,
    "discovery": True,
    "interfaces": [],
    "peers": [],
    "log_level": "info",
    "model": None,  # the installed SmolLM2, if any
    "exchange": "exact",
    "plan": "auto",
    "api": f"127.0.0.1:{DEFAULT_API_PORT}",  # "off": none
    "api_ctx": 2048,  # the context (KV positions) of the API's requests
    "api_hosts": [],  # Host names the API answers to besides IP literals, localhost and its listen host
    "key_file": None,  # the cluster key (clusterkey.py); None: the default path if it exists; "off": none
    "cache_mb": 4096,  # each cache's size budget in MiB (slices in the state dir, packed slices in the cache dir)
    "drain_s": 30,  # SIGTERM: seconds the requests served as root may take before they are handed over
    "max_batch": 8,  # as root alone: requests generated together
    "queue": 16,  # requests waiting beyond them; more get 429
    "kv_budget_mb": 0,  # their KV cache together; 0: max_batch full contexts
    "cluster_batch": False,  # as root with workers: batch too
    "pipeline_groups": 0,  # with cluster_batch over a pipeline plan: groups in flight (0: one per stage)
    "drop_busy": True,  # as root: leave out a worker whose CPU another program keeps busy (session/busy.py)
    "plan_figures": "",  # "auto" plans: figures stated in place of measured ones (parse_plan_figures); "": none
    "mem_limit": "auto",  # its engines' memory budget (memlimit.py): "auto" (cgroup limit / available RAM), "off", "1.5G"
}
EXCHANGES = ("exact", "q8")  # scheduler.EXCHANGES (not imported: this module stays dependency-free)
POLICIES = ("pow2", "weighted", "pipeline", "hybrid")  # scheduler.POLICIES + pipeline.PIPELINE_POLICIES
PLANS = ("auto", *POLICIES)  # "auto": planner.py picks the plan (tensor parallel over k nodes, pipeline, hybrid)
PLAN_FIGURES = ("gbps", "disk_gbps", "ram_mb", "rtt_ms", "mbps")  # session/autoplan.Assume's, ram in MiB


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Every wait of the daemon and of the root has one."""

    hello: float = 10.0  # the first frame of a connection; connecting
    idle: float = 600.0  # a control connection with nothing to do: between sessions, between Steps
    transfer: float = 60.0  # between frames of a weight push; the answers around it
    mesh: float = 30.0  # connecting the mesh
    build: float = 600.0  # every node building its engine (JIT compile) until Ready
    socket: float = 30.0  # SO_RCVTIMEO / SO_SNDTIMEO of mesh sockets: a silent peer fails a step after this
    slot: float = 10.0  # a new session waiting for the previous one to wind down
    send: float = 30.0  # a send waiting for the peer to read (a client that stops reading is dropped)
    progress: float = 20.0  # a root silent this long mid-stream counts as lost to the daemon forwarding to it
    handover: float = 10.0  # a daemon whose root was lost waits this long at most for the election to name another


@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds a client (`run`, `chat`) waits for a daemon."""

    connect: float = 1.0  # to find out whether anything listens
    probe: float = 5.0  # for a Status answer proving it is a dllp2p daemon
    answer: float = 900.0  # of silence from a daemon that took the prompt (set-up, weight push)


def cache_dir(environ: Mapping[str, str]) -> Path:
    """Compiled kernels and packed weights: $DLLP2P_CACHE_DIR, else $XDG_CACHE_HOME/dllp2p or ~/.cache/dllp2p."""
    if environ.get("DLLP2P_CACHE_DIR"):
        return Path(environ["DLLP2P_CACHE_DIR"]).expanduser()
    return (Path(environ.get("XDG_CACHE_HOME") or "~/.cache") / "dllp2p").expanduser()


def state_dir(environ: Mapping[str, str], setting: str | None = None) -> Path:
    """A daemon's node id and slice cache: the setting, else $XDG_STATE_HOME/dllp2p or ~/.local/state/dllp2p."""
    if setting:
        return Path(setting).expanduser()
    return (Path(environ.get("XDG_STATE_HOME") or "~/.local/state") / "dllp2p").expanduser()


def config_path(environ: Mapping[str, str], flag: str | None) -> tuple[Path, bool]:
    """-> (the file to read, whether it must exist: named by --config or DLLP2P_CONFIG)."""
    if flag:
        return Path(flag), True
    if environ.get("DLLP2P_CONFIG"):
        return Path(environ["DLLP2P_CONFIG"]), True
    return DEFAULT_PATH, False


def load_file(path: Path, required: bool = False) -> dict[str, Any]:
    """The [daemon] settings of a config file, checked."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        if required:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    unknown = sorted(set(data) - {"daemon"})
    if unknown:
        raise ConfigError(f"config file {path}: unknown section or key {unknown[0]!r} (settings go in [daemon])")
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise ConfigError(f"config file {path}: daemon must be a table ([daemon])")
    return check(daemon, f"config file {path}")


def check(settings: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = {}
    for key, value in settings.items():
        tp = DAEMON_KEYS.get(key)
        if tp is None:
            raise ConfigError(f"{where}: unknown setting {key!r} (known: {', '.join(DAEMON_KEYS)})")
        if type(value) is not tp or (tp is list and not all(isinstance(v, str) for v in value)):
            want = "a list of strings" if tp is list else f"a {tp.__name__}"
            raise ConfigError(f"{where}: {key} must be {want}, got {value!r}")
        if key == "log_level" and value.lower() not in LOG_LEVELS:
            raise ConfigError(f"{where}: log_level {value!r} is not one of {', '.join(LOG_LEVELS)}")
        if key == "exchange" and value not in EXCHANGES:
            raise ConfigError(f"{where}: exchange {value!r} is not one of {', '.join(EXCHANGES)}")
        if key == "plan_figures":
            parse_plan_figures(value, where)
        if key == "mem_limit" and value.strip().lower() != "auto":
            try:
                parse_mem_limit(value)
            except ValueError as e:
                raise ConfigError(f"{where}: {e}") from None
        if key == "plan" and value not in PLANS:
            raise ConfigError(f"{where}: plan {value!r} is not one of {', '.join(PLANS)}")
        out[key] = value
    return out


def parse_plan_figures(text: str, where: str = "plan_figures") -> dict[str, float]:
    """"rtt_ms=20, ram_mb=1.5" -> {"rtt_ms": 20.0, "ram_mb": 1.5}: PLAN_FIGURES keys, finite numbers > 0,
    separated by commas or spaces ("" -> {}). Raises ConfigError naming `where`."""
    out: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        key, eq, raw = item.partition("=")
        if key not in PLAN_FIGURES or not eq:
            raise ConfigError(f"{where}: {item!r} is not NAME=NUMBER with NAME one of {', '.join(PLAN_FIGURES)}")
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not 0 < value < float("inf"):
            raise ConfigError(f"{where}: {key}={raw!r} is not a number > 0")
        out[key] = value
    return out


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The DLLP2P_* variables that are set (and not empty), as settings."""
    out: dict[str, Any] = {}
    for key, tp in DAEMON_KEYS.items():
        name = f"DLLP2P_{key.upper()}"
        raw = environ.get(name, "").strip()
        if not raw:
            continue
        if tp is int:
            if not raw.isdigit():
                raise ConfigError(f"{name}={raw!r} is not a whole number")
            out[key] = int(raw)
        elif tp is bool:
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ConfigError(f"{name}={raw!r} is not 1/0, true/false, yes/no or on/off")
            out[key] = raw.lower() in ("1", "true", "yes", "on")
        elif tp is list:
            out[key] = raw.replace(",", " ").split()
        else:
            out[key] = raw
    return check(out, "environment")


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """DEFAULTS, then each layer in turn; a None value in a layer (a flag not given) changes nothing."""
    out = dict(DEFAULTS)
    for layer in layers:
        out.update({k: v for k, v in layer.items() if v is not None})
    return out


def daemon_settings(flags: Mapping[str, Any], config_flag: str | None = None,
                    environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """File < environment < flags (flags given as None are not given)."""
    environ = os.environ if environ is None else environ
    path, required = config_path(environ, config_flag)
    return merge(load_file(path, required), from_env(environ), flags)
