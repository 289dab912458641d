"""Which addresses the service may connect to when a request names a URL (``image_url`` on
``POST /v1/detect``; the sources of streams).

A URL in a request is a request to connect somewhere from inside the deployment. The rules:

- schemes: those the caller allows (``http``/``https`` for images); never ``file`` or any other;
- every address the host name resolves to is checked, and the connection goes to a checked
  address (never a second lookup that could answer otherwise: DNS rebinding);
- always refused: link-local addresses (169.254.0.0/16, where clouds answer metadata and
  credentials, and fe80::/10), the AWS IPv6 metadata address fd00:ec2::254, unspecified,
  multicast and broadcast addresses; IPv4 addresses written as IPv6 (``::ffff:a.b.c.d``,
  NAT64 ``64:ff9b::/96``) are judged as the IPv4 address they carry;
- ``SSD_STREAM_SOURCES`` set (CIDRs and host names): only addresses in those networks, or host
  names listed there; unset: any other address (cameras live on private networks; set it in
  production).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from service.admission import Network

log = logging.getLogger("service")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALWAYS_REFUSED: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(net), why)
    for net, why in (
        ("169.254.0.0/16", "link-local (cloud metadata)"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("0.0.0.0/8", "unspecified"),
        ("::/128", "unspecified"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
    )
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# lookups run here, never on the event loop nor on the default executor (which they could
# fill); a lookup cannot be cancelled, so one whose request gave up still holds its thread: when
# every thread is busy (names whose servers do not answer), a lookup is refused at once (503)
# rather than queued behind them
LOOKUP_THREADS = 4
_RESOLVER = ThreadPoolExecutor(max_workers=LOOKUP_THREADS, thread_name_prefix="resolve")
_lookups = 0  # running in _RESOLVER (changed on the event loop and in its threads)
_lookups_lock = threading.Lock()


class AddressRefused(Exception):
    """The URL may not be connected to (its scheme, or an address its host resolves to)."""


class Unresolvable(Exception):
    """The URL's host name does not resolve."""


class ResolverBusy(Exception):
    """Every lookup thread is taken (by names that take long to answer)."""


def _carried_v4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, NAT64), else the address itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def parse_sources(entries: Iterable[str]) -> tuple[tuple[Network, ...], frozenset[str]]:
    """``SSD_STREAM_SOURCES`` entries: networks (``10.0.0.0/8``, an address) and host names."""
    networks, names = [], set()
    for entry in entries:
        entry = entry.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            name = entry.lower().rstrip(".")
            if not name or any(c in name for c in "/:@ ") or name.startswith("."):
                raise ValueError(f"{entry!r} is neither a network (CIDR) nor a host name") from None
            names.add(name)
    return tuple(networks), frozenset(names)


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (``addresses``, in the resolver's order) and what to
    say to it (``host`` for the Host header and TLS, ``port``)."""

    url: SplitResult
    host: str
    port: int
    addresses: tuple[str, ...]


class SourcePolicy:
    """The rules above, for one service (its ``SSD_STREAM_SOURCES``)."""

    def __init__(self, sources: Iterable[str] = ()) -> None:
        self.networks, self.names = parse_sources(sources)
        self.restricted = bool(self.networks or self.names)

    def refusal(self, address: str, host: str) -> str | None:
        """Why ``address`` (``host`` resolved to it) may not be connected to, or None."""
        ip = _carried_v4(ipaddress.ip_address(address.split("%", 1)[0]))
        for net, why in ALWAYS_REFUSED:
            if ip in net:  # False across IP versions
                return f"{host} is a {why} address, which is never connected to"
        if not self.restricted or host.lower().rstrip(".") in self.names:
            return None
        if any(ip in n for n in self.networks):
            return None
        return f"{host} is outside SSD_STREAM_SOURCES"

    async def check(self, raw: str, schemes: tuple[str, ...]) -> Target:
        """The URL parsed, its host resolved and every address checked; raises
        :class:`AddressRefused`, :class:`Unresolvable` or ValueError (not a URL)."""
        raw = raw.strip()
        if any(ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
            raise ValueError("control characters or spaces in the URL")
        url = urlsplit(raw)
        scheme = url.scheme.lower()
        if scheme not in schemes:
            shown = scheme or "none"
            raise AddressRefused(f"the scheme {shown!r} is not allowed (only {', '.join(schemes)})")
        try:
            host, port = url.hostname, url.port
        except ValueError as exc:
            raise ValueError(f"not a URL: {exc}") from None
        if not host:
            raise ValueError("the URL has no host")
        host = ascii_host(host)
        port = port or {"http": 80, "https": 443, "rtsp": 554, "rtsps": 322}[scheme]
        addresses = await resolve(host, port)
        for address in addresses:
            why = self.refusal(address, host)
            if why is not None:
                log.warning("refused a URL to %s: %s is %s", host, host, address)
                raise AddressRefused(why)
        return Target(url, host, port, addresses)


def ascii_host(host: str) -> str:
    """The host as it is looked up and sent (Host header, TLS name): an IDNA A-label for a
    name in other scripts (NFKC first, so fullwidth digits are digits)."""
    host = unicodedata.normalize("NFKC", host).lower()
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"the host name is not a valid international name: {exc}") from None


async def resolve(host: str, port: int) -> tuple[str, ...]:
    """Every address of ``host`` (an address literal is itself), in the resolver's order."""
    try:
        return (str(ipaddress.ip_address(host)),)
    except ValueError:
        pass
    global _lookups
    with _lookups_lock:
        if _lookups >= LOOKUP_THREADS:
            raise ResolverBusy(f"{LOOKUP_THREADS} host name lookups are still running")
        _lookups += 1

    def lookup() -> list:
        global _lookups
        try:
            return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        finally:
            with _lookups_lock:
                _lookups -= 1

    loop = asyncio.get_running_loop()
    try:
        infos = await loop.run_in_executor(_RESOLVER, lookup)
    except (OSError, UnicodeError) as exc:
        raise Unresolvable(f"{host} does not resolve: {exc}") from None
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    if not seen:
        raise Unresolvable(f"{host} does not resolve")
    return tuple(seen)
