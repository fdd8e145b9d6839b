"""`dllp2p key new | show | set`: make the cluster key on the first device, show it, paste it on the next.

    key new [--out PATH]        a random 256-bit key into PATH (default: clusterkey.default_path), mode 0600
    key show [--key-file PATH]  its text form, to paste on the next device (--api-token: the HTTP API's
                                bearer key instead)
    key set [--out PATH] [KEY]  the pasted text form (argument, or one line of stdin) into PATH, mode 0600

Error handling: KeyFileError (exists, unreadable, typo) propagates; the CLI prints it as one line.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from ..clusterkey import ClusterKey, KeyFileError, load, parse, save


def new(out: Path) -> int:
    key = ClusterKey.generate()
    save(key, out)
    print(f"wrote a new cluster key to {out} (mode 0600)")
    print("on each other device: dllp2p key set, then paste what `dllp2p key show` prints here")
    return 0


def show(path: Path, api_token: bool = False) -> int:
    key = load(path)
    print(key.api_token if api_token else key.text())
    return 0


def set_key(out: Path, text: str | None, stdin: TextIO | None = None) -> int:
    if text is None:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            print("paste the key (dllp2p key show on a device of the cluster), then Enter:", file=sys.stderr)
        text = stdin.readline()
    if not text.strip():
        raise KeyFileError("no key given")
    key = parse(text)
    save(key, out)
    print(f"wrote the cluster key (tag {key.tag}) to {out} (mode 0600)")
    return 0
