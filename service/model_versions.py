"""Following the model repository: a background task that asks the backend to move to the newest
version every ``SSD_MODEL_POLL_S`` seconds (and at once on SIGHUP; on SIGHUP only when it is 0),
and says what happened in
the log and the metrics. The backends do the moving (``OnnxBackend.refresh`` loads the new
version beside the served one; ``TritonBackend.refresh`` asks Triton to load it).

It also says when the model is stale: the newest version in the repository (one with its
metadata.json, written last) is not the served one for longer than ``SSD_MODEL_STALE_AFTER_S``.
Triton polling a repository tries a version it found incomplete once and never again, and a
version stuck loading keeps every later one from loading until Triton restarts: the old model
goes on answering, and without this nobody would know. ``GET /v1/models`` shows
``versions.stale`` (the newest version, since when, the last error the backend knows of it),
``ssd_model_stale_seconds`` is above 0, the log warns once, and the page says so. Readiness is
not touched: the served version still serves."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

from service.backends import Backend, Refresh
from service.metrics import Metrics

log = logging.getLogger("service.versions")


class VersionFollower:
    def __init__(
        self, backend: Backend, poll_s: float, metrics: Metrics, stale_after_s: float = 180.0
    ) -> None:
        self.backend = backend
        self.poll_s = poll_s
        self.metrics = metrics
        self.stale_after_s = stale_after_s
        self._unserved: tuple[str, float] | None = None  # the newest version on disk, since
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sighup = False
        metrics.model_version.labels(backend.info.name).set(_number(backend.info.version))

    def start(self) -> None:
        if self.poll_s <= 0:
            log.info("checking the model repository on SIGHUP only (SSD_MODEL_POLL_S=0)")
        self._task = asyncio.create_task(self._run(), name="version-follower")
        if threading.current_thread() is threading.main_thread():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._wake.set)
                self._sighup = True

    async def check_now(self) -> Refresh:
        """One check of the repository (the loop's body; tests and SIGHUP use it too)."""
        try:
            outcome = await self.backend.refresh()
        except Exception as exc:  # a check that fails must not stop the follower
            log.warning("checking the model repository failed: %s", exc)
            self.check_stale()
            return Refresh()
        self.check_stale()
        name = self.backend.info.name
        if outcome.refused is not None:
            version, reason = outcome.refused
            self.metrics.versions_refused.labels(name).inc()
            log.error("refused version %s of %s (serving %s): %s", version, name,
                      self.backend.info.version, reason)  # fmt: skip
        if outcome.switched_to is not None:
            self.metrics.version_switches.labels(name).inc()
            self.metrics.model_version.labels(name).set(_number(outcome.switched_to))
            log.info("now serving version %s of %s (was %s)", outcome.switched_to, name,
                     outcome.switched_from)  # fmt: skip
        return outcome

    def check_stale(self, now: float | None = None) -> None:
        """Compare the newest version on disk with the served one (see the module's text)."""
        now = time.time() if now is None else now
        versions, name = self.backend.versions, self.backend.info.name
        store = getattr(self.backend, "store", None)
        try:
            newest = store.newest() if store is not None else None
        except OSError:
            newest = None
        if newest is None or not versions.served or newest.label == versions.served:
            if versions.stale is not None:
                log.info("version %s of %s is served: no longer stale", versions.served, name)
            self._unserved, versions.stale = None, None
            self.metrics.model_stale.labels(name).set(0)
            return
        if self._unserved is None or self._unserved[0] != newest.label:
            self._unserved = (newest.label, now)
            versions.stale = None
        since = self._unserved[1]
        waited = now - since
        if waited < self.stale_after_s:
            self.metrics.model_stale.labels(name).set(0)
            return
        load_error = getattr(self.backend, "load_error", None)
        error = load_error(newest.label) if load_error is not None else None
        if versions.stale is None:
            log.warning("model %s is stale: version %s has been in the repository for %.0f s and "
                        "version %s is still served (%s)", name, newest.label, waited,
                        versions.served, error or "no error reported")  # fmt: skip
        versions.stale = {
            "newest": newest.label,
            "served": versions.served,
            "since": since,
            "last_error": error,
        }
        self.metrics.model_stale.labels(name).set(waited)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s if self.poll_s > 0 else None):
                    await self._wake.wait()
            self._wake.clear()
            await self.check_now()

    async def close(self) -> None:
        if self._sighup:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _number(version: str) -> float:
    return float(version) if version.isdigit() else -1.0
