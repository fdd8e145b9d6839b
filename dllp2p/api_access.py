"""Who may use the HTTP API (api.py): the Host a request names, the Origin a browser sends, the bearer key.
Pure functions of header values.

Host (DNS rebinding): a page on evil.example whose name is made to resolve to 127.0.0.1 reaches a
loopback API with the browser's own cookies-free requests, same-origin to the page, so the Origin check
does not see it; only the Host header still says evil.example. A request is served when its Host is an IP
literal (v4, or v6 in brackets), `localhost` or a name under `.localhost`, one of `allowed` (the listen
host when it is a name, the names configured with `api_hosts`, and beyond loopback this machine's host
name and its `.local` mDNS name), or absent (HTTP/1.0: not a browser). Anything else: 421 in OpenAI's error
shape, before any other check.

CORS: browsers may call the API from pages served on loopback origins only (http(s)://localhost,
127.0.0.0/8, [::1], any port); a request that carries any other Origin gets 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from typing import Iterable, Mapping

_LOOPBACK_ORIGIN = re.compile(r"https?://(localhost|127(?:\.\d{1,3}){3}|\[::1\])(?::\d{1,5})?", re.ASCII)
_TOKEN_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*", re.ASCII)
_HOST = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]{1,253}))(?::\d{1,5})?", re.ASCII)


# --- Host -----------------------------------------------------------------------------------------------


def host_allowed(host: str | None, allowed: frozenset[str] = frozenset()) -> bool:
    """Whether a request naming `host` (its Host header, port and all; None: none) is for this API."""
    if host is None:
        return True
    m = _HOST.fullmatch(host.strip())
    if m is None:
        return False
    if m["v6"] is not None:
        return _is_ip(m["v6"])
    name = m["name"].lower().rstrip(".")
    return _is_ip(name) or name == "localhost" or name.endswith(".localhost") or name in allowed


def local_names(listen_host: str, configured: Iterable[str] = ()) -> frozenset[str]:
    """The host names besides IP literals and localhost that requests may name: the configured ones, the
    listen host if it is a name, and beyond loopback this machine's name and its mDNS `.local` name."""
    names = {n.lower().rstrip(".") for n in configured if n}
    if listen_host and not _is_ip(listen_host):
        names.add(listen_host.lower().rstrip("."))
    if not is_loopback(listen_host):
        host = socket.gethostname().lower().rstrip(".")
        names |= {host, host.split(".")[0] + ".local"}
    return frozenset(names)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- CORS -----------------------------------------------------------------------------------------------


def origin_allowed(origin: str | None) -> bool:
    """No Origin (not a browser, or same-origin GET), or a loopback one."""
    return origin is None or bool(_LOOPBACK_ORIGIN.fullmatch(origin))


def cors_headers(origin: str | None) -> list[tuple[str, str]]:
    """What every answer to a request from `origin` carries (nothing for a foreign or no origin)."""
    if origin is None or not origin_allowed(origin):
        return []
    return [("access-control-allow-origin", origin), ("vary", "Origin")]


def preflight_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """What a CORS preflight (OPTIONS) answers besides cors_headers: any method and header we take."""
    asked = headers.get("access-control-request-headers", "").strip()
    allow = asked if asked and _TOKEN_LIST.fullmatch(asked) else "authorization, content-type"
    return [("access-control-allow-methods", "GET, POST, OPTIONS"),
            ("access-control-allow-headers", allow), ("access-control-max-age", "600"),
            ("allow", "GET, POST, OPTIONS")]


# --- bearer key -----------------------------------------------------------------------------------------


def bearer_ok(header: str, token: str) -> bool:
    scheme, _, presented = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())
