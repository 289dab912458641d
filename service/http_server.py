"""The HTTP server: uvicorn (the only module that configures it), with the timeouts a service
exposed to a network needs (reliability spec §5; nginx, Envoy and uvicorn are the anchors).

- header deadline: a connection must finish a request's headers within ``header_timeout_s`` of
  connecting (or of starting the request on a kept-alive connection), else it is closed; nginx's
  ``client_header_timeout``, Envoy's ``request_headers_timeout``. uvicorn has none (its
  ``timeout_keep_alive`` only runs after a response), so its httptools protocol is extended here.
- keep-alive: idle connections are closed ``keep_alive_s`` after their last response (uvicorn).
- connection cap: beyond ``max_connections`` open connections (or tasks) new requests get an
  immediate 503 (uvicorn's ``limit_concurrency``, nginx's ``limit_conn``).
- the body deadline (a stalled or trickling upload gets 408) is the edge middleware's
  (``service.edge.EdgeMiddleware``): it sees every ``receive`` of the body.
"""

from __future__ import annotations

import asyncio
import logging
import resource

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings

log = logging.getLogger("service.http")


def header_deadline_protocol(timeout_s: float, on_timeout=None) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a deadline on every request's headers."""

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._header_timer is None:  # a further request on a kept-alive connection
                self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                if on_timeout is not None:
                    on_timeout()
                self.transport.close()

    return HeaderDeadlineProtocol


def server_config(app, settings: Settings, log_level: str = "info", **extra) -> uvicorn.Config:
    """The uvicorn configuration of the service (also what the tests run)."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        http=header_deadline_protocol(settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=30,
        # the standard event loop, not uvloop: uvloop starts a child process (the video and
        # stream workers) by running Python's after-fork handlers in the forked child, which
        # in a gateway full of threads frees other threads' objects there; FFmpeg's (with
        # threads of their own) then hang the child for ever, and the gateway's loop with it
        # (seen: a CI run stuck in test_fairness, the child in sws_freeContext). The standard
        # loop's subprocesses run no Python between fork and exec.
        loop="asyncio",
        ws_max_size=settings.max_body_bytes + 4096,  # a camera frame, as an upload at most
        **extra,
    )


def raise_open_files_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (each connection is a descriptor): (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, target, exc)
    return soft, hard
