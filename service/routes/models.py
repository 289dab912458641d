"""``GET /v1/models`` and the probes (``/livez``, ``/readyz``) and ``/metrics``."""

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.metrics import Metrics
from service.pipeline import Pipeline
from service.routes.common import pipeline
from service.settings import Settings


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter()

    @api.get(
        "/v1/models",
        dependencies=[Depends(auth)],
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
                        "stale": versions.stale,
                    },
                }
            ],
            "defaults": {
                "score_threshold": settings.score_threshold,
                "iou_threshold": settings.iou_threshold,
                "max_detections": settings.max_detections,
            },
        }

    @api.get("/livez", summary="The process is alive")
    async def livez() -> dict:
        return {"status": "ok"}

    @api.get("/readyz", summary="The backend's model is ready")
    async def readyz(request: Request) -> JSONResponse:
        if getattr(request.app.state, "draining", False):
            return JSONResponse({"ready": False, "draining": True}, status_code=503)
        pipe = getattr(request.app.state, "pipeline", None)
        ok = pipe is not None and await pipe.backend.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    if settings.metrics_port is None:  # otherwise on its own port, without the key

        @api.get("/metrics", include_in_schema=False, dependencies=[Depends(auth)])
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return api
