"""What the routers share: the API key check, the pipeline, cancellation on client disconnect."""

import asyncio
import hmac
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request

from service.errors import ApiError
from service.metrics import Metrics
from service.pipeline import Pipeline
from service.settings import Settings

log = logging.getLogger("service")
T = TypeVar("T")


def key_matches(settings: Settings, given: str | None) -> bool:
    """Whether ``given`` is the service's API key (always, when none is set); constant time."""
    if settings.api_key is None:
        return True
    expected = settings.api_key.get_secret_value()
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def api_key_check(settings: Settings) -> Callable[[Request], None]:
    """The dependency every /v1 route takes: X-API-Key, or ``Authorization: Bearer KEY`` (what a
    Prometheus scrape job sends); nothing to check when no key is set."""

    def require_api_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("x-api-key")
        if given is None:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""
        if not key_matches(settings, given):
            raise ApiError(
                401, "unauthorized", "missing or wrong X-API-Key", {"WWW-Authenticate": "ApiKey"}
            )

    return require_api_key


def pipeline(request: Request) -> Pipeline:
    return request.app.state.pipeline


async def disconnected(request: Request) -> None:
    """Returns when the client has gone away (the body was read whole before: what the server
    receives now is the disconnect, or nothing)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0)


async def unless_disconnected(
    request: Request, work: Coroutine[Any, Any, T], metrics: Metrics
) -> T:
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


def client_gone_mid_upload(request: Request, metrics: Metrics) -> ApiError:
    """The client's doing, not a server error: nginx's 499."""
    metrics.rejected.labels("client_disconnected").inc()
    log.info("client went away during its upload (request %s)", request.state.request_id)
    return ApiError(499, "client_closed_request", "the client closed the connection mid-upload")
