"""The FastAPI app: thin routes over the pipeline; resources live in the lifespan."""

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp

from service import errors
from service.admission import InFlight, UploadAdmission, parse_networks
from service.backends import Backend
from service.batching import MicroBatcher
from service.edge import BodyDeadline, EdgeMiddleware
from service.errors import ApiError
from service.imaging import ImageLimits
from service.metrics import Metrics
from service.model_versions import VersionFollower
from service.multipart import read_uploads
from service.pipeline import DetectParams, Pipeline
from service.settings import Settings

log = logging.getLogger("service")
STATIC = Path(__file__).with_name("static")
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


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "triton":
        from service.backends.triton import TritonBackend

        return TritonBackend(
            settings.triton_url,
            settings.model_name,
            settings.triton_timeout_s,
            settings.model_repository,
            model_control=settings.triton_model_control,
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


async def disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read whole before: what the server
    receives now is the disconnect, or nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0)


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
            settings.batch_max_queued_images,
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
        app.state.in_flight = InFlight(settings.max_in_flight, metrics)
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
        params = DetectParams.of(score_threshold, iou_threshold, max_detections, wanted)
        params.allowed(pipe.backend.info.classes)  # an unknown class: 422 before the upload
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
        with request.app.state.in_flight.place():
            body = await unless_disconnected(request, pipe.detect(uploads, params))
        body["request_id"] = request.state.request_id
        return JSONResponse(body)

    async def unless_disconnected(request: Request, work: Coroutine[Any, Any, dict]) -> dict:
        """``work``, cancelled as soon as the client goes away (its images leave the batcher's
        queue; the model runs for answers someone waits for): 499, as nginx says it."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)  # our own cancel goes on
        if not task.cancelled():
            return task.result()
        metrics.rejected.labels("client_disconnected").inc()
        log.info("client went away before its answer (request %s)", request.state.request_id)
        raise ApiError(499, "client_closed_request", "the client closed the connection")

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
