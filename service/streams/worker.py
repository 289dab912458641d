"""The stream worker: one process per connection to a live source, so that a camera whose
stream crashes FFmpeg ends that stream only, never the gateway.

The gateway starts ``python -m service.streams.worker SPEC`` (:class:`StreamWorker`) with an
address it has already checked (service/addresses.py); the worker never looks a name up. A
reading thread takes frames from the source as fast as the source sends them and keeps only the
newest (the latest-frame policy: the source is never made to wait, so it never buffers and lag
never grows however slow the model). The gateway asks for a frame by writing one byte on the
worker's stdin and gets the newest one it has not had yet (its index says how many were skipped).

Sources:
- RTSP (``rtsp``, ``rtsps``): FFmpeg through service/video/decode.py, RTP interleaved over the
  RTSP connection, FFmpeg's protocols limited to ``rtsp,rtsps,tcp,tls``;
- over HTTP (``http``, ``https``), by what the answer is: MJPEG (``multipart/x-mixed-replace``,
  what IP cameras and ``motion``-style servers send), read here with the standard library, each
  part decoded as an uploaded image is (service/imaging.py); an HLS playlist, or a video (a file,
  a live MPEG-TS), fetched here and demuxed by FFmpeg from a file object
  (service/streams/remote.py). A redirect is not followed (its target would not have been
  checked).

Messages on stdout (service/video/protocol.py): INFO once the first frame arrived, then one LIVE
per request, and ERROR or DONE when the source ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import http.client
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np

from service.streams.remote import (
    HLS_TYPES,
    MAX_PLAYLIST_BYTES,
    ChunkFile,
    Fetcher,
    RemoteFile,
    hls_bytes,
    read_error,
)
from service.video.protocol import (
    DONE,
    ERROR,
    LIVE,
    LiveFrame,
    VideoError,
    VideoInfo,
    VideoLimits,
    parse_live,
)
from service.video.worker import DecodeWorker
from ssdcore.tiling import TilePlan, TileSpec

MAX_HEADER_LINE = 8192


@dataclass(frozen=True)
class SourceSpec:
    """Where a worker connects: ``url`` for RTSP (its host already the checked address);
    ``address``/``port``/``host``/``path``/``tls`` for MJPEG over HTTP."""

    kind: str  # "rtsp" or "http"
    url: str
    address: str
    port: int
    host: str
    path: str
    tls: bool
    timeout_s: float  # the connection, and any silence of the source
    limits: VideoLimits
    max_part_bytes: int  # one MJPEG part at most
    ca_file: str | None = None
    tiles: TileSpec | None = None  # each frame's tiles (and the whole frame) instead of the frame
    max_runs: int = 1  # model runs a frame's tiles may take (as the gateway plans them)
    sources: tuple[str, ...] = ()  # SSD_STREAM_SOURCES: for URLs a playlist names

    def plan(self, width: int, height: int) -> TilePlan | None:
        """The tiles of a frame of this size, as the gateway plans them (None: the frame
        whole)."""
        return self.tiles.cut(width, height, self.max_runs) if self.tiles is not None else None


class StreamWorker(DecodeWorker):
    """The gateway's side of one stream worker."""

    @classmethod
    async def launch(cls, spec: SourceSpec) -> StreamWorker:
        body = {
            **spec.__dict__,
            "limits": spec.limits.__dict__,
            "tiles": asdict(spec.tiles) if spec.tiles is not None else None,
            "gateway": os.getpid(),
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.streams.worker",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        # the spec (a camera's password with it) on stdin: a command line is every user's to read
        assert process.stdin is not None
        process.stdin.write(json.dumps(body).encode() + b"\n")
        return cls(process)

    async def newest(self) -> LiveFrame | None:
        """The newest frame the worker has and the gateway has not had (waits for one); None
        once the source ended."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(b"n")
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the worker is gone: reading says how
        kind, payload = await self._message()
        if kind == LIVE:
            self.frames_read += 1
            return parse_live(payload)
        if kind == DONE:
            return None
        if kind == ERROR:
            self._raise(payload)
        raise VideoError(502, "source_unavailable", f"unexpected message {kind!r} from the worker")

    def kill(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        super().kill()


# --- the worker process ---


@dataclass(frozen=True)
class Pending:
    """A frame as the reading thread leaves it: decoded (RTSP, whose frames depend on the ones
    before) or still compressed (an MJPEG part), made into the model's 300x300 RGB (or its
    tiles') only if it is the one sent. A source sending far more frames than the stream's rate
    costs little more than reading them."""

    index: int
    captured: float
    width: int
    height: int
    pixels: Callable[[], np.ndarray]

    def live(self) -> LiveFrame:
        return LiveFrame(self.index, self.captured, self.width, self.height, self.pixels())


class Newest:
    """The reading thread's hand-over: the newest frame, the header, how the source ended."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.frame: Pending | None = None
        self.info: VideoInfo | None = None
        self.ended = False
        self.error: VideoError | None = None

    def put(self, frame: Pending, info: VideoInfo) -> None:
        with self.cond:
            self.frame = frame
            self.info = self.info or info
            self.cond.notify_all()

    def end(self, error: VideoError | None) -> None:
        with self.cond:
            self.ended, self.error = True, error
            self.cond.notify_all()

    def header(self) -> VideoInfo | VideoError | None:
        with self.cond:
            self.cond.wait_for(lambda: self.info is not None or self.ended)
            return self.info if self.info is not None else self.error

    def after(self, index: int) -> Pending | None:
        """A frame newer than ``index``, or None once the source ended without one."""
        with self.cond:
            self.cond.wait_for(
                lambda: (self.frame is not None and self.frame.index > index) or self.ended
            )
            if self.frame is not None and self.frame.index > index:
                return self.frame
            return None


def rtsp_frames(spec: SourceSpec) -> Iterator[tuple[Pending, VideoInfo]]:
    from service.video.decode import open_rtsp

    yield from container_frames(spec, open_rtsp(spec.url, spec.timeout_s), "rtsp", paced=False)


def container_frames(
    spec: SourceSpec, container, name: str | None, paced: bool
) -> Iterator[tuple[Pending, VideoInfo]]:
    """The frames FFmpeg decodes from an opened source (``name``: the container as shown, else
    FFmpeg's name of it); ``paced``: at their timestamps' pace (a file), else as they come."""
    from service.video.decode import live_pictures

    with container:
        stream = container.streams.video[0] if container.streams.video else None
        codec = stream.codec_context.name if stream is not None else "none"
        rate = stream.average_rate or stream.guessed_rate if stream is not None else None
        name = name or container.format.name
        pictures = live_pictures(container, spec.limits, spec.plan, paced=paced)
        for index, (width, height, pixels) in enumerate(pictures):
            info = VideoInfo(name, codec, width, height, float(rate or 0), 0.0, 0)
            yield Pending(index, time.time(), width, height, pixels), info


def _boundary(content_type: str) -> bytes | None:
    mime, _, rest = content_type.partition(";")
    if mime.strip().lower() != "multipart/x-mixed-replace":
        return None
    for param in rest.split(";"):
        key, _, value = param.strip().partition("=")
        if key.strip().lower() == "boundary" and value.strip().strip('"'):
            value = value.strip().strip('"')
            return (value if value.startswith("--") else "--" + value).encode()
    return None


def http_frames(spec: SourceSpec) -> Iterator[tuple[Pending, VideoInfo]]:
    """An http(s) source, by what it answers: MJPEG, an HLS playlist, or a video."""
    fetcher = Fetcher(spec)
    resp = fetcher.get(fetcher.url)
    content_type = resp.getheader("content-type", "")
    delimiter = _boundary(content_type)
    if delimiter is not None:
        yield from mjpeg_frames(spec, mjpeg_parts(spec, resp, delimiter))
        return
    body = RemoteFile(fetcher, fetcher.url, resp)
    head = body.peek_head()
    if any(t in content_type.lower() for t in HLS_TYPES) or head.startswith(b"#EXTM3U"):
        try:
            raw = head + resp.read(MAX_PLAYLIST_BYTES + 1 - len(head))
        finally:
            body.close()
        if len(raw) > MAX_PLAYLIST_BYTES:
            raise VideoError(413, "video_too_large", f"a playlist over {MAX_PLAYLIST_BYTES} bytes")
        text = raw.decode("utf-8", errors="replace")
        segments = ChunkFile(hls_bytes(fetcher, fetcher.url, text))
        yield from remote_frames(spec, segments, segments.peek_head(), "hls")
    else:
        try:
            yield from remote_frames(spec, body, head, None)
        finally:
            body.close()


def remote_frames(
    spec: SourceSpec, file, head: bytes, container_name: str | None
) -> Iterator[tuple[Pending, VideoInfo]]:
    """A video fetched over HTTP, demuxed by FFmpeg from ``file``, frames at their pace."""
    from service.video.decode import open_remote

    container = open_remote(file, head, "the source")
    yield from container_frames(spec, container, container_name, paced=True)


def mjpeg_parts(spec: SourceSpec, resp, delimiter: bytes) -> Iterator[bytes]:
    """The JPEG parts of an MJPEG-over-HTTP answer, as they arrive."""
    closing = delimiter + b"--"

    def line() -> bytes:
        data = resp.readline(MAX_HEADER_LINE + 1)
        if len(data) > MAX_HEADER_LINE:
            raise VideoError(502, "invalid_source", "a line of the MJPEG stream is too long")
        return data

    try:
        while (first := line()) and first.strip() != delimiter:  # the preamble
            pass
        while first:
            length = None
            while header := line().strip():
                key, _, value = header.partition(b":")
                if key.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length is not None:
                if not 0 < length <= spec.max_part_bytes:
                    raise VideoError(413, "frame_too_large", f"an MJPEG part of {length} bytes")
                body = resp.read(length)
                if len(body) < length:
                    return
                while (rest := line()) and rest.strip() not in (delimiter, closing):
                    pass
            else:  # no length: the part runs to the next delimiter line
                chunks, size = [], 0
                while (rest := resp.readline(spec.max_part_bytes + 1)) and rest.strip() not in (
                    delimiter,
                    closing,
                ):
                    size += len(rest)
                    if size > spec.max_part_bytes:
                        raise VideoError(413, "frame_too_large", "an MJPEG part is too large")
                    chunks.append(rest)
                body = b"".join(chunks).removesuffix(b"\r\n").removesuffix(b"\n")
            if body:
                yield body
            if not rest or rest.strip() == closing:
                return
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise read_error(exc, spec.timeout_s, "the source broke off") from None
    finally:
        resp.close()


def mjpeg_frames(spec: SourceSpec, parts: Iterator[bytes]) -> Iterator[tuple[Pending, VideoInfo]]:
    from service.errors import ApiError
    from service.imaging import ImageLimits, decode_image, decode_tiled, image_size

    limits = ImageLimits(spec.limits.max_pixels, spec.limits.max_side)

    def pixels_of(part: bytes, plan: TilePlan | None) -> Callable[[], np.ndarray]:
        def pixels() -> np.ndarray:
            try:
                if plan is not None:
                    return np.stack(decode_tiled(part, limits, lambda w, h: plan).pixels)
                return decode_image(part, limits).pixels
            except ApiError as exc:
                raise VideoError(
                    502, "invalid_source", f"a frame of the source: {exc.message}"
                ) from None

        return pixels

    for index, part in enumerate(parts):
        try:
            width, height = image_size(part, limits)  # the header only; checked
        except ApiError as exc:
            raise VideoError(
                502, "invalid_source", f"a frame of the source: {exc.message}"
            ) from None
        info = VideoInfo("mjpeg", "mjpeg", width, height, 0.0, 0.0, 0)
        plan = spec.plan(width, height)
        yield Pending(index, time.time(), width, height, pixels_of(part, plan)), info


def read_source(spec: SourceSpec, newest: Newest) -> None:
    """The reading thread: frames into ``newest`` until the source ends or fails."""
    frames = rtsp_frames if spec.kind == "rtsp" else http_frames
    try:
        for frame, info in frames(spec):
            newest.put(frame, info)
        newest.end(None)
    except VideoError as exc:
        newest.end(exc)
    except Exception as exc:  # anything else the source caused: this connection ends, said so
        # (the thread must never die silently: the gateway would wait for a frame until its
        # timeout)
        newest.end(
            VideoError(502, "source_unavailable", f"the source cannot be read: {exc!r}"[:500])
        )


def _die_with_the_gateway(gateway: int) -> None:
    """SIGKILL when the gateway (process ``gateway``, possibly PID 1 in a container) dies,
    whatever this process is waiting for (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != gateway:  # the gateway died before the line above
            os._exit(0)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway's Ctrl-C is the gateway's
    from service.video import protocol

    body = json.loads(sys.stdin.buffer.readline())
    _die_with_the_gateway(body.pop("gateway"))
    tiles = TileSpec(**body["tiles"]) if body["tiles"] else None
    spec = SourceSpec(
        **{**body, "limits": VideoLimits(**body["limits"]), "tiles": tiles,
           "sources": tuple(body["sources"])}
    )  # fmt: skip
    newest = Newest()
    threading.Thread(target=read_source, args=(spec, newest), daemon=True).start()
    out, requests = sys.stdout.buffer, sys.stdin.buffer
    try:
        header = newest.header()
        if isinstance(header, VideoInfo):
            out.write(protocol.info_message(header))
        else:
            error = header or VideoError(502, "source_unavailable", "the source sent no frame")
            out.write(protocol.error_message(error))
        out.flush()
        sent = -1
        while isinstance(header, VideoInfo) and requests.read(1):
            frame = newest.after(sent)
            if frame is None:
                if newest.error is not None:
                    out.write(protocol.error_message(newest.error))
                else:
                    out.write(protocol.done_message(sent + 1))
                out.flush()
                break
            try:
                message = protocol.live_message(frame.live())
            except VideoError as exc:  # a frame that does not decode ends this connection
                out.write(protocol.error_message(exc))
                out.flush()
                break
            out.write(message)
            out.flush()
            sent = frame.index
    except BrokenPipeError:  # the gateway stopped reading
        with contextlib.suppress(OSError):
            os.close(1)
    os._exit(0)  # the reading thread may be blocked in a read: it goes with the process


if __name__ == "__main__":
    sys.exit(main())
