"""HTTP(S) stream sources that FFmpeg decodes: a video served over HTTP (an MP4 or Matroska file,
a live MPEG-TS) and HLS playlists (``.m3u8``), read by the stream worker.

FFmpeg never opens a URL here. The worker fetches every byte itself and hands FFmpeg a file
object to demux, with its demuxer named (never probed): FFmpeg's own HLS demuxer would open
whatever a playlist names (another host, ``file:``, a ``concat:`` of local files), so playlists
are read here instead:

- every URL (a playlist's variant, each segment) is checked by the address rules of the source
  itself (service/addresses.py: scheme http/https, every address of its host, the allow-list
  ``SSD_STREAM_SOURCES``) and connected to the checked address; the source's own origin is the
  address the gateway checked; credentials of the source's URL go to its origin only;
- redirects are not followed (their targets would not have been checked);
- a playlist is at most ``MAX_PLAYLIST_BYTES``, a segment ``MAX_SEGMENT_BYTES``; encrypted
  playlists (``EXT-X-KEY``) and fragmented-MP4 segments (``EXT-X-MAP``) are refused as
  unsupported, MPEG-TS segments read;
- a master playlist: the variant of the largest picture within the size limits (the model sees
  300x300, but tiles want pixels; give a variant's own URL to choose another);
- a live playlist (no ``EXT-X-ENDLIST``) is read from its newest segment (the latest-frame rule)
  and reloaded every target duration (half of it when nothing was new, RFC 8216 6.3.4); one that
  has nothing new for three target durations ends the connection (the stream reconnects). A
  playlist that ends, like a file, ends the connection: the stream starts it again.

Frames of these sources are released at the pace of their timestamps (a file would otherwise be
decoded as fast as the CPU allows, and "the newest frame" would race through it).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import math
import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote, urljoin, urlsplit

from service.addresses import AddressRefused, ResolverBusy, SourcePolicy, Unresolvable
from service.video.protocol import VideoError

if TYPE_CHECKING:
    from service.streams.worker import SourceSpec

MAX_PLAYLIST_BYTES = 1 << 20
MAX_SEGMENT_BYTES = 256 << 20
MAX_RANGE_REQUESTS = 10_000  # seeks in one file (FFmpeg seeks a few times in an MP4)
CHUNK = 64 << 10
HLS_TYPES = ("mpegurl",)  # application/vnd.apple.mpegurl, application/x-mpegurl, audio/...


class PinnedConnection(http.client.HTTPConnection):
    """HTTP(S) to a checked address, saying the URL's host (Host header, TLS name)."""

    def __init__(
        self, address: str, port: int, host: str, tls: bool, timeout: float, ca_file: str | None
    ) -> None:
        super().__init__(host, port, timeout=timeout)
        self.address, self.tls, self.ca_file = address, tls, ca_file

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        if self.tls:
            context = ssl.create_default_context(cafile=self.ca_file)
            sock = context.wrap_socket(sock, server_hostname=self.host)
        self.sock = sock


class Fetcher:
    """GET requests for one source: its own origin at the address the gateway checked, any
    other URL checked here first."""

    def __init__(self, spec: SourceSpec) -> None:
        self.spec = spec
        self.policy = SourcePolicy(spec.sources)
        self.url = source_url(spec)
        self.origin = _origin(self.url)
        self.requests = 0

    def get(self, url: str, start: int | None = None) -> http.client.HTTPResponse:
        """The response to ``GET url`` (from byte ``start`` on where given: 206 expected), its
        status checked; raises VideoError."""
        spec = self.spec
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 - a port that is no number: refused here, not later
        except ValueError as exc:
            raise VideoError(422, "source_refused", f"{_shown(url)}: {exc}") from None
        # the source's own origin: the address the gateway checked; any other URL checked here
        address = spec.address if _origin(url) == self.origin else self._checked(url)
        scheme = parts.scheme.lower()
        port = parts.port or (443 if scheme == "https" else 80)
        conn = PinnedConnection(
            address, port, parts.hostname or "", scheme == "https", spec.timeout_s, spec.ca_file
        )
        headers = {"User-Agent": "ssd300-service"}
        source = urlsplit(self.url)
        if _origin(url) == self.origin and source.username is not None:
            user = f"{unquote(source.username)}:{unquote(source.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        if start is not None:
            headers["Range"] = f"bytes={start}-"
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        self.requests += 1
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise read_error(exc, spec.timeout_s, "the source cannot be read") from None
        if 300 <= resp.status < 400:
            conn.close()
            raise VideoError(
                502,
                "source_redirected",
                f"{_shown(url)} answered {resp.status} (a redirect): stream sources are not "
                "followed elsewhere; give the final URL",
            )
        # from byte 0 the whole file is what was asked, whichever way it comes
        expected = (200,) if start is None else (200, 206) if start == 0 else (206,)
        if resp.status not in expected:
            conn.close()
            if start and resp.status == 200:  # the whole file again: not from where asked
                raise VideoError(
                    502, "invalid_source", f"{_shown(url)} ignored a byte range it said it takes"
                )
            raise VideoError(
                502, "source_unavailable", f"{_shown(url)} answered HTTP {resp.status}"
            )
        if start and not (resp.getheader("content-range") or "").startswith(f"bytes {start}-"):
            conn.close()
            raise VideoError(
                502, "invalid_source", f"{_shown(url)} answered another byte range than asked"
            )
        return resp

    def _checked(self, url: str) -> str:
        try:
            target = asyncio.run(self.policy.check(url, ("http", "https")))
        except AddressRefused as exc:
            raise VideoError(422, "source_refused", f"{_shown(url)}: {exc}") from None
        except ValueError as exc:
            raise VideoError(422, "source_refused", f"{_shown(url)}: {exc}") from None
        except (Unresolvable, ResolverBusy) as exc:
            raise VideoError(502, "source_unavailable", str(exc)) from None
        return target.addresses[0]

    def text(self, url: str) -> str:
        """A playlist: at most MAX_PLAYLIST_BYTES of text."""
        resp = self.get(url)
        try:
            body = resp.read(MAX_PLAYLIST_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise read_error(exc, self.spec.timeout_s, "the playlist broke off") from None
        finally:
            resp.close()
        if len(body) > MAX_PLAYLIST_BYTES:
            raise VideoError(413, "video_too_large", f"a playlist over {MAX_PLAYLIST_BYTES} bytes")
        return body.decode("utf-8", errors="replace")


def source_url(spec: SourceSpec) -> str:
    """The source's URL with its host name (the worker's spec holds the checked address apart)."""
    scheme = "https" if spec.tls else "http"
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    auth = urlsplit(spec.url).netloc.rpartition("@")[0]
    return f"{scheme}://{auth + '@' if auth else ''}{host}:{spec.port}{spec.path}"


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = None  # no number: never the source's origin (refused when fetched)
    return scheme, (parts.hostname or "").lower(), port


def _shown(url: str) -> str:
    """A URL for a message: no credentials, no query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"[:300]


def read_error(exc: BaseException, timeout_s: float, what: str) -> VideoError:
    """A source's read that failed: silent past its timeout (504), or broken (502)."""
    if isinstance(exc, TimeoutError | socket.timeout):
        return VideoError(504, "source_silent", f"the source sent nothing for {timeout_s:g} s")
    return VideoError(502, "source_unavailable", f"{what}: {exc}")


# --- a file over HTTP, seekable through Range requests ---


class RemoteFile(io.RawIOBase):
    """The body of a response as a file for FFmpeg: read in order, and where the server takes
    ranges (``Accept-Ranges: bytes`` and a length), seekable by asking again from the new
    position (an MP4 whose index is at its end is read so)."""

    def __init__(self, fetcher: Fetcher, url: str, resp: http.client.HTTPResponse) -> None:
        self.fetcher, self.url, self.resp = fetcher, url, resp
        self.pos = 0
        length = resp.getheader("content-length")
        self.length = int(length) if length and _DIGITS.fullmatch(length) else None
        ranges = (resp.getheader("accept-ranges") or "").lower() == "bytes"
        self.ranges = ranges and self.length is not None
        self.head = b""  # read ahead to recognise the container: read again first
        self.seeks = 0

    def peek_head(self, size: int = 188 * 2 + 1) -> bytes:
        while len(self.head) < size:
            more = self._read_response(size - len(self.head))
            if not more:
                break
            self.head += more
        return self.head

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.ranges

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        if self.head:
            n = min(len(view), len(self.head))
            view[:n] = self.head[:n]
            self.head = self.head[n:]
        else:
            data = self._read_response(len(view))
            n = len(data)
            view[:n] = data
        self.pos += n
        return n

    def _read_response(self, size: int) -> bytes:
        try:
            return self.resp.read1(min(size, CHUNK)) if size else b""
        except (OSError, http.client.HTTPException) as exc:
            raise read_error(exc, self.fetcher.spec.timeout_s, "the source broke off") from None

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self.pos
        elif whence == io.SEEK_END:
            if self.length is None:
                raise OSError("the source's length is not known")
            offset += self.length
        if offset == self.pos:
            return self.pos
        if not self.ranges:
            raise OSError("the source cannot be read out of order (no byte ranges)")
        self.seeks += 1
        if self.seeks > MAX_RANGE_REQUESTS:
            raise VideoError(502, "invalid_source", f"more than {MAX_RANGE_REQUESTS} seeks")
        self.resp.close()
        self.head = b""
        self.resp = self.fetcher.get(self.url, start=offset)
        self.pos = offset
        return self.pos

    def close(self) -> None:
        self.resp.close()
        super().close()


# --- HLS ---


@dataclass(frozen=True)
class Segment:
    sequence: int
    url: str


@dataclass
class Playlist:
    variants: list[tuple[int, int, int, str]]  # (pixels, bandwidth, longest side, url)
    segments: list[Segment]
    target_s: float
    ended: bool
    encrypted: bool
    fragmented: bool


_ATTRIBUTE = re.compile(r'([A-Z0-9-]+)=("[^"]*"|[^,]*)')
_DIGITS = re.compile(r"[0-9]{1,18}")
MAX_TARGET_S = 60.0  # a playlist's target duration (how long to wait for a reload), at most


def parse_playlist(text: str, base: str) -> Playlist:
    """An M3U8 playlist (master or media) with its URLs made absolute against ``base``."""
    lines = [line.strip() for line in text.splitlines()]
    if not lines or not lines[0].startswith("#EXTM3U"):
        raise VideoError(502, "invalid_source", "not an HLS playlist (no #EXTM3U)")
    variants, segments = [], []
    target, sequence, ended, encrypted, fragmented = 6.0, 0, False, False, False
    pending_variant: dict[str, str] | None = None
    in_segment = False
    for line in lines[1:]:
        if not line:
            continue
        if line.startswith("#EXT-X-STREAM-INF:"):
            pending_variant = dict(_ATTRIBUTE.findall(line.split(":", 1)[1]))
        elif line.startswith("#EXT-X-TARGETDURATION:"):
            target = _number(line, 6.0)
        elif line.startswith("#EXT-X-MEDIA-SEQUENCE:"):
            value = line.split(":", 1)[1].strip()
            sequence = int(value) if _DIGITS.fullmatch(value) else 0
        elif line.startswith("#EXT-X-ENDLIST"):
            ended = True
        elif line.startswith("#EXT-X-KEY:"):
            encrypted = encrypted or "METHOD=NONE" not in line
        elif line.startswith("#EXT-X-MAP:"):
            fragmented = True
        elif line.startswith("#EXTINF:"):
            in_segment = True
        elif line.startswith("#"):
            continue
        elif pending_variant is not None:
            width, _, height = pending_variant.get("RESOLUTION", "0x0").partition("x")
            w, h = (int(v) if _DIGITS.fullmatch(v) else 0 for v in (width, height))
            bandwidth = pending_variant.get("BANDWIDTH", "0")
            variants.append(
                (
                    w * h,
                    int(bandwidth) if _DIGITS.fullmatch(bandwidth) else 0,
                    max(w, h),
                    urljoin(base, line),
                )
            )
            pending_variant = None
        elif in_segment:
            segments.append(Segment(sequence + len(segments), urljoin(base, line)))
            in_segment = False
    target = min(max(0.5, target), MAX_TARGET_S)
    return Playlist(variants, segments, target, ended, encrypted, fragmented)


def _number(line: str, default: float) -> float:
    try:
        value = float(line.split(":", 1)[1].split(",")[0])
    except ValueError:
        return default
    return value if math.isfinite(value) else default


def choose_variant(
    variants: list[tuple[int, int, int, str]], max_pixels: int, max_side: int
) -> str:
    """The variant of the largest picture within the limits (unknown sizes last)."""
    fitting = [v for v in variants if v[0] <= max_pixels and v[2] <= max_side]
    if not fitting:
        raise VideoError(413, "video_too_large", "every variant of the playlist is over the limits")
    return max(fitting, key=lambda v: (v[0], v[1]))[3]


def hls_bytes(fetcher: Fetcher, url: str, text: str) -> Iterator[bytes]:
    """The MPEG-TS bytes of an HLS playlist's segments, in order, as they are fetched."""
    spec = fetcher.spec
    playlist = parse_playlist(text, url)
    if playlist.variants:
        url = choose_variant(playlist.variants, spec.limits.max_pixels, spec.limits.max_side)
        playlist = parse_playlist(fetcher.text(url), url)
        if playlist.variants:
            raise VideoError(502, "invalid_source", "a variant playlist that is a master playlist")
    if playlist.encrypted:
        raise VideoError(415, "unsupported_source", "an encrypted HLS playlist (EXT-X-KEY)")
    if playlist.fragmented:
        raise VideoError(
            415,
            "unsupported_source",
            "HLS with fragmented MP4 segments (EXT-X-MAP) is not read; MPEG-TS segments are",
        )
    if not playlist.segments and playlist.ended:
        raise VideoError(502, "invalid_source", "an HLS playlist without segments")
    # live: from the newest segment (older ones are the past); a playlist that ends: all of it
    following = playlist.segments[-1].sequence if playlist.segments and not playlist.ended else 0
    fresh = loaded = time.monotonic()
    while True:
        new = [s for s in playlist.segments if s.sequence >= following]
        for segment in new:
            yield from _segment(fetcher, segment.url)  # as fast as FFmpeg takes it (its pace)
            following = segment.sequence + 1
            fresh = time.monotonic()
        if playlist.ended:
            return
        if time.monotonic() - fresh > 3 * playlist.target_s:
            raise VideoError(
                504,
                "source_silent",
                f"the live playlist had no new segment for {3 * playlist.target_s:g} s",
            )
        # the next reload a target duration after the last (half of it when nothing was new),
        # however long its segments took to be read
        wait = playlist.target_s if new else playlist.target_s / 2
        time.sleep(max(0.0, loaded + wait - time.monotonic()))
        loaded = time.monotonic()
        playlist = parse_playlist(fetcher.text(url), url)
        if playlist.segments and playlist.segments[0].sequence > following:
            following = playlist.segments[0].sequence  # fell behind: what is left of the window


def _segment(fetcher: Fetcher, url: str) -> Iterator[bytes]:
    resp = fetcher.get(url)
    size = 0
    try:
        while chunk := resp.read1(CHUNK):
            size += len(chunk)
            if size > MAX_SEGMENT_BYTES:
                raise VideoError(
                    413, "video_too_large", f"a segment over {MAX_SEGMENT_BYTES} bytes"
                )
            yield chunk
    except (OSError, http.client.HTTPException) as exc:
        raise read_error(exc, fetcher.spec.timeout_s, "a segment broke off") from None
    finally:
        resp.close()


class ChunkFile(io.RawIOBase):
    """Bytes from an iterator as a file read in order (FFmpeg demuxing HLS segments one after
    the other as one MPEG-TS)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks, self.rest, self.pos = chunks, b"", 0

    def peek_head(self, size: int = 188 * 2 + 1) -> bytes:
        while len(self.rest) < size and (chunk := next(self.chunks, None)) is not None:
            self.rest += chunk
        return self.rest[:size]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        while not self.rest:
            chunk = next(self.chunks, None)
            if chunk is None:
                return 0
            self.rest = chunk
        n = min(len(view), len(self.rest))
        view[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos
