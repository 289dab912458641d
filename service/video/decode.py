"""Video decoding: the only module that imports PyAV (FFmpeg's libraries).

An upload is untrusted input for FFmpeg, which follows references: an HLS playlist, a ``concat``
script or an MP4's data references can make a "video" read local files or reach other hosts.
So a file is opened

- with its demuxer named, never probed: the container is recognised from its first bytes
  (MP4/MOV, Matroska/WebM, AVI) and anything else is refused before FFmpeg sees it;
- with ``protocol_whitelist=file`` (nothing but the file itself can be opened) and the MP4
  demuxer's external data references off (``enable_drefs=0``, FFmpeg's default, set anyway);
- after its header is checked against the limits (frame size, duration) before any frame is
  decoded.

Frames are sampled at the requested rate from their timestamps and resized to the model's
300x300 RGB by libswscale (bilinear), the way the export expects its ``images`` input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from PIL import Image

from service.video.protocol import Frame, VideoError, VideoInfo, VideoLimits
from ssdcore.imaging import tile_inputs
from ssdcore.spec import SSD300
from ssdcore.tiling import TilePlan

SIZE = SSD300.image_size
# recognised container -> FFmpeg's demuxer; the media types a raw body may name
CONTAINERS = {"mp4": "mov", "matroska": "matroska", "avi": "avi"}
OPEN_OPTIONS = {"protocol_whitelist": "file", "enable_drefs": "0"}
_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"}


def container_of(head: bytes) -> str | None:
    """The container a file's first bytes show (None: not one the service accepts)."""
    if len(head) >= 8 and head[4:8] in _MP4_BOXES:
        return "mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    return None


def stream_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    """The frames per second a stream declares, or FFmpeg's guess (None: neither)."""
    return stream.average_rate or stream.guessed_rate


def open_video(path: Path) -> av.container.InputContainer:
    with open(path, "rb") as f:
        head = f.read(16)
    kind = container_of(head)
    if kind is None:
        raise VideoError(
            415,
            "unsupported_video",
            "not a video container the service reads (MP4/MOV, Matroska/WebM or AVI)",
        )
    try:
        return av.open(str(path), format=CONTAINERS[kind], options=dict(OPEN_OPTIONS))
    except av.FFmpegError as exc:
        # the message without the file name (a path of the server's)
        raise VideoError(
            400, "invalid_video", f"the video cannot be read: {exc.strerror}"
        ) from None


def probe(container: av.container.InputContainer, limits: VideoLimits) -> VideoInfo:
    """The first video stream's header, checked against ``limits`` before any decoding."""
    if not container.streams.video:
        raise VideoError(400, "no_video_stream", "the file has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # a codec this FFmpeg does not know
        raise VideoError(415, "unsupported_codec", "the video's codec cannot be decoded here")
    width, height = stream.codec_context.width, stream.codec_context.height
    check_size(width, height, limits)
    duration = 0.0
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / av.time_base
        # Matroska's counts from time 0, not from the first frame (a clip cut from a recording
        # may start at 1000 s); where taking the start off leaves a length, that is the length
        # (an underestimate at worst: every frame's time is checked against the limit too)
        start = (container.start_time or 0) / av.time_base
        if 0 < start < duration:
            duration -= start
    if duration > limits.max_seconds:
        raise VideoError(
            413,
            "video_too_long",
            f"the video lasts {duration:.1f} s; at most {limits.max_seconds:g} s",
        )
    rate = stream_rate(stream) or Fraction(0)
    return VideoInfo(
        container=container.format.name,
        codec=stream.codec_context.name,
        width=width,
        height=height,
        fps=float(rate),
        duration_s=duration,
        frames=int(stream.frames or 0),
    )


@dataclass
class Progress:
    decoded: int = 0  # frames decoded so far, sampled or not


def frames(
    container: av.container.InputContainer,
    fps: float | None,
    limits: VideoLimits,
    threads: int = 1,
    progress: Progress | None = None,
    plan: TilePlan | None = None,
) -> Iterator[Frame]:
    """The frames to detect on, resized to 300x300 RGB: every frame, or at most ``fps`` a second
    chosen by their timestamps; with a ``plan`` of tiles, each frame's tiles and then the whole
    frame (as still images are tiled: ssdcore.imaging). A frame past ``limits.max_seconds`` (a
    header that lied) or of another size than the header's ends the video with an error."""
    tiled = plan is not None and not plan.trivial
    progress = progress if progress is not None else Progress()
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    stream.codec_context.thread_count = threads
    width, height = stream.codec_context.width, stream.codec_context.height
    step = 1.0 / fps if fps else 0.0
    rate = float(stream_rate(stream) or 25)
    # AVI has no presentation times (FFmpeg's are out of order with B-frames): frames are timed
    # by their index there, and wherever times stop increasing
    by_index = container.format.name == "avi"
    start = last = None
    next_t = None
    index = -1
    try:
        for frame in container.decode(stream):
            index += 1
            progress.decoded = index + 1
            if frame.time is None or by_index:
                t = index / rate
            else:
                t = float(frame.time)
                start = t if start is None else start
                t -= start  # from the stream's first frame (some start at 1000 s)
                if last is not None and t <= last:
                    by_index, t = True, index / rate
            last = t
            if t > limits.max_seconds:
                raise VideoError(
                    413, "video_too_long", f"a frame at {t:.1f} s: at most {limits.max_seconds:g} s"
                )
            if (frame.width, frame.height) != (width, height):
                raise VideoError(
                    400,
                    "invalid_video",
                    f"frame {index} is {frame.width}x{frame.height}, the stream {width}x{height}",
                )
            if next_t is not None and t < next_t - 1e-6:
                continue
            # on the grid of steps while frames come regularly; after a gap, a step after this one
            on_grid = next_t is not None and t < next_t + step / 2
            next_t = next_t + step if on_grid else t + step
            if tiled:
                pixels = tile_inputs(frame.to_image(), plan, SIZE)
            else:
                pixels = frame.reformat(
                    width=SIZE, height=SIZE, format="rgb24", interpolation="BILINEAR"
                ).to_ndarray()
            yield Frame(index, t, pixels)
    except av.FFmpegError as exc:
        raise VideoError(
            400, "invalid_video", f"decoding failed at frame {index + 1}: {exc.strerror}"
        ) from None


# --- live sources (service/streams/): RTSP cameras ---

# RTP interleaved in the RTSP connection (TCP): no UDP ports opened towards the camera, and no
# protocol FFmpeg could be led to by the camera (no http, no file)
STREAM_PROTOCOLS = "rtsp,rtsps,tcp,tls"


def open_rtsp(url: str, timeout_s: float) -> av.container.InputContainer:
    """An RTSP camera, at a URL whose host is an address already checked (never a name FFmpeg
    would look up again). ``timeout_s`` bounds the connection and every read: a camera that
    goes silent ends the source instead of holding it for ever."""
    options = {
        "rtsp_transport": "tcp",
        "protocol_whitelist": STREAM_PROTOCOLS,
        "allowed_media_types": "video",
        "timeout": str(int(timeout_s * 1e6)),  # socket I/O, microseconds
    }
    try:
        return av.open(url, format="rtsp", options=options, timeout=timeout_s)
    except (av.FFmpegError, OSError) as exc:  # FFmpeg's network errors are OSErrors too
        why = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(502, "source_unavailable", f"the camera cannot be read: {why}") from None


# a file object of the stream worker (service/streams/remote.py): FFmpeg opens nothing itself,
# not even a file (an unknown protocol name: every nested open refused), nor MP4 references
REMOTE_OPTIONS = {"protocol_whitelist": "none", "enable_drefs": "0"}


def is_mpegts(head: bytes) -> bool:
    """MPEG-TS: 188-byte packets, each starting with the sync byte 0x47."""
    return len(head) >= 1 and head[0] == 0x47 and (len(head) <= 188 or head[188] == 0x47)


def open_remote(file: BinaryIO, head: bytes, what: str) -> av.container.InputContainer:
    """A video that the stream worker reads over HTTP (``file``: its bytes in order, seekable
    or not), its demuxer named from ``head``, its first bytes (MPEG-TS, MP4/MOV, Matroska/WebM,
    AVI); ``what`` names the source in messages."""
    kind = "mpegts" if is_mpegts(head) else container_of(head)
    if kind is None:
        raise VideoError(
            415,
            "unsupported_source",
            f"{what} is not MJPEG, an HLS playlist, nor a video the service reads (MPEG-TS, "
            "MP4/MOV, Matroska/WebM, AVI)",
        )
    try:
        return av.open(file, format=LIVE_DEMUXERS[kind], options=dict(REMOTE_OPTIONS))
    except av.FFmpegError as exc:
        raise VideoError(502, "invalid_source", f"{what} cannot be read: {exc.strerror}") from None


LIVE_DEMUXERS = {**CONTAINERS, "mpegts": "mpegts"}


def check_size(width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(400, "invalid_video", "the video stream declares no frame size")
    if max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise VideoError(
            413,
            "video_too_large",
            f"frames of {width}x{height} exceed the limit ({limits.max_pixels} pixels, "
            f"{limits.max_side} a side)",
        )


def live_pictures(
    container: av.container.InputContainer,
    limits: VideoLimits,
    plan_for: Callable[[int, int], TilePlan | None] = lambda width, height: None,
    paced: bool = False,
) -> Iterator[tuple[int, int, Callable[[], np.ndarray]]]:
    """A camera's frames as they come: (width, height, a function giving the 300x300 RGB, or
    the (runs, 300, 300, 3) of the tiles ``plan_for(width, height)`` plans), each checked
    against the size limits (a camera may change its resolution mid-stream). The resize is left
    to the caller's choice of frames: most of a fast camera's are never used. ``paced``: each
    frame released at the time its timestamp says (a file read as a live source); a jump of
    the timestamps (a discontinuity, a new start) starts the clock again."""
    if not container.streams.video:
        raise VideoError(400, "no_video_stream", "the source has no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"

    def pixels_of(frame: av.VideoFrame) -> Callable[[], np.ndarray]:
        def pixels() -> np.ndarray:
            plan = plan_for(frame.width, frame.height)
            if plan is not None and not plan.trivial:
                return tile_inputs(frame.to_image(), plan, SIZE)
            return frame.reformat(
                width=SIZE, height=SIZE, format="rgb24", interpolation="BILINEAR"
            ).to_ndarray()

        return pixels

    origin = last = None  # the clock: monotonic time of timestamp 0; the last timestamp
    try:
        for frame in container.decode(stream):
            check_size(frame.width, frame.height, limits)
            if paced and frame.time is not None:
                t = float(frame.time)
                if origin is None or not last - 1.0 <= t <= last + 10.0:
                    origin = time.monotonic() - t
                last = t
                time.sleep(max(0.0, origin + t - time.monotonic()))
            yield frame.width, frame.height, pixels_of(frame)
    except (av.FFmpegError, OSError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise VideoError(502, "source_unavailable", f"the camera's stream broke: {why}") from None


# --- the client's annotated copy: every frame as a picture, and an H.264 writer ---


def pictures(path: Path) -> Iterator[tuple[float, Image.Image]]:
    """Every frame of a (local) video as (presentation time, RGB picture), in order."""
    container = open_video(path)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            t = float(frame.time) if frame.time is not None else index / 25
            yield t, frame.to_image()


def frame_rate(path: Path) -> Fraction:
    with open_video(path) as container:
        stream = container.streams.video[0]
        return stream_rate(stream) or Fraction(25)


class VideoWriter:
    """H.264 (libx264, yuv420p) into an MP4; odd frame sides are padded by one pixel (4:2:0)."""

    def __init__(self, path: Path, size: tuple[int, int], rate: Fraction) -> None:
        self.size = (size[0] + size[0] % 2, size[1] + size[1] % 2)
        self.container = av.open(str(path), "w", format="mp4")
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width, self.stream.height = self.size
        self.stream.pix_fmt = "yuv420p"

    def write(self, picture: Image.Image) -> None:
        if picture.size != self.size:
            padded = Image.new("RGB", self.size)
            padded.paste(picture)
            picture = padded
        for packet in self.stream.encode(av.VideoFrame.from_image(picture)):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
