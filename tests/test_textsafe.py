"""Peer-supplied text is printed escaped: the daemon's log (cli.configure_logging, textsafe.SafeFormatter)
and the `dllp2p status` view never pass control characters, ANSI escapes or bidi overrides through raw,
and rich markup in a peer's text is shown as typed, never interpreted."""

from __future__ import annotations

import io
import logging

import pytest

from dllp2p import wire as P
from dllp2p.cli import configure_logging
from dllp2p.commands import status
from dllp2p.election import Member
from dllp2p.textsafe import SafeFormatter, printable

HOSTILE = "pi\x1b[2J\x1b]0;owned\x07\nFAKE dllp2p daemon: INFO root is now evil\r\u202eexe.txt\x9b31m\x00"


@pytest.mark.parametrize("text, want", [
    ("plain node-1 10.0.0.1:7340", "plain node-1 10.0.0.1:7340"),
    ("ünïcödé 日本 🙂 [red]markup[/red]", "ünïcödé 日本 🙂 [red]markup[/red]"),  # printable text stays
    ("a\nb\rc\td", "a\\x0ab\\x0dc\\x09d"),
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("\x00\x7f\x85\x9b", "\\x00\\x7f\\x85\\x9b"),
    ("\u202eabc\u2066\u2069\u200f\u2028\ufeff", "\\u202eabc\\u2066\\u2069\\u200f\\u2028\\ufeff"),
])
def test_printable(text, want):
    assert printable(text) == want


def test_printable_keeps_what_it_is_told():
    assert printable("a\nb\x1b", keep="\n") == "a\nb\\x1b"


def _raw_controls(s: str, allow: str = "") -> list[str]:
    return [c for c in s if (ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or 0x202a <= ord(c) <= 0x202e) and c not in allow]


def test_the_daemon_log_escapes_peer_text():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(SafeFormatter("dllp2p daemon: %(levelname)s %(message)s"))
    log = logging.getLogger("dllp2p.test_textsafe")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        log.warning("%s: node %s at %s does not join", "10.0.0.9:7340", HOSTILE, "[bold]x")
        try:
            raise ValueError(HOSTILE)
        except ValueError:
            log.exception("peer %s failed", HOSTILE)
    finally:
        log.removeHandler(handler)
    out = stream.getvalue()
    first, rest = out.split("\n", 1)
    assert first.startswith("dllp2p daemon: WARNING 10.0.0.9:7340: node pi\\x1b[2J") and "[bold]x" in first
    assert "\\x0aFAKE dllp2p daemon" in first and "\\u202e" in first  # one line: no forged record
    assert not _raw_controls(out, allow="\n")
    assert "Traceback" in rest and "ValueError: pi\\x1b[2J" in rest  # the traceback keeps its lines


def test_the_daemon_command_installs_the_safe_formatter(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in a fresh `dllp2p daemon` process
    stream = io.StringIO()
    handler = configure_logging("INFO", "%(message)s", stream)
    try:
        logging.getLogger("dllp2p.daemon").info("root is now %s", HOSTILE)
        assert isinstance(handler.formatter, SafeFormatter)
        assert not _raw_controls(stream.getvalue(), allow="\n") and stream.getvalue().count("\n") == 1
    finally:
        root.removeHandler(handler)


def test_the_status_view_escapes_peer_text_and_never_reads_its_markup():
    from rich.console import Console

    peer = Member("pi-2", "[red]10.0.0.2[/red]:7340\x1b[2J", 200.0, P.PROTOCOL_VERSION, "home")
    me = Member("pi-1", "10.0.0.1:7340", 100.0, P.PROTOCOL_VERSION, "home")
    reply = P.StatusReply(3, "pi-1[blink]\x1b]0;t\x07", (P.NodeStatus(me, "root", ("self",), 1.0),
                                                         P.NodeStatus(peer, "worker", ("mdns",), 1.0)),
                          None, None, 0, progress=(P.ProgressStatus("push", "[link=http://x]w\x1b[0m", 1, 4),))
    console = Console(file=io.StringIO(), width=400, color_system=None, force_terminal=False)
    console.print(status.table(status.Survey("10.0.0.1:7340", reply)))
    out = console.file.getvalue()
    assert "[red]10.0.0.2[/red]:7340\\x1b[2J" in out  # as typed, escapes spelled out
    assert "[link=http://x]w\\x1b[0m" in out and "pi-1[blink]\\x1b]0;t\\x07" in out
    assert not _raw_controls(out, allow="\n")
