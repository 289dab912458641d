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

from service.metrics import Metrics
from service.settings import Settings
from service.streams.manager import StreamManager
from service.streams.params import StreamRequest


def manager(request: Request) -> StreamManager:
    return request.app.state.streams


def sse(kind: str, body: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])

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
        stream = await streams.add(body.params(settings, streams.pipe.backend.info.classes))
        return stream.describe()

    @api.get("/v1/streams", summary="Every stream: state, rates, lag, drops, reconnects")
    async def list_streams(
        request: Request, streams: Annotated[StreamManager, Depends(manager)]
    ) -> dict:
        body: dict = {"streams": [s.describe() for s in streams.streams.values()]}
        declared = request.app.state.streams_file
        if declared is not None:
            body["file"] = declared.describe()
        return body

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
