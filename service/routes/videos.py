"""``POST /v1/videos``: a video file, detected, tracked and counted, answered as NDJSON."""

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from service.admission import client_address, parse_networks
from service.errors import ApiError
from service.metrics import Metrics
from service.multipart import read_video_upload
from service.pipeline import DetectParams, Pipeline
from service.routes.common import client_gone_mid_upload, pipeline
from service.routes.images import detect_params, tile_params
from service.settings import Settings
from service.video.processing import VideoParams, VideoRun
from service.video.protocol import VideoError, VideoLimits
from service.video.tracking import Line, Zone
from service.video.worker import DecodeWorker
from ssdcore.tiling import TileSpec

log = logging.getLogger("service")
MEDIA_TYPES = ("video/mp4", "video/quicktime", "video/webm", "video/x-matroska", "video/x-msvideo")
MAX_LINES = 16
MAX_ZONES = 16
MAX_ZONE_POINTS = 64
UPLOADS_PER_CLIENT = 2
_BINARY = {"type": "string", "format": "binary"}
VIDEO_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"video": {**_BINARY, "description": "MP4/MOV, WebM/MKV or AVI"}},
            }
        },
        **{t: {"schema": _BINARY} for t in MEDIA_TYPES},
    },
}


def parse_lines(text: str | None) -> tuple[Line, ...]:
    """``x1,y1,x2,y2;x1,y1,x2,y2`` or a JSON list of [x1, y1, x2, y2], in pixels."""
    if text is None or not text.strip():
        return ()
    try:
        if text.lstrip().startswith("["):
            values = json.loads(text)
        else:
            values = [[float(v) for v in part.split(",")] for part in text.split(";") if part]
    except (ValueError, TypeError, RecursionError) as exc:
        raise ApiError(422, "invalid_parameter", f"lines: {exc}") from None
    return lines_of(values)


def lines_of(values: object) -> tuple[Line, ...]:
    """Counting lines from a list of [x1, y1, x2, y2] (pixels); 422 for anything else."""
    lines = []
    try:
        if not isinstance(values, list):
            raise ValueError("a list of lines [x1, y1, x2, y2]")
        if len(values) > MAX_LINES:
            raise ValueError(f"at most {MAX_LINES}")
        for value in values:
            if not isinstance(value, list | tuple) or len(value) != 4:
                raise ValueError("a line is four numbers: x1,y1,x2,y2")
            x1, y1, x2, y2 = (float(v) for v in value)
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
                raise ValueError("coordinates must be finite numbers")
            if (x1, y1) == (x2, y2):
                raise ValueError("a line's two points must differ")
            lines.append(Line(x1, y1, x2, y2))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(422, "invalid_parameter", f"lines: {exc}") from None
    return tuple(lines)


def zones_of(values: object) -> tuple[Zone, ...]:
    """Zones from a list of polygons [[x, y], [x, y], [x, y], ...] (pixels); 422 for anything
    else."""
    zones = []
    try:
        if not isinstance(values, list):
            raise ValueError("a list of polygons [[x, y], [x, y], [x, y], ...]")
        if len(values) > MAX_ZONES:
            raise ValueError(f"at most {MAX_ZONES}")
        for value in values:
            if not isinstance(value, list | tuple) or not 3 <= len(value) <= MAX_ZONE_POINTS:
                raise ValueError(f"a zone is 3 to {MAX_ZONE_POINTS} points [x, y]")
            points = []
            for point in value:
                if not isinstance(point, list | tuple) or len(point) != 2:
                    raise ValueError("a point is two numbers: [x, y]")
                x, y = float(point[0]), float(point[1])
                if not (math.isfinite(x) and math.isfinite(y)):
                    raise ValueError("coordinates must be finite numbers")
                points.append((x, y))
            twice = sum(
                (x0 * y1 - x1 * y0) for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])
            )
            if abs(twice) < 1e-9:
                raise ValueError("a zone must enclose an area (its points are on one line)")
            zones.append(Zone(tuple(points)))
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ApiError(422, "invalid_parameter", f"zones: {exc}") from None
    return tuple(zones)


class VideoSlots:
    """Places for videos: uploads in progress (``SSD_MAX_VIDEO_UPLOADS``, at most
    ``UPLOADS_PER_CLIENT`` per client address) and videos being processed (``SSD_MAX_VIDEOS``).
    A processing place is taken once the upload is whole: a slow upload holds an upload place
    (until ``SSD_VIDEO_UPLOAD_TIMEOUT_S`` at most), never the model's."""

    def __init__(self, uploads: int, running: int, metrics: Metrics) -> None:
        self.max_uploads, self.max_running, self.metrics = uploads, running, metrics
        self.uploading: dict[str, int] = {}  # client -> uploads in progress
        self.running = 0

    def _busy(self, reason: str, message: str) -> ApiError:
        self.metrics.rejected.labels(reason).inc()
        return ApiError(503, "overloaded", message, {"Retry-After": "5"})

    def begin_upload(self, client: str) -> None:
        if sum(self.uploading.values()) >= self.max_uploads:
            raise self._busy("video_uploads_busy", f"{self.max_uploads} videos are being "
                             "uploaded already; retry later")  # fmt: skip
        if self.uploading.get(client, 0) >= UPLOADS_PER_CLIENT:
            raise self._busy("video_uploads_per_client", f"at most {UPLOADS_PER_CLIENT} "
                             "video uploads at once from one client")  # fmt: skip
        self.uploading[client] = self.uploading.get(client, 0) + 1

    def end_upload(self, client: str) -> None:
        self.uploading[client] -= 1
        if not self.uploading[client]:
            del self.uploading[client]

    def take(self) -> None:
        if self.running >= self.max_running:
            raise self._busy("videos_busy", f"{self.running} videos are being processed (at "
                             f"most {self.max_running}); retry later")  # fmt: skip
        self.running += 1

    def give_back(self) -> None:
        self.running -= 1


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])
    trusted = parse_networks(settings.trusted_proxies)

    def client_of(request: Request) -> str:
        peer = request.client.host if request.client else None
        return client_address(peer, request.headers.get("x-forwarded-for"), trusted)

    limits = VideoLimits(
        settings.max_video_pixels, settings.max_video_side, settings.max_video_seconds
    )

    @api.post(
        "/v1/videos",
        openapi_extra={"requestBody": VIDEO_BODY},
        summary="Detect and track objects through a video, count line crossings",
        description=(
            "Send a multipart form with the file in `video`, or a raw video body. The answer "
            "streams as `application/x-ndjson`: one line per processed frame (`frame`, `pts_s`, "
            "`model_version`, `detections` with `track_id`, `crossings`), then a `summary` line "
            "(frames, duration, tracks per class, per-line counts by class and direction). An "
            "error after the first line is an `error` line. Boxes are in the video's pixels."
        ),
        responses={
            200: {"content": {"application/x-ndjson": {}}},
            400: {"description": "not a decodable video"},
            413: {"description": "too large, too long or frames too large"},
            415: {"description": "not a video container the service reads"},
            503: {"description": "too many videos at once"},
        },
    )
    async def videos(
        request: Request,
        pipe: Annotated[Pipeline, Depends(pipeline)],
        detect: Annotated[DetectParams, Depends(detect_params(settings))],
        tiles: Annotated[TileSpec | None, Depends(tile_params(settings))],
        fps: Annotated[
            float | None,
            Query(
                gt=0,
                description="frames per second to detect on (default: every frame, "
                f"up to {settings.video_max_fps:g})",
            ),
        ] = None,
        track: Annotated[bool, Query(description="a track id on every detection")] = True,
        lines: Annotated[
            str | None,
            Query(
                max_length=4000,
                description="lines to count crossings of, in pixels: x1,y1,x2,y2;... or a "
                "JSON list of [x1, y1, x2, y2]",
            ),
        ] = None,
    ) -> StreamingResponse:
        detect = replace(detect, tiling=tiles)
        detect.allowed(pipe.backend.info.classes)  # an unknown class: 422 before the upload
        pipe.check_tiles(detect)  # a frame's grid beyond the limit: 422 before the upload
        if lines and not track:
            raise ApiError(422, "invalid_parameter", "lines are counted from tracks: track=true")
        params = VideoParams(
            detect,
            min(fps or settings.video_max_fps, settings.video_max_fps),
            track,
            parse_lines(lines),
        )
        spool = request.app.state.video_spool
        if spool is None:
            raise ApiError(
                503,
                "videos_unavailable",
                "videos are not available here: the gateway cannot write SSD_VIDEO_DIR (its log "
                "says why)",
            )
        slots: VideoSlots = request.app.state.video_slots
        client = client_of(request)
        slots.begin_upload(client)
        path = spool.new_file()
        worker, running = None, False
        try:
            try:
                async with asyncio.timeout(settings.video_upload_timeout_s):
                    size = await read_video_upload(request, path, MEDIA_TYPES)
            except ClientDisconnect:
                raise client_gone_mid_upload(request, metrics) from None
            except TimeoutError:
                metrics.rejected.labels("video_upload_timeout").inc()
                raise ApiError(
                    408,
                    "request_timeout",
                    f"the video did not arrive within {settings.video_upload_timeout_s:g} s",
                    {"Connection": "close"},
                ) from None
            finally:
                slots.end_upload(client)
            slots.take()
            running = True
            worker = await DecodeWorker.start(
                path, params.fps, limits, tiles=tiles, max_runs=settings.tile_budget
            )
            try:  # the header and the first frame: an unusable video is a 4xx, not a line
                async with asyncio.timeout(settings.request_timeout_s):
                    video = await worker.info()
                    first = await worker.next()
                if first is None:
                    raise VideoError(400, "no_frames", "the video stream has no frame")
            except TimeoutError:
                raise ApiError(
                    504, "backend_timeout", "the video's first frame took too long to decode"
                ) from None
            except VideoError as exc:
                metrics.rejected.labels(exc.code).inc()
                raise ApiError(exc.status, exc.code, exc.message) from None
            log.info(
                "video %s: %d bytes, %s %dx%d %.2f fps %.1f s",
                request.state.request_id,
                size,
                video.codec,
                video.width,
                video.height,
                video.fps,
                video.duration_s,
            )
            # planned as the worker plans each frame's tiles (from the same header and budget)
            plan = tiles.plan(video.width, video.height, settings.tile_budget) if tiles else None
            # one batch at the model, one waiting (of a frame's tiles, at least two frames)
            window = max(2, 2 * settings.batch_max_size // (plan.runs if plan else 1))
            run = VideoRun(
                pipe, worker, video, params, window, request.state.request_id, first, plan
            )
        except BaseException:
            if worker is not None:
                worker.kill()
            path.unlink(missing_ok=True)
            if running:
                slots.give_back()
            raise

        done = False

        async def cleanup() -> None:
            """Once, whichever comes first: the body's end, or the response's end when the
            client went away before the body started. Nothing awaited: after a disconnect,
            every await in a cancelled body raises at once."""
            nonlocal done
            if done:
                return
            done = True
            worker.kill()
            path.unlink(missing_ok=True)
            slots.give_back()

        async def body() -> AsyncIterator[bytes]:
            try:
                async for line in run.lines():
                    yield line
            finally:
                await cleanup()

        return StreamingResponse(
            body(),
            media_type="application/x-ndjson",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
            background=BackgroundTask(cleanup),
        )

    return api
