"""The daemon's settings from three places, later ones winning: the config file, DLLP2P_* environment
variables, command-line flags. Pure functions over plain dicts; the CLI builds the frozen DaemonConfig.

File: /etc/dllp2p/config.toml (DLLP2P_CONFIG or --config name another), a [daemon] table:

    [daemon]
    host = "0.0.0.0"            # listening address
    port = 7340
    threads = 4                 # compute threads (default: one per core)
    state_dir = "/var/lib/dllp2p"
    cluster = "home"            # only daemons with the same name join
    discovery = true            # mDNS
    interfaces = ["192.168.1.20"]          # mDNS on these interfaces only (their IPv4 addresses)
    peers = ["192.168.1.21:7340"]          # static peers, where multicast is blocked
    log_level = "info"          # debug, info, warning, error
    model = "/srv/models/m.gguf"           # served when this daemon is root (default: the installed SmolLM2)
    exchange = "exact"          # as root: "exact" (bit-identical to one node) or "q8" (fewer bytes, 2 exchanges/layer)
    plan = "pow2"               # as root: "pow2" (2^n nodes, equal slices) or "weighted" (every node the KV heads allow)
    api = "127.0.0.1:7341"      # the OpenAI-compatible HTTP API (this default: loopback only, no authentication yet); "off"
    api_ctx = 2048              # the context (KV positions) of its requests: the longest prompt + reply

Environment: DLLP2P_HOST, DLLP2P_PORT, DLLP2P_THREADS, DLLP2P_STATE_DIR, DLLP2P_CLUSTER, DLLP2P_DISCOVERY
(1/0, true/false, yes/no, on/off), DLLP2P_INTERFACES and DLLP2P_PEERS (separated by commas or spaces),
DLLP2P_LOG_LEVEL, DLLP2P_MODEL, DLLP2P_EXCHANGE, DLLP2P_PLAN, DLLP2P_API, DLLP2P_API_CTX.

Error handling: a file that is not TOML, an unknown key, a value of the wrong type: ConfigError (a
ValueError) naming the file or variable and the key. A missing default file is no error.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

DEFAULT_PATH = Path("/etc/dllp2p/config.toml")
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
}
DEFAULTS: dict[str, Any] = {
    "host": "0.0.0.0",
    "port": 7340,
    "threads": None,  # one per core
    "state_dir": None,  # $XDG_STATE_HOME/dllp2p or ~/.local/state/dllp2p
    "cluster": "default",
    "discovery": True,
    "interfaces": [],
    "peers": [],
    "log_level": "info",
    "model": None,  # the installed SmolLM2, if any
    "exchange": "exact",
    "plan": "pow2",
    "api": "127.0.0.1:7341",  # "off": none
    "api_ctx": 2048,  # the context (KV positions) of the API's requests
}
EXCHANGES = ("exact", "q8")  # scheduler.EXCHANGES (not imported: this module stays dependency-free)
POLICIES = ("pow2", "weighted")  # scheduler.POLICIES


class ConfigError(ValueError):
    pass


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
        if key == "plan" and value not in POLICIES:
            raise ConfigError(f"{where}: plan {value!r} is not one of {', '.join(POLICIES)}")
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
