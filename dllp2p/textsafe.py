"""Peer-supplied text made safe to print: what a peer sends (node ids, addresses, model names, its error
messages) reaches the daemon's log (the terminal, the journal) and the `dllp2p status` view. Control
characters there could forge log lines (a newline), drive the terminal (ANSI escapes: ESC, CSI) or
reorder what is shown (bidirectional overrides), so they are written as Python-style escapes instead.

    printable(text)     C0 controls (but the `keep` ones), DEL, C1 controls, bidi and line/paragraph
                        separators -> \\xNN / \\uNNNN; everything else (any script, emoji) as it is
    SafeFormatter       a logging.Formatter whose messages are printable() (a one-line record stays one
                        line) and whose tracebacks keep only their newlines

Rich markup ('[red]', '[link=...]') is not a control character: the status view puts peer text in
rich Text objects, which are never parsed as markup.
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def _escape(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: str, keep: str = "") -> str:
    """text with every unsafe character (see the module doc) but those in `keep` escaped."""
    if not keep:
        return _UNSAFE.sub(_escape, text)
    return _UNSAFE.sub(lambda m: m.group() if m.group() in keep else _escape(m), text)


class SafeFormatter(logging.Formatter):
    """The daemon's log format with printable() messages (peer text inside them included)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:  # noqa: ANN001 (logging's exc_info triple)
        return printable(super().formatException(ei), keep="\n")

    def formatStack(self, stack_info: str) -> str:
        return printable(super().formatStack(stack_info), keep="\n")
