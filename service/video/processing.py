"""The flow of ``POST /v1/videos``: frames from the decoding worker -> the micro-batcher (as
background requests, after still images) -> NMS -> tracks -> line counts -> one NDJSON line per
frame, then a summary line.

Frames are read from the worker only as the model frees up: at most ``window`` of them are at
the batcher at once, so memory stays flat for a video of any length, while the worker decodes
the next frame during the model's work. One model version answers the whole video: the embedded
backends pin it; with Triton, which picks the version itself, a change is said in the line
where it happened (``model_version_changed``) and the class names follow the version.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from service.backends import ModelInfo
from service.batching import BatchResult
from service.errors import ApiError
from service.pipeline import (
    DetectParams,
    Pipeline,
    describe,
    merge_tiles,
    run_detections,
    to_pixel_detections,
)
from service.video.protocol import Frame, VideoError, VideoInfo
from service.video.tracking import Line, LineCounter, Tracker
from service.video.worker import DecodeWorker
from ssdcore.postprocess import Detections
from ssdcore.tiling import TilePlan


@dataclass(frozen=True)
class VideoParams:
    detect: DetectParams
    fps: float  # frames per second detected at most
    track: bool = True
    lines: tuple[Line, ...] = ()


def ndjson(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def error_line(status: int, code: str, message: str, request_id: str | None) -> bytes:
    return ndjson(
        {"error": {"status": status, "code": code, "message": message, "request_id": request_id}}
    )


def model_body(info: ModelInfo) -> dict:
    return {
        "name": info.name,
        "version": info.version,
        "backend": info.backend,
        "random_weights": info.random_weights,
    }


@dataclass
class _Stages:
    """Seconds spent waiting for or doing each stage (the summary's ``timings_ms``)."""

    decode_wait: float = 0.0  # waiting for the worker's next frame (decode + resize)
    model_wait: float = 0.0  # waiting for a frame's result once nothing else could be done
    postprocess: float = 0.0  # NMS and pixel boxes
    tracking: float = 0.0  # tracker and line counts
    started: float = field(default_factory=time.perf_counter)


def _inputs(frame: Frame) -> list[np.ndarray]:
    """The model inputs of a frame: the frame, or its tiles."""
    return list(frame.pixels) if frame.pixels.ndim == 4 else [frame.pixels]


class VideoRun:
    """One video: iterate :meth:`lines` for the response body."""

    def __init__(
        self,
        pipe: Pipeline,
        worker: DecodeWorker,
        video: VideoInfo,
        params: VideoParams,
        window: int,
        request_id: str | None,
        first: Frame,
        plan: TilePlan | None = None,
    ) -> None:
        self.pipe = pipe
        self.worker = worker
        self._first: Frame | None = first  # read before answering: a video has frames
        self.video = video
        self.params = params
        self.window = window
        self.request_id = request_id
        self.rate = min(params.fps, video.fps) if video.fps > 0 else params.fps
        self.plan = plan  # each frame's tiles, as the worker cuts them (None: frames whole)

    async def lines(self) -> AsyncIterator[bytes]:
        backend = self.pipe.backend
        loop = asyncio.get_running_loop()
        pin = backend.pin()
        info = pin.info if pin is not None else backend.info
        pending: collections.deque[tuple[Frame, asyncio.Future]] = collections.deque()
        stages = _Stages()
        tracker = (
            Tracker(
                self.rate,
                self.params.detect.postprocess.score_threshold,
                span=max(self.video.width, self.video.height),
            )
            if self.params.track
            else None
        )
        counter = LineCounter(list(self.params.lines)) if self.params.lines else None
        processed, last_pts, reading = 0, 0.0, True
        try:
            while True:
                while reading and len(pending) < self.window:
                    t = time.perf_counter()
                    frame, self._first = self._first or await self.worker.next(), None
                    stages.decode_wait += time.perf_counter() - t
                    if frame is None:
                        reading = False
                        break
                    work = self.pipe.batcher.submit(
                        _inputs(frame),
                        deadline=time.perf_counter() + self.pipe.timeout_s,
                        pin=pin,
                        background=True,
                    )
                    pending.append((frame, asyncio.ensure_future(work)))
                if not pending:
                    break
                frame, future = pending.popleft()
                t = time.perf_counter()
                results: list[BatchResult] = await future
                if len(results) > 1:  # a frame's tiles: all from one version, as for an image
                    results = await self.pipe.infer_one_version(
                        _inputs(frame),
                        time.perf_counter() + self.pipe.timeout_s,
                        pin,
                        background=True,
                        first=results,
                    )
                result = results[0]
                stages.model_wait += time.perf_counter() - t
                line: dict = {"frame": frame.index, "pts_s": round(frame.pts_s, 6)}
                if result.candidates.version != info.version:  # Triton picked another one
                    answered = backend.info_for(result.candidates.version)
                    if answered.version != info.version:
                        line["model_version_changed"] = {
                            "from": info.version,
                            "to": answered.version,
                        }
                        info = answered
                line["model_version"] = info.version
                # NMS and tracking off the event loop (one frame at a time: the tracker's order)
                line["detections"] = await loop.run_in_executor(
                    self.pipe.pool, self._detections, results, info, tracker, counter, stages, line
                )
                processed += 1
                last_pts = frame.pts_s
                yield ndjson(line)
        except (VideoError, ApiError) as exc:
            yield error_line(exc.status, exc.code, exc.message, self.request_id)
            return
        finally:  # no await here: a client that went away cancels every await that follows
            for _, future in pending:
                future.cancel()  # its frames leave the batcher's queue
            if pin is not None:
                backend.unpin(pin)
            self.worker.kill()
        yield ndjson(self._summary(info, processed, last_pts, tracker, counter, stages))

    def _detections(
        self,
        results: list[BatchResult],
        info: ModelInfo,
        tracker: Tracker | None,
        counter: LineCounter | None,
        stages: _Stages,
        line: dict,
    ) -> list[dict]:
        t0 = time.perf_counter()
        tile_merge = self.pipe.tile_merge
        out, det = frame_detections(
            results, info, self.params.detect, self.plan, tile_merge, self.video.width,
            self.video.height,
        )  # fmt: skip
        t1 = time.perf_counter()
        stages.postprocess += t1 - t0
        if tracker is None:
            return out
        crossings = track_detections(out, det, tracker, counter)
        if crossings:
            line["crossings"] = crossings
        stages.tracking += time.perf_counter() - t1
        return out

    def _summary(
        self,
        info: ModelInfo,
        processed: int,
        last_pts: float,
        tracker: Tracker | None,
        counter: LineCounter | None,
        stages: _Stages,
    ) -> dict:
        names = info.classes.name
        lines = []
        if counter is not None:
            for line, counts in zip(self.params.lines, counter.counts()):
                lines.append(
                    {
                        "line": [line.x1, line.y1, line.x2, line.y2],
                        "in": {names(k): v for k, v in sorted(counts["in"].items())},
                        "out": {names(k): v for k, v in sorted(counts["out"].items())},
                    }
                )
        total = time.perf_counter() - stages.started
        return {
            "summary": {
                "frames_decoded": self.worker.decoded,
                "frames_processed": processed,
                "duration_s": round(max(self.video.duration_s, last_pts), 6),
                "fps_sampled": self.rate,
                "width": self.video.width,
                "height": self.video.height,
                "video": {
                    "container": self.video.container,
                    "codec": self.video.codec,
                    "fps": self.video.fps,
                },
                "tracks": (
                    {names(k): v for k, v in sorted(tracker.tracks_per_class.items())}
                    if tracker is not None
                    else None
                ),
                "lines": lines,
                "tiles": describe(self.plan) if self.plan is not None else None,
                "model": model_body(info),
                "request_id": self.request_id,
                "timings_ms": {
                    "decode_wait": round(stages.decode_wait * 1e3, 1),
                    "model_wait": round(stages.model_wait * 1e3, 1),
                    "postprocess": round(stages.postprocess * 1e3, 1),
                    "tracking": round(stages.tracking * 1e3, 1),
                    "total": round(total * 1e3, 1),
                },
                "frames_per_second": round(processed / total, 3) if total > 0 else None,
            }
        }


def frame_detections(
    results: list[BatchResult],
    info: ModelInfo,
    detect: DetectParams,
    plan: TilePlan | None,
    tile_merge: str,
    width: int,
    height: int,
) -> tuple[list[dict], Detections]:
    """A frame's detections in its pixels (and as NMS gave them: scores, contiguous labels):
    NMS on the model's output (of the frame, or of its tiles merged), the classes the request
    keeps, labels of the version that answered."""
    pp, allowed = detect.postprocess, detect.allowed(info.classes)
    dets = [run_detections(r, pp, allowed) for r in results]  # the frame's, or its tiles'
    det = merge_tiles(plan, dets, tile_merge, pp) if plan is not None else dets[0]
    out = to_pixel_detections(det.boxes, det.scores, det.classes, width, height, info.classes)
    return out, det


def track_detections(
    detections: list[dict], det: Detections, tracker: Tracker, counter: LineCounter | None
) -> list[dict]:
    """Each detection's ``track_id`` set (None: not confirmed yet); the line crossings of this
    frame, in the answer's form."""
    pixels = np.asarray(
        [[d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]] for d in detections],
        dtype=np.float64,
    ).reshape(-1, 4)
    ids = tracker.update(pixels, det.scores, det.classes)
    for d, track_id in zip(detections, ids.tolist()):
        d["track_id"] = track_id if track_id >= 0 else None
    if counter is None:
        return []
    return [
        {"line": index, "track_id": track, "direction": direction}
        for index, track, direction in counter.update(pixels, det.classes, ids)
    ]


def count_crossings(counts: list[dict], crossings: list[dict]) -> None:
    """Each crossing (with its ``label``) added to its line's ``in``/``out`` tally by label
    (``?`` where the label is not known)."""
    for c in crossings:
        tally = counts[c["line"]][c["direction"]]
        label = c.get("label") or "?"
        tally[label] = tally.get(label, 0) + 1
