"""What a stream is asked to do: the body of ``POST /v1/streams`` and an entry of the streams file
(``SSD_STREAMS_FILE``), one schema for both."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel, ConfigDict, Field

from service.pipeline import DetectParams
from service.routes.images import tile_spec
from service.routes.videos import lines_of, zones_of
from service.settings import Settings
from service.video.tracking import Line, Zone
from ssdcore.labels import ClassList


@dataclass(frozen=True)
class StreamParams:
    source: str
    fps: float
    detect: DetectParams
    lines: tuple[Line, ...] = ()
    name: str | None = None
    zones: tuple[Zone, ...] = ()


class StreamRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        max_length=2048,
        description="rtsp:// (a camera), or http(s):// sending MJPEG "
        "(multipart/x-mixed-replace), an HLS playlist (.m3u8 of MPEG-TS segments) or a video "
        "(MP4, Matroska, MPEG-TS), played at its own pace",
    )
    name: str | None = Field(None, max_length=200, description="a name of yours for it")
    fps: float | None = Field(
        None, ge=0.05, description="frames a second to detect on (one every 20 s at least)"
    )
    classes: list[str] | None = Field(
        None, max_length=1000, description="class names or category ids to keep (all: unset)"
    )
    score_threshold: float | None = Field(None, ge=0.0, le=1.0)
    iou_threshold: float | None = Field(None, gt=0.0, le=1.0)
    max_detections: int | None = Field(None, ge=1, le=1000)
    lines: list[list[float]] = Field(
        [], max_length=100, description="lines to count crossings of: [[x1, y1, x2, y2], ...] "
        "in the source's pixels",
    )  # fmt: skip
    zones: list[list[list[float]]] = Field(
        [], max_length=100, description="zones (polygons) whose entries and exits are events: "
        "[[[x, y], [x, y], [x, y], ...], ...] in the source's pixels; a track is in a zone while "
        "its box's bottom centre is",
    )  # fmt: skip
    tiles: str | None = Field(
        None, max_length=16, description="each frame on overlapping tiles (small objects): "
        "`auto` or a grid COLSxROWS; unset: the frame whole",
    )  # fmt: skip
    tile_size: int | None = Field(None, ge=32, le=16_384, description="tiles=auto's tile side")
    tile_overlap: float | None = Field(None, ge=0.0, le=0.75)
    tile_whole: bool = Field(True, description="run the whole frame too (large objects)")

    def params(self, settings: Settings, classes: ClassList) -> StreamParams:
        """The stream's parameters, defaults from settings; 422 (ApiError) for an unknown class
        of the served model or a bad line."""
        detect = DetectParams.of(
            self.score_threshold if self.score_threshold is not None else settings.score_threshold,
            self.iou_threshold if self.iou_threshold is not None else settings.iou_threshold,
            self.max_detections or settings.max_detections,
            tuple(self.classes) if self.classes is not None else None,
        )
        detect.allowed(classes)
        tiles = tile_spec(
            self.tiles,
            self.tile_size or settings.tile_size,
            self.tile_overlap if self.tile_overlap is not None else settings.tile_overlap,
            self.tile_whole,
        )
        fps = min(self.fps or settings.stream_fps, settings.video_max_fps)
        return StreamParams(
            self.source,
            fps,
            replace(detect, tiling=tiles),
            lines_of(self.lines),
            self.name,
            zones_of(self.zones),
        )
