"""The FastAPI app: thin routes over the pipeline; resources live in the lifespan."""

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import errors
from service.admission import UploadAdmission, UploadDropped, client_address, parse_networks
from service.backends import Backend
from service.batching import MicroBatcher
from service.errors import ApiError, error_body
from service.imaging import ImageLimits
from service.metrics import Metrics
from service.model_versions import VersionFollower
from service.multipart import read_form
from service.pipeline import DetectParams, Pipeline
from service.settings import Settings

log = logging.getLogger("service")
STATIC = Path(__file__).with_name("static")
_ROUTES = {
    "/v1/detect",
    "/v1/models",
    "/livez",
    "/readyz",
    "/metrics",
    "/",
    "/docs",
    "/openapi.json",
}
MAX_HEADER_BYTES = 32 * 1024
_BINARY = {"type": "string", "format": "binary"}
DETECT_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {**_BINARY, "description": "one image (JPEG, PNG or WebP)"},
                    "images": {"type": "array", "items": _BINARY, "description": "a batch"},
                },
            }
        },
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
        "image/webp": {"schema": _BINARY},
    },
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(
            settings.triton_url,
            settings.model_name,
            settings.triton_timeout_s,
            settings.model_repository,
        )
    if settings.backend == "openvino":
        from service.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(
            settings.model_repository,
            settings.model_name,
            settings.openvino_threads,
            settings.openvino_precision,
        )
    from service.backends.onnx import OnnxBackend

    return OnnxBackend(
        settings.model_repository,
        settings.model_name,
        settings.onnx_threads,
        settings.onnx_spinning,
    )


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
    ) -> None:
        self.app = app
        self.max_body = max_body
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
            declared = headers.get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
                await self._too_large(scope, receive, send_wrapper, request_id)
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
                    if received > self.max_body:
                        raise ApiError(413, "payload_too_large", self._limit_text())
                    if body_done:
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

    def _client(self, scope: Scope, headers: dict[bytes, bytes]) -> str:
        peer = (scope.get("client") or (None,))[0]
        forwarded = headers.get(b"x-forwarded-for")
        return client_address(
            peer, forwarded.decode("latin-1") if forwarded else None, self.trusted
        )

    def _limit_text(self) -> str:
        return f"the request body is larger than {self.max_body} bytes"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        response = JSONResponse(
            error_body("payload_too_large", self._limit_text(), request_id),
            status_code=413,
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> ASGIApp:
    """The ASGI app. ``backend`` may be injected (tests of faults); otherwise built from settings."""
    settings = settings or Settings()
    metrics = Metrics()
    if settings.api_key is None:
        log.warning("no SSD_API_KEY: the API is open to every client that can reach it")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend or build_backend(settings)
        await be.start()
        if be.info.random_weights:
            log.warning(
                "THE MODEL %s HAS RANDOM WEIGHTS: its detections are meaningless%s. "
                "Export a trained checkpoint with CHECKPOINT=... make serve",
                be.info.name,
                f" ({be.info.metadata['random_init_reason']})"
                if be.info.metadata.get("random_init_reason")
                else "",
            )
        log.info(
            "model %s: %d classes: %s",
            be.info.name,
            len(be.info.classes),
            be.info.classes.summary(),
        )
        batcher = MicroBatcher(
            be,
            settings.batch_max_size,
            settings.batch_max_delay_ms / 1e3,
            settings.backend_concurrency,
            metrics,
        )
        batcher.start()
        follower = VersionFollower(be, settings.model_poll_s, metrics)
        follower.start()
        app.state.follower = follower
        pool = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="decode")
        app.state.pipeline = Pipeline(
            be,
            batcher,
            pool,
            ImageLimits(settings.max_pixels, settings.max_side),
            settings.request_timeout_s,
            metrics,
            dct_scaling=settings.jpeg_dct_scaling,
        )
        app.state.in_flight = 0
        scrape = None
        if settings.metrics_port is not None:  # /metrics on its own port, without the key
            scrape, _ = start_http_server(
                settings.metrics_port, settings.host, registry=metrics.registry
            )
            log.info("metrics on http://%s:%d/metrics", settings.host, settings.metrics_port)
        try:
            yield
        finally:
            if scrape is not None:
                scrape.shutdown()
                scrape.server_close()
            await follower.close()
            await batcher.close()
            pool.shutdown(wait=True)
            await be.close()

    app = FastAPI(
        title="SSD300 detection service",
        version="1.0",
        summary="Object detection with SSD300 v1.1 (ResNet backbone) on the model's own classes",
        lifespan=lifespan,
        docs_url=None,  # served below, behind the key when SSD_OPEN_PAGES=false
        openapi_url=None,
    )
    app.add_exception_handler(ApiError, errors.api_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(Exception, errors.unexpected_error_handler)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["X-API-Key", "Content-Type"],
        )

    def require_api_key(request: Request) -> None:
        """X-API-Key, or ``Authorization: Bearer KEY`` (what a Prometheus scrape job sends)."""
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        expected = settings.api_key.get_secret_value()
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(
                401, "unauthorized", "missing or wrong X-API-Key", {"WWW-Authenticate": "ApiKey"}
            )

    def overloaded(limit: str, message: str) -> ApiError:
        metrics.rejected.labels(limit).inc()
        return ApiError(503, "overloaded", f"{message}; retry shortly", {"Retry-After": "1"})

    def pipeline(request: Request) -> Pipeline:
        return request.app.state.pipeline

    @app.post(
        "/v1/detect",
        dependencies=[Depends(require_api_key)],
        openapi_extra={"requestBody": DETECT_BODY},
        summary="Detect objects in one image or a batch",
        description=(
            "Send a multipart form with one file in `image` (or several in `images`), or a raw "
            "`image/jpeg`, `image/png` or `image/webp` body. Boxes are in pixels of the displayed "
            "(EXIF-oriented) image."
        ),
        responses={
            400: {"description": "bad image"},
            413: {"description": "body too large"},
            415: {"description": "unsupported body"},
            503: {"description": "overloaded"},
            504: {"description": "deadline exceeded"},
        },
    )
    async def detect(
        request: Request,
        pipe: Annotated[Pipeline, Depends(pipeline)],
        score_threshold: Annotated[float, Query(ge=0.0, le=1.0)] = settings.score_threshold,
        iou_threshold: Annotated[float, Query(gt=0.0, le=1.0)] = settings.iou_threshold,
        max_detections: Annotated[int, Query(ge=1, le=1000)] = settings.max_detections,
        classes: Annotated[
            str | None,
            Query(
                max_length=2000,
                description="comma-separated class names or category ids of this model "
                "(GET /v1/models lists them)",
            ),
        ] = None,
    ) -> JSONResponse:
        wanted = tuple(classes.split(",")) if classes is not None else None
        params = DetectParams(score_threshold, iou_threshold, max_detections, wanted)
        params.allowed(pipe.backend.info.classes)  # an unknown class: 422 before the upload
        state = request.app.state
        # uploads and inference are bounded apart: a partial upload holds bytes of the upload
        # buffer (the edge's admission, until its body deadline at most), never a model slot
        try:
            uploads = await read_uploads(request, settings.max_files)
        except ClientDisconnect:  # the client's doing, not a server error: nginx's 499
            metrics.rejected.labels("client_disconnected").inc()
            log.info("client went away during its upload (request %s)", request.state.request_id)
            raise ApiError(
                499, "client_closed_request", "the client closed the connection mid-upload"
            ) from None
        if state.in_flight >= settings.max_in_flight:
            raise overloaded("in_flight", "too many requests in flight")
        state.in_flight += 1
        metrics.in_flight.inc()
        try:
            body = await pipe.detect(uploads, params)
        finally:
            state.in_flight -= 1
            metrics.in_flight.dec()
        body["request_id"] = request.state.request_id
        return JSONResponse(body)

    @app.get(
        "/v1/models",
        dependencies=[Depends(require_api_key)],
        summary="The served model, its versions and the last one refused",
    )
    async def models(pipe: Annotated[Pipeline, Depends(pipeline)]) -> dict:
        info, versions = pipe.backend.info, pipe.backend.versions
        return {
            "models": [
                {
                    "name": info.name,
                    "version": info.version,
                    "backend": info.backend,
                    "engine": info.engine,
                    "candidates_per_image": info.topk,
                    "random_weights": info.random_weights,
                    "random_weights_reason": info.metadata.get("random_init_reason"),
                    "ready": await pipe.backend.ready(),
                    "classes": info.classes.public(),
                    "metadata": info.metadata,
                    "versions": {
                        "served": versions.served,
                        "present": versions.present,
                        "refused": versions.refused,
                        "switched_at": versions.switched_at,
                    },
                }
            ],
            "defaults": {
                "score_threshold": settings.score_threshold,
                "iou_threshold": settings.iou_threshold,
                "max_detections": settings.max_detections,
            },
        }

    @app.get("/livez", summary="The process is alive")
    async def livez() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="The backend's model is ready")
    async def readyz(request: Request) -> JSONResponse:
        if getattr(request.app.state, "draining", False):
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        pipe = getattr(request.app.state, "pipeline", None)
        ok = pipe is not None and await pipe.backend.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    if settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_api_key)])
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    pages = [] if settings.open_pages else [Depends(require_api_key)]

    @app.get("/", include_in_schema=False, dependencies=pages)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/openapi.json", include_in_schema=False, dependencies=pages)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=pages)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")

    deadline = BodyDeadline(
        settings.body_read_timeout_s, settings.body_min_rate, settings.body_grace_s
    )
    admission = UploadAdmission(
        settings.upload_buffer_bytes, settings.max_uploads_per_client, metrics
    )
    return EdgeMiddleware(
        app,
        settings.max_body_bytes,
        metrics,
        deadline,
        admission,
        parse_networks(settings.trusted_proxies),
    )


async def read_uploads(request: Request, max_files: int) -> list[bytes]:
    """The image bytes of a multipart form (`image` or `images`) or of a raw image body."""
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await read_form(content_type, request.stream(), max_files)
        single = [p for p in form.get("image", []) if p.is_file]
        many = [p for p in form.get("images", []) if p.is_file]
        if len(single) > 1 or (single and many):
            raise ApiError(
                400, "too_many_files", "send one file in 'image', or several in 'images'"
            )
        files = single or many
        if not files:
            raise ApiError(400, "missing_file", "no file in the form field 'image' or 'images'")
        return [bytes(p.data) for p in files]
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [await request.body()]
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data with an 'image' field, or an image/* body",
    )
