"""Following the model repository: a background task that asks the backend to move to the newest
version every ``SSD_MODEL_POLL_S`` seconds (and at once on SIGHUP; on SIGHUP only when it is 0),
and says what happened in
the log and the metrics. The backends do the moving (``OnnxBackend.refresh`` loads the new
version beside the served one; ``TritonBackend.refresh`` asks Triton to load it)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

from service.backends import Backend, Refresh
from service.metrics import Metrics

log = logging.getLogger("service.versions")


class VersionFollower:
    def __init__(self, backend: Backend, poll_s: float, metrics: Metrics) -> None:
        self.backend = backend
        self.poll_s = poll_s
        self.metrics = metrics
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
            return Refresh()
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
