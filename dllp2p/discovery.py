"""Finding the other daemons: mDNS (zeroconf) on the LAN, and a static --peer list where multicast is blocked.
Both turn what they learn into membership events (election.Seen / election.Gone) on one trio channel.

    TXT record     encode_txt(member) -> the `_dllp2p._tcp.local.` service's properties; parse_txt the
                   reverse, strict: garbage, a foreign protocol version or another cluster is Rejected
                   (with the reason) and the caller logs one line and ignores the record. With a
                   cluster key the record carries mac = HMAC-SHA256(ClusterKey.mdns_key, its other
                   fields and port) (128 bits, hex); one without a valid MAC is Rejected before any of
                   its fields is believed, so nobody without the key joins or claims root by mDNS
    run_mdns       registers this daemon's service and browses for the others. Zeroconf calls back on
                   its own threads: a callback only hands (change, name) to trio (trio.from_thread with
                   the run's token, through a bounded channel: zeroconf's browser thread waits when it
                   is full); the trio task resolves the name in a worker thread, parses, and sends Seen
                   or Gone
    poll_static    one task per --peer HOST:PORT: asks it for Status every few seconds (the fetch
                   function is the daemon's); Seen while it answers, Gone after it stops

Error handling: a bad record or an unreachable static peer is logged and skipped; nothing a peer sends
stops discovery. Zeroconf's own failure to start (no usable interface) propagates to the daemon.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Awaitable, Callable, Mapping, Sequence

import trio

from .election import CLUSTER, NODE_ID, Gone, Member, Seen, incompatibility
from .wire.link import format_address

log = logging.getLogger("dllp2p.discovery")

SERVICE_TYPE = "_dllp2p._tcp.local."
TXT_MAX = 255  # bytes of one key=value entry (DNS-SD)
FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",  # x86 flags
            "asimd", "asimddp", "fphp", "i8mm", "sve")  # ARM features


class Rejected(ValueError):
    """A TXT record this node will not use; the message says why."""


# --- TXT records (pure) ---------------------------------------------------------------------------


def txt_mac(fields: Mapping[str, str], port: int, mac_key: bytes) -> str:
    """The MAC of a record: HMAC-SHA256 over its fields (but mac) sorted, and the port; 32 hex digits."""
    data = "\n".join(f"{k}={v}" for k, v in sorted(fields.items()) if k != "mac") + f"\nport={port}"
    return hmac.new(mac_key, data.encode(), hashlib.sha256).hexdigest()[:32]


def encode_txt(member: Member, port: int = 0, mac_key: bytes | None = None) -> dict[str, str]:
    """The service's TXT properties (with mac_key: and their MAC). The address is not in it: mDNS carries
    it in A/SRV records."""
    features = ",".join(member.features)
    while len("f=" + features) > TXT_MAX:  # never truncated mid-name
        features = features.rsplit(",", 1)[0]
    txt = {
        "id": member.node_id,
        "v": str(member.version),
        "cl": member.cluster,
        "t": f"{member.started_at:.3f}",
        "c": str(member.cores),
        "ram": str(member.ram),
        "f": features,
    }
    if mac_key is not None:
        txt["mac"] = txt_mac(txt, port, mac_key)
    return txt


def parse_txt(props: Mapping[bytes | str, bytes | str | None], address: str, *, version: int, cluster: str,
              mac_key: bytes | None = None) -> Member:
    """A TXT record (as zeroconf gives it) seen at address "host:port" -> the Member. Raises Rejected:
    with mac_key, no valid MAC first (nothing else in the record is believed without it); then a foreign
    protocol version (its other fields may mean something else), then any garbage, then another cluster."""
    fields: dict[str, str] = {}
    for k, v in props.items():
        try:
            key = k.decode("ascii") if isinstance(k, bytes) else k
            fields[key] = v.decode("utf-8") if isinstance(v, bytes) else (v or "")
        except UnicodeDecodeError:
            raise Rejected(f"record at {address}: a TXT entry is not text") from None
    if mac_key is not None:
        port = address.rpartition(":")[2]
        want = txt_mac(fields, int(port) if port.isdigit() else -1, mac_key)
        if not hmac.compare_digest(fields.get("mac", "").encode(), want.encode()):
            raise Rejected(f"record at {address}: no valid MAC under this cluster's key (another cluster, or "
                           "a daemon without the key)")
    v = fields.get("v", "")
    if not v.isdigit():
        raise Rejected(f"record at {address}: no protocol version (v={v!r})")
    if int(v) != version:
        raise Rejected(f"record at {address} (node {fields.get('id', '?')!r}): protocol version {v}, "
                       f"this node speaks {version}")
    try:
        member = Member(
            node_id=_field(fields, "id", NODE_ID.fullmatch),
            address=address,
            started_at=float(_field(fields, "t", _is_time)),
            version=int(v),
            cluster=_field(fields, "cl", CLUSTER.fullmatch),
            cores=int(_field(fields, "c", _is_count)),
            ram=int(_field(fields, "ram", str.isdigit)),
            features=tuple(f for f in fields.get("f", "").split(",") if f),
        )
    except ValueError as e:
        raise Rejected(f"record at {address}: {e}") from None
    why = incompatibility(member, version, cluster)
    if why is not None:
        raise Rejected(f"node {member.node_id} at {address}: {why}")
    return member


def _field(fields: dict[str, str], key: str, ok: Callable[[str], object]) -> str:
    value = fields.get(key)
    if value is None or not ok(value):
        raise ValueError(f"TXT field {key}={value!r} is missing or invalid")
    return value


def _is_time(s: str) -> bool:
    try:
        t = float(s)
    except ValueError:
        return False
    return math.isfinite(t) and t >= 0


def _is_count(s: str) -> bool:
    return s.isdigit() and int(s) >= 1


def cpu_features(cpuinfo: str) -> tuple[str, ...]:
    """The FEATURES present in /proc/cpuinfo's text ("flags" on x86, "Features" on ARM)."""
    have: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            have.update(value.split())
    return tuple(f for f in FEATURES if f in have)


def local_facts() -> tuple[int, int, tuple[str, ...]]:
    """(cores, RAM bytes, CPU features) of this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    try:
        with open("/proc/cpuinfo") as f:
            features = cpu_features(f.read())
    except OSError:
        features = ()
    return cores, ram, features


def instance_name(node_id: str) -> str:
    """The service instance name: the node id as one DNS label (no dots, at most 63 bytes)."""
    return f"{node_id.replace('.', '-')[:63]}.{SERVICE_TYPE}"


def advertised_addresses(host: str, interfaces: Sequence[str]) -> list[str]:
    """The IPv4 addresses to put in our A records: the chosen interfaces, else the listening address, else
    every non-loopback address of the machine (loopback only if there is nothing else)."""
    if interfaces:
        return list(interfaces)
    if host and host not in ("0.0.0.0", "::"):
        return [host]
    from zeroconf import get_all_addresses

    found = [a for a in get_all_addresses() if not ipaddress.ip_address(a).is_loopback]
    return found or ["127.0.0.1"]


# --- mDNS -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MdnsOptions:
    interfaces: tuple[str, ...] = ()  # IPv4 addresses of the interfaces to use; () = all
    resolve_timeout: float = 3.0  # seconds to resolve one announced service
    mac_key: bytes | None = field(default=None, repr=False)  # ClusterKey.mdns_key: records are MACed and checked
    queue: int = 64  # zeroconf events waiting for trio


async def run_mdns(me: Member, host: str, port: int, events: trio.MemorySendChannel, options: MdnsOptions = MdnsOptions(),
                   *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Advertise `me` (listening on port) and send Seen/Gone of the others to `events` until cancelled.
    task_status.started() once our service is registered and the browser runs."""
    from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

    token = trio.lowlevel.current_trio_token()
    raw_send, raw_recv = trio.open_memory_channel[tuple[ServiceStateChange, str]](options.queue)
    interfaces = list(options.interfaces) or InterfaceChoice.All
    zc = await trio.to_thread.run_sync(partial(Zeroconf, interfaces=interfaces, ip_version=IPVersion.V4Only))
    info = ServiceInfo(SERVICE_TYPE, instance_name(me.node_id), port=port, properties=encode_txt(me, port, options.mac_key),
                       parsed_addresses=advertised_addresses(host, options.interfaces))
    browser = None

    def on_change(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """(zeroconf's thread) Hand the change to trio; waits while the channel is full."""
        try:
            trio.from_thread.run(raw_send.send, (state_change, name), trio_token=token)
        except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError, trio.Cancelled):
            pass  # discovery is shutting down

    try:
        await trio.to_thread.run_sync(zc.register_service, info)
        browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
        log.info("advertising %s on %s (cluster %r)", info.name, ", ".join(info.parsed_addresses()), me.cluster)
        task_status.started()
        names: dict[str, str] = {}  # service name -> node id
        warned: set[str] = set()  # addresses whose records were ignored (logged once each)
        async with raw_recv:
            async for change, name in raw_recv:
                if change is ServiceStateChange.Removed:
                    node = names.pop(name, None)
                    if node is not None:
                        log.info("mDNS: node %s left", node)
                        await events.send(Gone(node, "mdns"))
                    continue
                found = await trio.to_thread.run_sync(zc.get_service_info, SERVICE_TYPE, name,
                                                      int(options.resolve_timeout * 1000))
                member = _member_of(found, me, options.mac_key, warned)
                # its own record is not news; one of its id from another start is (a copy of this node)
                if member is not None and (member.node_id, member.started_at) != (me.node_id, me.started_at):
                    if names.get(name) != member.node_id:
                        log.info("mDNS: node %s at %s (started %.3f)", member.node_id, member.address, member.started_at)
                    names[name] = member.node_id
                    await events.send(Seen(member, "mdns", time.time()))
    finally:
        raw_send.close()
        raw_recv.close()  # a callback still waiting in from_thread.run gets BrokenResourceError
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close, zc, browser, info)


def _member_of(info: object, me: Member, mac_key: bytes | None = None, warned: set[str] | None = None) -> Member | None:
    """A resolved ServiceInfo -> its Member, or None (logged, once per address in `warned`) if it cannot
    be used."""
    if info is None:
        return None
    addresses = info.parsed_addresses()  # type: ignore[attr-defined]
    if not addresses or not info.port:  # type: ignore[attr-defined]
        log.warning("mDNS: ignored %s: no address or port", info.name)  # type: ignore[attr-defined]
        return None
    address = format_address(addresses[0], info.port)  # type: ignore[attr-defined]
    try:
        return parse_txt(info.properties, address, version=me.version, cluster=me.cluster,  # type: ignore[attr-defined]
                         mac_key=mac_key)
    except Rejected as e:
        if warned is None or address not in warned:
            log.warning("mDNS: ignored %s", e)
        if warned is not None:
            warned.add(address)
        return None


def _close(zc: object, browser: object | None, info: object) -> None:
    """(thread) Goodbye packets, then stop zeroconf's threads."""
    try:
        if browser is not None:
            browser.cancel()  # type: ignore[attr-defined]
        zc.unregister_service(info)  # type: ignore[attr-defined]
    except Exception as e:  # shutting down: nothing left to do about it
        log.debug("mDNS shutdown: %s", e)
    finally:
        zc.close()  # type: ignore[attr-defined]


# --- static peers ---------------------------------------------------------------------------------

Fetch = Callable[[str], Awaitable[Member]]


@dataclass(frozen=True)
class StaticOptions:
    interval: float = 2.0  # seconds between two polls of one peer
    timeout: float = 2.0  # for one poll
    misses: int = 3  # polls failed in a row before the peer is Gone


async def poll_static(address: str, fetch: Fetch, events: trio.MemorySendChannel,
                      options: StaticOptions = StaticOptions(), *, source: str = "static",
                      until_gone: bool = False) -> None:
    """Ask the daemon at address who it is, forever: Seen each time it answers, Gone after `misses` failures.
    The events carry `source`; with until_gone the polling ends at the first Gone (the daemon's liveness
    probe of a member mDNS announced: a daemon that died without a goodbye is dropped after `misses`
    polls instead of when its mDNS record expires, which takes minutes).

    fetch(address) -> its Member, raising OSError / ValueError (ProtocolError) / TimeoutError on failure."""
    node: str | None = None
    misses = 0
    while True:
        member = None
        with trio.move_on_after(options.timeout):
            try:
                member = await fetch(address)
            except (OSError, ValueError) as e:  # LinkClosed is a ConnectionError, LinkTimeout a TimeoutError
                if misses == 0:
                    log.info("static peer %s: %s", address, e)
        if member is None:
            misses += 1
            if node is not None and misses >= options.misses:
                log.info("%s peer %s (node %s) stopped answering", source, address, node)
                await events.send(Gone(node, source, address))
                node = None
                if until_gone:
                    return
        else:
            if member.node_id != node:
                if node is not None:
                    await events.send(Gone(node, source, address))
                log.info("%s peer %s is node %s", source, address, member.node_id)
            node, misses = member.node_id, 0
            await events.send(Seen(member, source, time.time()))
        await trio.sleep(options.interval)
