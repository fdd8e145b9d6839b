"""Ports for the daemons the tests start on 127.0.0.1.

`free_port()` picks one below the kernel's ephemeral range (net.ipv4.ip_local_port_range, 32768-60999 by default)
and checks that nothing listens there. A port the kernel hands out for `bind(0)` comes from that range, as do
the source ports of every outgoing connection: between the check and the daemon's own bind, a connection of
another daemon or another test could take it ("Address already in use": seen once in CI, a daemon of a
3-daemon test starting after the first two had dialed out). Below the range only another test picking the same
number at the same moment could.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 20000  # well above the well-known and registered ports a machine's services use (7340: dllp2p's)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on, outside the ephemeral range where it can be."""
    high = _ephemeral_low()
    for _ in range(100):
        port = random.randrange(LOWEST, high) if high > LOWEST + 100 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError(f"no free port in {LOWEST}..{high - 1} after 100 tries")
