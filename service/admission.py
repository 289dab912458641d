"""Admission: partial request bodies bounded by bytes, not by a count; requests at inference
bounded by a count (:class:`InFlight`).

A request body that has fully arrived needs no place here: it goes straight on (its bytes are
the request's, bounded by ``SSD_MAX_BODY_BYTES`` and ``SSD_MAX_IN_FLIGHT``). A body still
arriving after a read is a *partial upload*; the bytes received of all of them together stay
within ``SSD_UPLOAD_BUFFER_BYTES``. When a piece would overflow it, the partial uploads that
would take longest to finish are dropped first, 503 with ``Connection: close``, until the piece
fits: a stalled or trickling upload loses its place to one that is arriving, never the other
way round. nginx buffers partial bodies and bounds connections; Envoy's overload manager resets
the streams holding the most buffer: this is the same idea with the cost of finishing as the
measure.

The time to finish is what is left to send at the slower of two rates: the average since the
upload began and the rate of the last ``RATE_WINDOW_S`` seconds. The average alone let an
upload that sent all but a few bytes at once, then one byte every half minute, look nearly
finished for many minutes; the recent rate alone would let one that stalled for minutes look
fast on its first burst. An upload keeps its place only by being fast in both senses.

Each client address may hold ``SSD_MAX_UPLOADS_PER_CLIENT`` partial uploads at once (the next
one from that address gets a 503) and ``SSD_UPLOAD_BYTES_PER_CLIENT`` bytes of them: a piece
that takes an address beyond that drops the address's own slowest uploads until it is within,
whatever room the buffer has; other addresses are not touched. One address can so never hold
the whole buffer. The address is the peer's, or, where the peer is one of
``SSD_TRUSTED_PROXIES``, the nearest untrusted address of ``X-Forwarded-For``.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from service.errors import ApiError
from service.metrics import Metrics

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

RATE_WINDOW_S = 10.0  # the recent rate: bytes of the last this many seconds


class UploadDropped(ApiError):
    def __init__(self, received: int) -> None:
        super().__init__(
            503,
            "upload_dropped",
            f"the upload buffer is full and this upload was the slowest to finish "
            f"({received} bytes received); retry shortly",
            {"Connection": "close", "Retry-After": "1"},
        )


@dataclass(eq=False)
class Upload:
    """One partial body: who sends it, how much it said it would send, what has arrived."""

    client: str
    expected: int  # Content-Length, else the body cap
    started: float
    received: int = 0
    dropped: bool = False
    timer: object = None  # the asyncio.Timeout of the read it is waiting on, if any
    order: int = field(default_factory=itertools.count().__next__)
    # the bytes of the current and the previous RATE_WINDOW_S window, and where the current began
    window_start: float | None = None
    window_bytes: int = 0
    previous_bytes: int = 0

    def arrived(self, size: int, now: float) -> None:
        self._roll(now)
        self.received += size
        self.window_bytes += size

    def recent_rate(self, now: float) -> float:
        """Bytes/s over the last ``RATE_WINDOW_S`` (a sliding window: the current one and the
        previous one's share), over the upload's age while it is younger than that."""
        self._roll(now)
        if self.window_start is None:
            return 0.0
        into = (now - self.window_start) / RATE_WINDOW_S
        in_window = self.window_bytes + self.previous_bytes * max(1.0 - into, 0.0)
        return in_window / max(min(RATE_WINDOW_S, now - self.started), 1e-3)

    def seconds_to_finish(self, now: float) -> float:
        average = self.received / max(now - self.started, 1e-3)
        rate = min(average, self.recent_rate(now))
        left = max(self.expected - self.received, 0)
        if left == 0:
            return 0.0
        return left / rate if rate > 0 else math.inf

    def _roll(self, now: float) -> None:
        if self.window_start is None:
            self.window_start = now
            return
        windows = math.floor((now - self.window_start) / RATE_WINDOW_S)
        if windows >= 1:
            self.previous_bytes = self.window_bytes if windows == 1 else 0
            self.window_bytes = 0
            self.window_start += windows * RATE_WINDOW_S


class UploadAdmission:
    def __init__(
        self, budget: int, per_client: int, metrics: Metrics, bytes_per_client: int | None = None
    ) -> None:
        self.budget = budget
        self.per_client = per_client
        self.bytes_per_client = bytes_per_client or budget
        self.metrics = metrics
        self.held = 0
        self.uploads: set[Upload] = set()
        self.by_client: dict[str, int] = {}  # uploads in progress per address
        self.held_by_client: dict[str, int] = {}  # their bytes

    def begin(self, client: str, expected: int, now: float) -> Upload:
        """A body is still arriving after a read: give it a place, or 503 for its address."""
        if self.by_client.get(client, 0) >= self.per_client:
            self.metrics.rejected.labels("uploads_per_client").inc()
            raise ApiError(
                503,
                "overloaded",
                f"this client has {self.per_client} uploads in progress already; retry shortly",
                {"Connection": "close", "Retry-After": "1"},
            )
        upload = Upload(client, expected, now)
        self.uploads.add(upload)
        self.by_client[client] = self.by_client.get(client, 0) + 1
        return upload

    def grow(self, upload: Upload, size: int, now: float) -> None:
        """``size`` more bytes of ``upload`` have arrived: drop its address's slowest uploads
        until the address is within its bytes, then the slowest of all until they fit the
        budget (raising :class:`UploadDropped` if ``upload`` is one)."""
        if upload.dropped:
            # dropped while this piece was on its way: the piece is refused with the upload and
            # never counted (the upload's bytes went back when it was dropped)
            raise UploadDropped(upload.received + size)
        upload.arrived(size, now)
        self.held += size
        client = upload.client
        self.held_by_client[client] = self.held_by_client.get(client, 0) + size
        if self.held_by_client[client] > self.bytes_per_client:
            own = [u for u in self.uploads if u.client == client]
            for victim in self._worst_first(own, now):
                if self.held_by_client.get(client, 0) <= self.bytes_per_client:
                    break
                self._drop(victim, now)
        if self.held > self.budget:
            for victim in self._worst_first(self.uploads, now):
                if self.held <= self.budget:
                    break
                self._drop(victim, now)
        self.metrics.upload_buffer.set(self.held)
        if upload.dropped:
            raise UploadDropped(upload.received)

    @staticmethod
    def _worst_first(uploads, now: float) -> list[Upload]:
        return sorted(uploads, key=lambda u: (-u.seconds_to_finish(now), u.order))

    def _drop(self, victim: Upload, now: float) -> None:
        victim.dropped = True
        self.finish(victim)
        self.metrics.rejected.labels("upload_dropped").inc()
        # waiting on its next piece: wake it at once (unless its own deadline is already
        # firing: an expiring timeout cannot be moved, and it wakes the upload anyway)
        if victim.timer is not None and not victim.timer.expired():
            victim.timer.reschedule(now)

    def finish(self, upload: Upload) -> None:
        """The body has arrived (or the request ended): its place goes back."""
        if upload not in self.uploads:
            return
        self.uploads.discard(upload)
        self.held -= upload.received
        client = upload.client
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
            self.held_by_client[client] = self.held_by_client.get(client, 0) - upload.received
        else:
            del self.by_client[client]
            self.held_by_client.pop(client, None)
        self.metrics.upload_buffer.set(self.held)


class InFlight:
    """Requests whose body has arrived and that are being detected: ``SSD_MAX_IN_FLIGHT`` at
    most, the next one gets 503 at once (a queue in front of a saturated model only adds
    latency to every request in it)."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self.metrics = metrics
        self.count = 0

    @contextmanager
    def place(self) -> Iterator[None]:
        if self.count >= self.limit:
            self.metrics.rejected.labels("in_flight").inc()
            raise ApiError(
                503,
                "overloaded",
                "too many requests in flight; retry shortly",
                {"Retry-After": "1"},
            )
        self.count += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.count -= 1
            self.metrics.in_flight.dec()


def parse_networks(values: list[str]) -> list[Network]:
    """``SSD_TRUSTED_PROXIES`` entries (addresses or CIDR blocks)."""
    return [ipaddress.ip_network(v.strip(), strict=False) for v in values if v.strip()]


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str:
    """The client, as limits per client count it: the peer's address, or behind trusted proxies
    the rightmost address of ``X-Forwarded-For`` that is not one of them (anything left of it
    the client wrote itself); an IPv6 address as its /64, the network one customer is given
    (any of its 2^64 addresses would otherwise be another client)."""
    address = peer or "unknown"
    if not trusted or not forwarded_for or not _in(address, trusted):
        return _as_client(address)
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return _as_client(address)  # a malformed hop: the last proxy seen, never a guess
        if not _in(hop, trusted):
            return _as_client(hop)
        address = hop
    return _as_client(address)


def _as_client(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip.ipv4_mapped) if isinstance(ip, ipaddress.IPv6Address) else address


def _in(address: str, networks: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)
