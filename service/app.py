"""The FastAPI app: the lifespan's resources (backend, batcher, pipeline) wired to one router per
capability (``service/routes/``), inside the edge middleware."""

import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import start_http_server
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from service import errors
from service.addresses import SourcePolicy
from service.admission import InFlight, UploadAdmission, parse_networks
from service.backends import Backend
from service.batching import MicroBatcher
from service.edge import BodyDeadline, EdgeMiddleware
from service.errors import ApiError
from service.imaging import ImageLimits
from service.metrics import Metrics
from service.model_versions import VersionFollower
from service.pipeline import Pipeline
from service.routes import camera, images, models, pages, streams, videos
from service.routes.common import api_key_check
from service.settings import Settings
from service.streams.declared import StreamsFile
from service.streams.manager import StreamManager
from service.video.spool import VideoSpool

log = logging.getLogger("service")


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
        if be.info.version:
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
        follower = VersionFollower(be, settings.model_poll_s, metrics, settings.model_stale_after_s)
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
            max_tiles=settings.tile_budget,
            tile_merge=settings.tile_merge,
        )
        app.state.in_flight = InFlight(settings.max_in_flight, metrics)
        try:
            app.state.video_spool = VideoSpool(settings.video_dir)
        except OSError as exc:  # images are served all the same; videos say why they are not
            log.error("videos are not available: SSD_VIDEO_DIR cannot be written (%s)", exc)
            app.state.video_spool = None
        app.state.video_slots = videos.VideoSlots(
            settings.max_video_uploads, settings.max_videos, metrics
        )
        app.state.streams = StreamManager(
            app.state.pipeline, SourcePolicy(settings.stream_sources), settings, metrics
        )
        app.state.streams_file = None
        if settings.streams_file is not None:
            app.state.streams_file = StreamsFile(settings.streams_file, app.state.streams, settings)
            await app.state.streams_file.start()
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
            if app.state.streams_file is not None:
                await app.state.streams_file.close()
            await app.state.streams.close()
            await follower.close()
            await batcher.close()
            if app.state.video_spool is not None:
                app.state.video_spool.close()
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

    auth = api_key_check(settings)
    app.include_router(images.router(settings, metrics, auth))
    app.include_router(videos.router(settings, metrics, auth))
    app.include_router(streams.router(settings, metrics, auth))
    app.include_router(camera.router(settings, metrics, auth))
    app.include_router(models.router(settings, metrics, auth))
    app.include_router(pages.router(settings, auth))

    deadline = BodyDeadline(
        settings.body_read_timeout_s, settings.body_min_rate, settings.body_grace_s
    )
    admission = UploadAdmission(
        settings.upload_buffer_bytes,
        settings.max_uploads_per_client,
        metrics,
        settings.client_upload_bytes,
    )
    return EdgeMiddleware(
        app,
        settings.max_body_bytes,
        metrics,
        deadline,
        admission,
        parse_networks(settings.trusted_proxies),
        spooled={"/v1/videos": settings.max_video_bytes},
    )
