"""``/v1/streams``: live sources (RTSP cameras, MJPEG over HTTP) detected, tracked and counted
continuously (service/streams/); their events as Server-Sent Events.

Events are Server-Sent Events rather than a WebSocket: one direction is all a subscriber needs,
a browser's ``EventSource`` reconnects by itself, and they pass every HTTP proxy, curl and the
API key header unchanged."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from service.metrics import Metrics
from service.pipeline import DetectParams
from service.routes.videos import lines_of
from service.settings import Settings
from service.streams.manager import StreamManager, StreamParams


class StreamRequest(BaseModel):
    source: str = Field(
        max_length=2048,
        description="rtsp://, rtsps:// (a camera), or http(s):// sending MJPEG "
        "(multipart/x-mixed-replace)",
    )
    name: str | None = Field(None, max_length=200, description="a name of yours for it")
    fps: float | None = Field(None, gt=0, description="frames a second to detect on")
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


def manager(request: Request) -> StreamManager:
    return request.app.state.streams


def sse(kind: str, body: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])

    def params_of(body: StreamRequest, streams: StreamManager) -> StreamParams:
        detect = DetectParams.of(
            body.score_threshold if body.score_threshold is not None else settings.score_threshold,
            body.iou_threshold if body.iou_threshold is not None else settings.iou_threshold,
            body.max_detections or settings.max_detections,
            tuple(body.classes) if body.classes is not None else None,
        )
        detect.allowed(streams.pipe.backend.info.classes)  # an unknown class: 422 now
        fps = min(body.fps or settings.stream_fps, settings.video_max_fps)
        return StreamParams(body.source, fps, detect, lines_of(body.lines), body.name)

    @api.post(
        "/v1/streams",
        status_code=201,
        summary="Start detecting, tracking and counting on a live source",
        responses={
            422: {"description": "a refused or unresolvable source, a bad parameter"},
            503: {"description": "SSD_MAX_STREAMS streams run already"},
        },
    )
    async def start_stream(
        body: StreamRequest, streams: Annotated[StreamManager, Depends(manager)]
    ) -> dict:
        stream = await streams.add(params_of(body, streams))
        return stream.describe()

    @api.get("/v1/streams", summary="Every stream: state, rates, lag, drops, reconnects")
    async def list_streams(streams: Annotated[StreamManager, Depends(manager)]) -> dict:
        return {"streams": [s.describe() for s in streams.streams.values()]}

    @api.get("/v1/streams/{stream_id}", summary="One stream")
    async def get_stream(
        stream_id: str, streams: Annotated[StreamManager, Depends(manager)]
    ) -> dict:
        return streams.get(stream_id).describe()

    @api.delete("/v1/streams/{stream_id}", status_code=204, summary="Stop a stream")
    async def stop_stream(
        stream_id: str, streams: Annotated[StreamManager, Depends(manager)]
    ) -> Response:
        await streams.remove(stream_id)
        return Response(status_code=204)

    @api.get(
        "/v1/streams/{stream_id}/events",
        summary="The stream's events (Server-Sent Events)",
        description=(
            "`frame` (detections with track ids, crossings, lag, frames skipped), `state` "
            "(connecting, running, reconnecting, failed, stopped, with the reason), "
            "`model_version_changed`, and `heartbeat` when nothing else happened for "
            "SSD_STREAM_HEARTBEAT_S. An event after some were lost (a subscriber slower than "
            "the stream) carries `missed`: how many."
        ),
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        stream_id: str, request: Request, streams: Annotated[StreamManager, Depends(manager)]
    ) -> StreamingResponse:
        stream = streams.get(stream_id)
        subscriber = stream.subscribe()

        async def body() -> AsyncIterator[bytes]:
            try:
                yield sse("state", {"stream": stream.id, **stream.describe()})
                while True:
                    event = await subscriber.next(settings.stream_heartbeat_s)
                    if event is not None:
                        yield sse(event["event"], event)
                    elif subscriber.closed:  # the stream stopped or failed: said above
                        break
                    else:
                        yield sse("heartbeat", {"stream": stream.id, "state": stream.state})
            finally:
                stream.unsubscribe(subscriber)

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    return api
