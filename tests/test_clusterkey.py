"""The cluster key: its text form, its files (mode 0600, refused otherwise), `dllp2p key new | show | set`,
and the settings that name the file (--key-file > DLLP2P_KEY_FILE > config key_file > default path)."""

from __future__ import annotations

import io
import os
import stat

import pytest

from dllp2p import cli, clusterkey
from dllp2p.clusterkey import ClusterKey, KeyFileError


def test_text_round_trip_and_forgiving_paste():
    k = ClusterKey.generate()
    t = k.text()
    assert t.startswith("dllp2p-key-") and len(t) == len("dllp2p-key-") + 56 + 7
    assert clusterkey.parse(t) == k
    assert clusterkey.parse("  " + t.upper().replace("-", " - ") + "\n") == k
    assert k.secret.hex() not in repr(k)


def test_typo_caught():
    t = ClusterKey(bytes(32)).text()
    pos = len("dllp2p-key-") + 3
    typo = t[:pos] + ("b" if t[pos] != "b" else "c") + t[pos + 1:]
    with pytest.raises(KeyFileError, match="checksum"):
        clusterkey.parse(typo)
    with pytest.raises(KeyFileError, match="letters"):
        clusterkey.parse(t[:-3])
    with pytest.raises(KeyFileError, match="not a dllp2p cluster key"):
        clusterkey.parse("hunter2")


def test_derived_values_differ_per_key_and_purpose():
    a, b = ClusterKey(bytes(32)), ClusterKey(bytes([1]) * 32)
    assert a.tag != b.tag and len(a.tag) == 8
    assert len({a.psk, a.mdns_key, a.derive("http api bearer"), a.secret}) == 4
    assert a.check_api_token(a.api_token) and not a.check_api_token(b.api_token)


def test_files(tmp_path):
    k = ClusterKey.generate()
    path = tmp_path / "d" / "cluster.key"
    clusterkey.save(k, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert clusterkey.load(path) == k
    with pytest.raises(KeyFileError, match="already exists"):
        clusterkey.save(ClusterKey.generate(), path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=r"can be read by others \(mode 0644\): chmod 600"):
        clusterkey.load(path)
    with pytest.raises(KeyFileError, match="does not exist .*dllp2p key new"):
        clusterkey.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    for content in (b"\x00\xff" * 16, b"dllp2p-key-abc\n", os.urandom(32)):
        bad.write_bytes(content)
        os.chmod(bad, 0o600)
        with pytest.raises(KeyFileError, match=f"key file {bad}: "):
            clusterkey.load(bad)


def test_configured_path(tmp_path):
    env = {"XDG_CONFIG_HOME": str(tmp_path)}
    assert clusterkey.configured_path(None, env, euid=1000) is None  # no default file: no key
    assert clusterkey.configured_path("off", env) is None
    clusterkey.save(ClusterKey.generate(), tmp_path / "dllp2p" / "cluster.key")
    assert clusterkey.configured_path(None, env, euid=1000) == tmp_path / "dllp2p" / "cluster.key"
    assert clusterkey.configured_path("/x/k", env).as_posix() == "/x/k"
    assert clusterkey.default_path(env, euid=0).as_posix() == "/etc/dllp2p/cluster.key"


def test_key_commands(tmp_path, capsys, monkeypatch):
    out = tmp_path / "k"
    assert cli.main(["key", "new", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    capsys.readouterr()
    assert cli.main(["key", "show", "--key-file", str(out)]) == 0
    text = capsys.readouterr().out.strip()
    assert clusterkey.parse(text) == clusterkey.load(out)
    # the next device: paste it on stdin
    out2 = tmp_path / "other" / "k"
    monkeypatch.setattr("sys.stdin", io.StringIO(text + "\n"))
    assert cli.main(["key", "set", "--out", str(out2)]) == 0
    assert clusterkey.load(out2) == clusterkey.load(out)
    capsys.readouterr()
    assert cli.main(["key", "show", "--api-token", "--key-file", str(out)]) == 0
    assert capsys.readouterr().out.strip() == clusterkey.load(out).api_token
    # a second `key new` over it is refused: one line, exit 1
    assert cli.main(["key", "new", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err


@pytest.mark.parametrize("problem", ["mode", "missing", "garbage", "length"])
def test_bad_key_file_one_line(tmp_path, capsys, problem):
    path = tmp_path / "cluster.key"
    if problem != "missing":
        content = {"mode": ClusterKey.generate().text(), "garbage": "\x00garbage", "length": "dllp2p-key-abcdefg"}
        path.write_text(content[problem])
        os.chmod(path, 0o640 if problem == "mode" else 0o600)
    for argv in (["status", "--json", "--key-file", str(path)],
                 ["run", "--prompt", "hi", "--key-file", str(path)],
                 ["daemon", "--key-file", str(path), "--port", "0", "--state-dir", str(tmp_path)]):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dllp2p: error: key file"), err


def test_key_file_setting_order(tmp_path, monkeypatch):
    conf = tmp_path / "c.toml"
    conf.write_text('[daemon]\nkey_file = "/from/config"\n')
    env = {"DLLP2P_CONFIG": str(conf)}
    assert cli.key_setting(None, env) == "/from/config"
    assert cli.key_setting(None, {**env, "DLLP2P_KEY_FILE": "/from/env"}) == "/from/env"
    assert cli.key_setting("/from/flag", {**env, "DLLP2P_KEY_FILE": "/from/env"}) == "/from/flag"
