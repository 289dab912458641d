"""The web page, ``/docs`` and ``/openapi.json`` (open unless ``SSD_OPEN_PAGES=false``)."""

from collections.abc import Callable
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response

from service.settings import Settings

STATIC = Path(__file__).resolve().parents[1] / "static"


def router(settings: Settings, auth: Callable) -> APIRouter:
    api = APIRouter(
        include_in_schema=False, dependencies=[] if settings.open_pages else [Depends(auth)]
    )

    @api.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/openapi.json")
    async def openapi(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @api.get("/docs")
    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - API")

    return api
