"""The gateway's edge: the outermost ASGI layer, before any route (reliability spec §5).

Request ids, the header-size and body-size caps (counted on the stream), the body deadline (a
stalled or trickling upload gets 408), upload admission (``service/admission.py``) and the
request metrics. The header deadline, keep-alive and connection cap are uvicorn's
(``service/http_server.py``).
"""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admission import UploadAdmission, UploadDropped, client_address
from service.errors import ApiError, error_body
from service.metrics import Metrics

_ROUTES = {
    "/v1/detect",
    "/v1/videos",
    "/v1/models",
    "/livez",
    "/readyz",
    "/metrics",
    "/",
    "/docs",
    "/openapi.json",
}
MAX_HEADER_BYTES = 32 * 1024
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass(frozen=True)
class BodyDeadline:
    """How long a request body may take: at most ``read_timeout_s`` between two reads (nginx's
    ``client_body_timeout``), and, once ``grace_s`` have passed, ``min_rate`` bytes/s on average
    (a trickle of a byte now and then never holds a connection for long)."""

    read_timeout_s: float
    min_rate: int
    grace_s: float

    def wait_s(self, elapsed: float, received: int) -> float:
        """Seconds the next piece of the body may still take."""
        if self.min_rate <= 0:
            return self.read_timeout_s
        rate_deadline = max(self.grace_s, received / self.min_rate)
        return min(self.read_timeout_s, rate_deadline - elapsed)


class EdgeMiddleware:
    """Outermost ASGI layer: request id, body-size cap, body deadline, request metrics.

    The body cap refuses a too large ``Content-Length`` before reading anything and counts the
    bytes actually received (chunked bodies, lying headers), stopping at the cap: Starlette and
    uvicorn put no total limit on multipart bodies themselves. The body deadline answers a
    stalled or trickling upload with 408 and closes its connection. A body still arriving after
    a read holds a place in the upload admission (``service/admission.py``) until it is whole.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        metrics: Metrics,
        deadline: BodyDeadline,
        admission: UploadAdmission,
        trusted_proxies: list | None = None,
        spooled: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body = max_body
        # paths whose bodies go to a file as they arrive: their own cap, no place in the buffer
        self.spooled = spooled or {}
        self.metrics = metrics
        self.deadline = deadline
        self.admission = admission
        self.trusted = trusted_proxies or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        route = scope["path"] if scope["path"] in _ROUTES else "unmatched"
        status_holder = {"status": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            if sum(len(k) + len(v) for k, v in scope.get("headers") or []) > MAX_HEADER_BYTES:
                response = JSONResponse(
                    error_body("headers_too_large", "request headers are too large", request_id),
                    status_code=431,
                )
                await response(scope, receive, send_wrapper)
                return
            max_body = self.spooled.get(scope["path"], self.max_body)
            spooled = scope["path"] in self.spooled
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > max_body):
                await self._too_large(scope, receive, send_wrapper, request_id, max_body)
                return
            received, started, body_done = 0, None, False
            upload = None  # a place in the admission while the body is partial
            loop = asyncio.get_running_loop()

            async def receive_guarded() -> Message:
                nonlocal received, started, body_done, upload
                if body_done:  # waiting for a disconnect, not for the body: no deadline
                    return await receive()
                started = loop.time() if started is None else started
                wait_s = self.deadline.wait_s(loop.time() - started, received)
                if upload is not None and upload.dropped:
                    raise UploadDropped(received)
                try:
                    async with asyncio.timeout(max(wait_s, 0.0)) as timer:
                        if upload is not None:
                            upload.timer = timer
                        message = await receive()
                except TimeoutError:
                    if upload is not None and upload.dropped:  # others were arriving faster
                        raise UploadDropped(received) from None
                    self.metrics.rejected.labels("slow_body").inc()
                    raise ApiError(
                        408,
                        "request_timeout",
                        f"the request body did not arrive in time ({received} bytes received)",
                        {"Connection": "close"},
                    ) from None
                finally:
                    if upload is not None:
                        upload.timer = None
                if message["type"] == "http.request":
                    size = len(message.get("body", b""))
                    received += size
                    body_done = not message.get("more_body", False)
                    if received > max_body:
                        raise ApiError(413, "payload_too_large", self._limit_text(max_body))
                    if body_done or spooled:
                        if upload is not None:
                            self.admission.finish(upload)
                    else:
                        if upload is None:
                            upload = self.admission.begin(
                                self._client(scope, headers),
                                int(declared) if declared is not None else self.max_body,
                                started,
                            )
                            size = received
                        self.admission.grow(upload, size, loop.time())
                return message

            try:
                await self.app(scope, receive_guarded, send_wrapper)
            finally:
                if upload is not None:
                    self.admission.finish(upload)
        finally:
            self.metrics.requests.labels(route, str(status_holder["status"])).inc()

    def start_draining(self) -> None:
        """Readiness off (``/readyz`` 503) from now on: the server is shutting down; the live
        streams' event streams end (they would hold the shutdown). Called from the signal
        handler."""
        self.app.state.draining = True
        streams = getattr(self.app.state, "streams", None)
        if streams is not None:
            streams.loop.call_soon_threadsafe(streams.end_subscriptions)

    def _client(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        peer = (scope.get("client") or (None,))[0]
        forwarded = headers.get(b"x-forwarded-for")
        return client_address(
            peer, forwarded.decode("latin-1") if forwarded else None, self.trusted
        )

    @staticmethod
    def _limit_text(max_body: int) -> str:
        return f"the request body is larger than {max_body} bytes"

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, max_body: int
    ) -> None:
        response = JSONResponse(
            error_body("payload_too_large", self._limit_text(max_body), request_id),
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)
