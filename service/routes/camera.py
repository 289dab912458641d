"""``/v1/camera`` (WebSocket): the browser's camera, or any client sending its frames, detected
and tracked frame by frame in one session.

A WebSocket rather than repeated ``POST /v1/detect``: one connection for the session (no request
and header per frame), and the session holds the tracker, so boxes come back with track ids and
line counts as for a video. The client sends a frame (JPEG, PNG or WebP bytes) and gets its
answer before it sends the next one: the flow control that keeps the newest frame at the model
(the page sends the camera's current picture each time an answer arrives).

Messages from the client: binary, one image each; text, JSON: ``{"api_key": "..."}`` first when
the service has a key and the client could not send the header (a browser cannot), and
``{"score_threshold": ..., "classes": [...], "lines": [[x1, y1, x2, y2], ...]}`` to change the
session's parameters (tracks restart). Answers: JSON, ``frame``, ``width``, ``height``,
``model_version``, ``detections`` (with ``track_id``), ``crossings``, ``counts`` per line,
``timings_ms``; or ``{"error": {...}}`` for a frame that is not an image (the session goes on).
Frames are foreground work at the micro-batcher, as image requests: someone is watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from service.errors import ApiError
from service.metrics import Metrics
from service.pipeline import DetectParams, Pipeline
from service.routes.common import key_matches
from service.routes.videos import lines_of
from service.settings import Settings
from service.video.processing import count_crossings, frame_detections, track_detections
from service.video.tracking import LineCounter, Tracker

log = logging.getLogger("service")
POLICY_VIOLATION = 1008
TRY_AGAIN_LATER = 1013
AUTH_WAIT_S = 5.0  # a session without the key header must send it first, within this
IDLE_S = 60.0  # a session sending nothing for this long is closed
MAX_SETTINGS_BYTES = 64 * 1024


def _settings_message(text: str) -> dict:
    """A text message: a JSON object of the session's settings (422 ApiError otherwise)."""
    if len(text) > MAX_SETTINGS_BYTES:
        raise ApiError(422, "invalid_parameter", f"settings of {MAX_SETTINGS_BYTES} bytes at most")
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        raise ApiError(422, "invalid_parameter", "not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(422, "invalid_parameter", "a JSON object")
    return body


class CameraSession:
    """One connection's parameters, tracker and counts."""

    def __init__(self, settings: Settings, pipe: Pipeline) -> None:
        self.settings, self.pipe = settings, pipe
        self.detect = DetectParams.of(
            settings.score_threshold, settings.iou_threshold, settings.max_detections
        )
        self.lines: tuple = ()
        self.frames = 0
        self.started = time.monotonic()
        self.tracker: Tracker | None = None
        self.counter: LineCounter | None = None
        self.counts: list[dict] = []
        self.classes = None

    def configure(self, body: dict) -> None:
        """New parameters (422 ApiError when wrong); tracks and counts start again."""
        unknown = set(body) - {"score_threshold", "classes", "lines", "api_key"}
        if unknown:
            raise ApiError(422, "invalid_parameter", f"unknown fields: {sorted(unknown)}")
        threshold = body.get("score_threshold", self.detect.postprocess.score_threshold)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not 0.0 <= threshold <= 1.0
        ):
            raise ApiError(422, "invalid_parameter", "score_threshold: a number in [0, 1]")
        classes = body.get("classes")
        if classes is not None and (
            not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
        ):
            raise ApiError(422, "invalid_parameter", "classes: a list of names or ids")
        detect = DetectParams.of(
            float(threshold),
            self.settings.iou_threshold,
            self.settings.max_detections,
            tuple(classes) if classes is not None else None,
        )
        detect.allowed(self.pipe.backend.info.classes)
        self.lines = lines_of(body.get("lines", []))
        self.detect = detect
        self.tracker = None

    async def answer(self, data: bytes) -> dict:
        pipe = self.pipe
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        image = await loop.run_in_executor(pipe.pool, pipe.decode_one, data)
        t1 = time.perf_counter()
        results = await pipe.batcher.submit([image.pixels], deadline=t0 + pipe.timeout_s)
        t2 = time.perf_counter()
        model = pipe.backend.info_for(results[0].candidates.version)
        if self.tracker is None or model.classes != self.classes:
            rate = self.frames / max(time.monotonic() - self.started, 1e-3) if self.frames else 10
            self.tracker = Tracker(
                rate, self.detect.postprocess.score_threshold, max(image.width, image.height)
            )
            self.counter = LineCounter(list(self.lines)) if self.lines else None
            self.counts = [{"in": {}, "out": {}} for _ in self.lines]
            self.classes = model.classes

        def detect() -> tuple[list[dict], list[dict]]:
            detections, det = frame_detections(
                results, model, self.detect, None, pipe.tile_merge, image.width, image.height
            )
            assert self.tracker is not None
            return detections, track_detections(detections, det, self.tracker, self.counter)

        detections, crossings = await loop.run_in_executor(pipe.pool, detect)
        labels = {d["track_id"]: d["label"] for d in detections}
        for c in crossings:
            c["label"] = labels.get(c["track_id"])
        count_crossings(self.counts, crossings)
        self.frames += 1
        t3 = time.perf_counter()
        return {
            "frame": self.frames - 1,
            "width": image.width,
            "height": image.height,
            "model_version": model.version,
            "detections": detections,
            "crossings": crossings,
            "counts": self.counts,
            "timings_ms": {
                "decode": round((t1 - t0) * 1e3, 1),
                "model": round((t2 - t1) * 1e3, 1),
                "postprocess": round((t3 - t2) * 1e3, 1),
                "total": round((t3 - t0) * 1e3, 1),
            },
        }


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter()
    sessions = {"open": 0}

    @api.websocket("/v1/camera")
    async def camera(ws: WebSocket) -> None:
        await ws.accept()
        authorised = key_matches(settings, ws.headers.get("x-api-key"))
        if not authorised:  # the key as the first message, soon and short, before a slot
            try:
                async with asyncio.timeout(AUTH_WAIT_S):
                    message = await ws.receive()
            except TimeoutError:
                await ws.close(POLICY_VIOLATION, "the API key did not come")
                return
            text = message.get("text")
            given = None
            if text is not None and len(text) <= 1024:
                with contextlib.suppress(ValueError, AttributeError, RecursionError):
                    given = json.loads(text).get("api_key")
            if not key_matches(settings, given if isinstance(given, str) else None):
                await ws.close(POLICY_VIOLATION, "missing or wrong API key")
                return
        if sessions["open"] >= settings.max_camera_sessions:
            metrics.rejected.labels("too_many_camera_sessions").inc()
            await ws.close(TRY_AGAIN_LATER, "too many camera sessions (SSD_MAX_CAMERA_SESSIONS)")
            return
        sessions["open"] += 1
        pipe: Pipeline = ws.app.state.pipeline
        session = CameraSession(settings, pipe)
        try:
            while True:
                try:
                    async with asyncio.timeout(IDLE_S):
                        message = await ws.receive()
                except TimeoutError:
                    await ws.close(1000, f"no frame for {IDLE_S:g} s")
                    return
                if message["type"] == "websocket.disconnect":
                    return
                text, data = message.get("text"), message.get("bytes")
                try:
                    if text is not None:
                        body = _settings_message(text)
                        if set(body) == {"api_key"}:
                            continue  # a key sent anyway where none is needed: no answer
                        session.configure(body)
                        await ws.send_json({"configured": True})
                        continue
                    if not data:
                        raise ApiError(400, "empty_file", "the frame is empty")
                    if len(data) > settings.max_body_bytes:
                        raise ApiError(413, "payload_too_large", "the frame is too large")
                    await ws.send_json(await session.answer(data))
                except ApiError as exc:
                    error = {"status": exc.status, "code": exc.code, "message": exc.message}
                    await ws.send_json({"error": error})
                except (WebSocketDisconnect, asyncio.CancelledError):
                    raise
                except Exception:  # ours: said, logged, and the session goes on
                    log.exception("camera session: unexpected error")
                    error = {"status": 500, "code": "internal_error", "message": "see the log"}
                    await ws.send_json({"error": error})
        except WebSocketDisconnect:
            pass
        finally:
            sessions["open"] -= 1

    return api
