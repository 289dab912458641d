"""``POST /v1/detect``: still images, one or a batch."""

import json
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from service.addresses import SourcePolicy
from service.errors import ApiError
from service.metrics import Metrics
from service.multipart import read_uploads
from service.pipeline import DetectParams, Pipeline
from service.routes.common import client_gone_mid_upload, pipeline, unless_disconnected
from service.settings import Settings
from service.url_fetch import ImageFetcher
from ssdcore.tiling import TileSpec

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
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["image_url"],
                "properties": {
                    "image_url": {
                        "type": "string",
                        "maxLength": 4096,
                        "description": "an http(s) URL the service fetches the image from "
                        "(SSD_STREAM_SOURCES and the always-refused addresses apply)",
                    }
                },
            }
        },
        "image/jpeg": {"schema": _BINARY},
        "image/png": {"schema": _BINARY},
        "image/webp": {"schema": _BINARY},
    },
}


def detect_params(settings: Settings) -> Callable[..., DetectParams]:
    """The query parameters of every detecting route (images, videos), defaults from settings."""

    def params(
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
    ) -> DetectParams:
        wanted = tuple(classes.split(",")) if classes is not None else None
        return DetectParams.of(score_threshold, iou_threshold, max_detections, wanted)

    return params


_GRID = re.compile(r"([0-9]{1,3})x([0-9]{1,3})")


def tile_spec(tiles: str | None, size: int, overlap: float, whole: bool) -> TileSpec | None:
    """``tiles`` as a request says it (``auto``, a grid ``COLSxROWS``, unset or ``off``: none)
    -> what it asks for; 422 (ApiError) for anything else."""
    if tiles is None or tiles in ("", "off", "none"):
        return None
    if tiles == "auto":
        return TileSpec(None, size, overlap, whole)
    match = _GRID.fullmatch(tiles)
    if match is None or min(int(match[1]), int(match[2])) < 1:
        raise ApiError(
            422,
            "invalid_parameter",
            f"tiles must be auto or a grid COLSxROWS such as 4x3, got {tiles!r}",
        )
    return TileSpec((int(match[1]), int(match[2])), size, overlap, whole)


def tile_params(settings: Settings) -> Callable[..., TileSpec | None]:
    """The tiling query parameters (ssdcore/tiling.py), defaults from settings."""

    def params(
        tiles: Annotated[
            str | None,
            Query(
                max_length=16,
                description="run the model on overlapping tiles for small objects: `auto` "
                "(tiles of about tile_size pixels) or a grid COLSxROWS such as `4x3`; "
                "unset: the whole image once",
            ),
        ] = None,
        tile_size: Annotated[
            int,
            Query(ge=32, le=16_384, description="tiles=auto's tile side in pixels"),
        ] = settings.tile_size,
        tile_overlap: Annotated[
            float,
            Query(ge=0.0, le=0.75, description="overlap of neighbouring tiles (of a side)"),
        ] = settings.tile_overlap,
        tile_whole: Annotated[
            bool, Query(description="run the whole image too (large objects)")
        ] = True,
    ) -> TileSpec | None:
        return tile_spec(tiles, tile_size, tile_overlap, tile_whole)

    return params


MAX_JSON_BYTES = 16 * 1024


async def image_url_of(request: Request) -> str:
    """The ``image_url`` of a JSON body."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise ApiError(
                413, "payload_too_large", f"a JSON body is {MAX_JSON_BYTES} bytes at most"
            )
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not JSON") from None
    if not isinstance(doc, dict) or "image_url" not in doc:  # JSON, and not ours
        raise ApiError(
            415,
            "unsupported_media_type",
            "send multipart/form-data with an 'image' field, an image/* body, or JSON "
            '{"image_url": "https://..."}',
        )
    url = doc["image_url"]
    if not isinstance(url, str) or not url.strip() or len(url) > 4096:
        raise ApiError(
            422, "invalid_image_url", 'send {"image_url": "https://..."} (a string, 4096 at most)'
        )
    return url


def router(settings: Settings, metrics: Metrics, auth: Callable) -> APIRouter:
    api = APIRouter(dependencies=[Depends(auth)])
    fetcher = ImageFetcher(
        SourcePolicy(settings.stream_sources),
        settings.max_body_bytes,
        settings.image_url_timeout_s,
        settings.image_url_max_redirects,
        settings.max_url_fetches,
        settings.image_url_ca_file,
    )

    @api.post(
        "/v1/detect",
        openapi_extra={"requestBody": DETECT_BODY},
        summary="Detect objects in one image or a batch",
        description=(
            "Send a multipart form with one file in `image` (or several in `images`), or a raw "
            '`image/jpeg`, `image/png` or `image/webp` body, or JSON `{"image_url": ...}` '
            "(fetched by the service: http/https, addresses checked, the limits of an upload). "
            "Boxes are in pixels of the displayed "
            "(EXIF-oriented) image. With `tiles=auto` (or a grid), small objects in large "
            "images are found on overlapping tiles; each image then says its `tiles` and the "
            "response its `model_runs`."
        ),
        responses={
            400: {"description": "bad image"},
            403: {"description": "image_url names a refused address or scheme"},
            413: {"description": "body too large"},
            415: {"description": "unsupported body"},
            422: {"description": "bad parameter, or more tiles than a request may run"},
            503: {"description": "overloaded"},
            504: {"description": "deadline exceeded"},
        },
    )
    async def detect(
        request: Request,
        pipe: Annotated[Pipeline, Depends(pipeline)],
        params: Annotated[DetectParams, Depends(detect_params(settings))],
        tiles: Annotated[TileSpec | None, Depends(tile_params(settings))],
    ) -> JSONResponse:
        params = replace(params, tiling=tiles)
        params.allowed(pipe.backend.info.classes)  # an unknown class: 422 before the upload
        pipe.check_tiles(params)  # a grid beyond the limit: 422 before the upload
        # uploads and inference are bounded apart: a partial upload holds bytes of the upload
        # buffer (the edge's admission, until its body deadline at most), never a model slot
        try:
            ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json":
                url = await image_url_of(request)  # the body is read: a disconnect shows
                uploads = [await unless_disconnected(request, fetcher.fetch(url), metrics)]
            else:
                uploads = await read_uploads(request, settings.max_files)
        except ClientDisconnect:
            raise client_gone_mid_upload(request, metrics) from None
        with request.app.state.in_flight.place():
            body = await unless_disconnected(request, pipe.detect(uploads, params), metrics)
        body["request_id"] = request.state.request_id
        return JSONResponse(body)

    return api
