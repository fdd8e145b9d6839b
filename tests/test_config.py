"""The daemon's settings (dllp2p/config.py, cli.daemon_config): file < DLLP2P_* environment < flags; every
bad value named; and the systemd unit checked by `systemd-analyze verify` (skipped without it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from dllp2p.cli import build_parser, daemon_config
from dllp2p.config import DEFAULTS, ConfigError, from_env, load_file, merge
from dllp2p.jit.cpus import cap_threads, read_cpu_facts

ROOT_DIR = Path(__file__).parent.parent
UNIT = ROOT_DIR / "systemd" / "dllp2p.service"

FILE = """
[daemon]
port = 7000
cluster = "home"
peers = ["10.0.0.2:7340", "10.0.0.3:7340"]
discovery = false
threads = 3
state_dir = "/var/lib/dllp2p"
"""


def config(tmp_path: Path, argv: list[str], env: dict[str, str], text: str = FILE):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return daemon_config(build_parser().parse_args(["daemon", *argv]), {"DLLP2P_CONFIG": str(path), **env})


def test_precedence_file_env_flags(tmp_path):
    c = config(tmp_path, [], {})
    threads = cap_threads(3, read_cpu_facts(measure_load=False))[0]  # 3, or the cores when fewer
    assert (c.port, c.cluster, c.peers, c.discovery, c.threads) == (7000, "home", ("10.0.0.2:7340", "10.0.0.3:7340"), False, threads)
    assert c.host == "0.0.0.0" and str(c.state_dir) == "/var/lib/dllp2p"  # a default where nothing says
    c = config(tmp_path, [], {"DLLP2P_PORT": "7100", "DLLP2P_PEERS": "10.0.0.9:1, 10.0.0.8:2", "DLLP2P_DISCOVERY": "yes"})
    assert (c.port, c.peers, c.discovery, c.cluster) == (7100, ("10.0.0.9:1", "10.0.0.8:2"), True, "home")
    c = config(tmp_path, ["--port", "7200", "--peer", "10.0.0.5:5", "--no-discovery", "--cluster", "lab",
                          "--interface", "10.0.0.1"], {"DLLP2P_PORT": "7100", "DLLP2P_DISCOVERY": "1"})
    assert (c.port, c.peers, c.discovery, c.cluster, c.interfaces) == (7200, ("10.0.0.5:5",), False, "lab", ("10.0.0.1",))
    # a flag given with its default value still wins over the file
    assert config(tmp_path, ["--port", "7340"], {}).port == 7340
    assert config(tmp_path, [], {}).exchange == "exact"
    assert config(tmp_path, [], {"DLLP2P_EXCHANGE": "q8"}).exchange == "q8"
    assert config(tmp_path, ["--exchange", "exact"], {"DLLP2P_EXCHANGE": "q8"}).exchange == "exact"
    assert config(tmp_path, [], {}).policy == "auto"  # the cost model (planner.py) is the default
    assert config(tmp_path, [], {"DLLP2P_PLAN": "auto"}, '[daemon]\nplan = "pow2"').policy == "auto"
    assert config(tmp_path, [], {}, '[daemon]\nplan = "weighted"').policy == "weighted"
    assert config(tmp_path, [], {"DLLP2P_PLAN": "weighted"}).policy == "weighted"
    assert config(tmp_path, ["--plan", "pow2"], {"DLLP2P_PLAN": "weighted"}).policy == "pow2"
    assert config(tmp_path, [], {}).api == "127.0.0.1:7341"  # the HTTP API: on, on loopback
    assert config(tmp_path, [], {"DLLP2P_API": "off"}).api is None
    assert config(tmp_path, ["--api", "0.0.0.0:8080"], {"DLLP2P_API": "off"}).api == "0.0.0.0:8080"
    assert config(tmp_path, [], {}, '[daemon]\napi = "off"').api is None
    with pytest.raises(ValueError, match="HOST:PORT"):
        config(tmp_path, ["--api", "8080"], {})


def test_missing_default_file_is_fine_a_named_one_is_not(tmp_path):
    assert load_file(tmp_path / "nope.toml") == {}
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "nope.toml", required=True)
    ns = build_parser().parse_args(["daemon", "--config", str(tmp_path / "nope.toml")])
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        daemon_config(ns, {})


@pytest.mark.parametrize("text, match", [
    ("[daemon\nport = 1", "not valid TOML"),
    ("port = 1", "unknown section or key 'port'"),
    ("[daemon]\nprot = 1", "unknown setting 'prot'"),
    ("[daemon]\nport = '7340'", "port must be a int"),
    ("[daemon]\ndiscovery = 1", "discovery must be a bool"),
    ("[daemon]\npeers = '10.0.0.2:7340'", "peers must be a list of strings"),
    ("[daemon]\npeers = [1]", "peers must be a list of strings"),
    ("[daemon]\nlog_level = 'loud'", "log_level 'loud'"),
    ("[daemon]\ncluster = 'my cluster'", "cluster name 'my cluster'"),
    ("[daemon]\npeers = ['nohost']", "is not HOST:PORT"),
    ("[daemon]\nport = 70000", "--port must be in"),
])
def test_bad_files(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, [], {}, text)


@pytest.mark.parametrize("env, match", [
    ({"DLLP2P_PORT": "x"}, "DLLP2P_PORT='x' is not a whole number"),
    ({"DLLP2P_DISCOVERY": "maybe"}, "DLLP2P_DISCOVERY='maybe'"),
    ({"DLLP2P_LOG_LEVEL": "loud"}, "log_level 'loud'"),
    ({"DLLP2P_EXCHANGE": "f16"}, "exchange 'f16' is not one of exact, q8"),
    ({"DLLP2P_PLAN": "all"}, "plan 'all' is not one of auto, pow2, weighted"),
])
def test_bad_environment(env, match):
    with pytest.raises(ConfigError, match=match):
        from_env(env)


def test_empty_environment_values_are_unset_and_merge_skips_none():
    assert from_env({"DLLP2P_PORT": "", "DLLP2P_CLUSTER": " "}) == {}
    assert merge({"port": 1}, {"port": None, "cluster": "x"}) == {**DEFAULTS, "port": 1, "cluster": "x"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` checks that ExecStart's binary exists: where the unit's /opt/dllp2p install is
    absent (CI, this checkout), the same unit is verified with ExecStart pointing at this checkout's dllp2p."""
    text = UNIT.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    binary = exec_start.removeprefix("ExecStart=").split()[0]
    assert exec_start.endswith(" daemon") and binary == "/opt/dllp2p/bin/dllp2p"
    unit = UNIT
    if not Path(binary).exists():
        here = shutil.which("dllp2p") or str(ROOT_DIR / ".venv" / "bin" / "dllp2p")
        if not Path(here).exists():
            pytest.skip("no installed dllp2p to point ExecStart at")
        unit = tmp_path / "dllp2p.service"
        unit.write_text(text.replace(binary, here))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    for needed in ("Type=simple", "Restart=on-failure", "StateDirectory=dllp2p", "WantedBy=multi-user.target",
                   "LimitNOFILE=65536", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                   "PrivateDevices=yes", "CapabilityBoundingSet=\n", "SystemCallFilter=@system-service"):
        assert needed in text
    assert "\nMemoryDenyWriteExecute=" not in text  # llvmlite's JIT needs executable mappings
