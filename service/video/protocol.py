"""What the decoding worker and the gateway exchange: limits, the stream's header, frames and
errors, and their encoding on the worker's stdout (a kind byte, a length, the payload)."""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass

import numpy as np

FRAME_SHAPE = (300, 300, 3)
HEADER = struct.Struct("<cI")  # kind, payload length
FRAME_HEAD = struct.Struct("<Id")  # index, pts_s
LIVE_HEAD = struct.Struct("<IdII")  # index, captured (Unix time), width, height
INFO, FRAME, ERROR, DONE, LIVE = b"I", b"F", b"E", b"D", b"L"


class VideoError(Exception):
    """A video the service cannot take: ``status`` and ``code`` as the API answers them."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class VideoLimits:
    max_pixels: int  # of one frame
    max_side: int
    max_seconds: float


@dataclass(frozen=True)
class VideoInfo:
    container: str
    codec: str
    width: int
    height: int
    fps: float  # the stream's average frame rate (0 when it declares none)
    duration_s: float  # from the header (0 when unknown)
    frames: int  # declared by the header (0 when unknown)


@dataclass(frozen=True)
class Frame:
    index: int  # in decoding order, counting every decoded frame
    pts_s: float  # presentation time, seconds from the stream's start
    pixels: np.ndarray  # (300, 300, 3) uint8 RGB; with tiles (n, 300, 300, 3), the whole last


def message(kind: bytes, payload: bytes) -> bytes:
    return HEADER.pack(kind, len(payload)) + payload


def info_message(info: VideoInfo) -> bytes:
    return message(INFO, json.dumps(asdict(info)).encode())


def frame_message(frame: Frame) -> bytes:
    return message(FRAME, FRAME_HEAD.pack(frame.index, frame.pts_s) + frame.pixels.tobytes())


@dataclass(frozen=True)
class LiveFrame:
    """A frame of a live source: the newest when the gateway asked for one."""

    index: int  # frames the source gave since the connection began, this one included, minus 1
    captured: float  # when the worker had it decoded (Unix time: the lag's start)
    width: int  # of the source's picture (boxes are mapped back to it)
    height: int
    pixels: np.ndarray  # (300, 300, 3) uint8 RGB; with tiles (n, 300, 300, 3), the whole last


def live_message(frame: LiveFrame) -> bytes:
    head = LIVE_HEAD.pack(frame.index, frame.captured, frame.width, frame.height)
    return message(LIVE, head + frame.pixels.tobytes())


def parse_live(payload: bytes) -> LiveFrame:
    index, captured, width, height = LIVE_HEAD.unpack_from(payload)
    pixels = np.frombuffer(payload, np.uint8, offset=LIVE_HEAD.size).reshape(-1, *FRAME_SHAPE)
    return LiveFrame(index, captured, width, height, pixels[0] if len(pixels) == 1 else pixels)


def error_message(error: VideoError) -> bytes:
    body = {"status": error.status, "code": error.code, "message": error.message}
    return message(ERROR, json.dumps(body).encode())


def done_message(decoded: int) -> bytes:
    return message(DONE, json.dumps({"decoded": decoded}).encode())


def parse_frame(payload: bytes) -> Frame:
    index, pts = FRAME_HEAD.unpack_from(payload)
    pixels = np.frombuffer(payload, np.uint8, offset=FRAME_HEAD.size).reshape(-1, *FRAME_SHAPE)
    return Frame(index, pts, pixels[0] if pixels.shape[0] == 1 else pixels)
