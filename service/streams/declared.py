"""Streams declared in a file (``SSD_STREAMS_FILE``): how a camera fleet is deployed.

The file (YAML, or JSON, which is YAML too) is read at start-up and again whenever it changes
(checked every ``POLL_S``)::

    streams:
      - id: gate                      # the stream's id in /v1/streams (letters, digits, - and _)
        source: rtsp://10.0.0.21/stream1
        fps: 5
        classes: [person, car]
        lines: [[0, 180, 640, 180]]

Each entry takes the fields of ``POST /v1/streams``. A change starts the streams added, restarts
those whose entry changed and stops those removed; streams created through the API are left
alone. A file that cannot be read or parsed changes nothing (the streams run on as they were) and
says why in the log and in ``GET /v1/streams`` (``file``); an entry that is invalid or whose
source is refused is skipped, with its reason there too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from service.errors import ApiError
from service.settings import Settings
from service.streams.manager import StreamManager
from service.streams.params import StreamParams, StreamRequest

log = logging.getLogger("service")

POLL_S = 2.0
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class StreamsFile:
    """Keeps the manager's declared streams as the file says."""

    def __init__(self, path: Path, manager: StreamManager, settings: Settings) -> None:
        self.path, self.manager, self.settings = path, manager, settings
        self.declared: dict[str, StreamParams] = {}
        self.seen: tuple[float, int] | None = None  # mtime, size of the last read
        self.loaded_at: float | None = None
        self.error: str | None = None
        self.entry_errors: dict[str, str] = {}
        self.task: asyncio.Task | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "loaded_at": self.loaded_at,
            "error": self.error,
            "entries": sorted(self.declared),
            "entry_errors": self.entry_errors,
        }

    async def start(self) -> None:
        await self.check()
        self.task = asyncio.create_task(self._poll(), name="streams-file")

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.check()
            except Exception:  # never let the follower die: say it and go on
                log.exception("streams file %s: could not be applied", self.path)

    async def check(self) -> None:
        """Reads the file if it changed and applies it."""
        try:
            st = self.path.stat()
            seen = (st.st_mtime, st.st_size)
        except OSError as exc:
            seen = None
            if self.seen is not None or self.error is None:
                self._failed(f"cannot be read: {exc.strerror}")
            self.seen = None
            return
        if seen == self.seen:
            return
        self.seen = seen
        try:
            entries = self._parse(self.path.read_text())
        except (OSError, UnicodeError, yaml.YAMLError, ValueError) as exc:
            self._failed(f"not applied: {exc}")
            return
        await self._apply(entries)

    def _failed(self, why: str) -> None:
        self.error = why
        log.error("streams file %s: %s (the streams run on as they were)", self.path, why)

    def _parse(self, text: str) -> dict[str, StreamRequest]:
        body = yaml.safe_load(text) or {}
        if not isinstance(body, dict) or not isinstance(body.get("streams", []), list):
            raise ValueError("the file must hold a mapping with a list under 'streams'")
        entries: dict[str, StreamRequest] = {}
        self.entry_errors = {}
        for index, entry in enumerate(body.get("streams") or []):
            if not isinstance(entry, dict):
                self.entry_errors[f"#{index}"] = "an entry is a mapping"
                continue
            entry = dict(entry)
            stream_id = str(entry.pop("id", ""))
            if not _ID.fullmatch(stream_id):
                self.entry_errors[f"#{index}"] = "id: 1-64 letters, digits, - or _"
                continue
            if stream_id in entries:
                self.entry_errors[stream_id] = "the id is declared twice (the first one runs)"
                continue
            try:
                entries[stream_id] = StreamRequest.model_validate(entry)
            except ValidationError as exc:
                self.entry_errors[stream_id] = "; ".join(
                    f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
        return entries

    async def _apply(self, entries: dict[str, StreamRequest]) -> None:
        classes = self.manager.pipe.backend.info.classes
        wanted: dict[str, StreamParams] = {}
        for stream_id, request in entries.items():
            try:
                wanted[stream_id] = request.params(self.settings, classes)
            except ApiError as exc:
                self.entry_errors[stream_id] = exc.message
        for stream_id in set(self.declared) - set(wanted):
            with contextlib.suppress(ApiError):  # stopped through the API meanwhile
                await self.manager.remove(stream_id)
            del self.declared[stream_id]
        for stream_id, params in wanted.items():
            running = self.manager.streams.get(stream_id)
            if running is not None and self.declared.get(stream_id) == params:
                continue  # unchanged: it runs on, tracks and counts kept
            try:
                await self.manager.add(params, stream_id)
                self.declared[stream_id] = params
            except ApiError as exc:
                self.entry_errors[stream_id] = exc.message
                self.declared.pop(stream_id, None)
                if running is not None:
                    with contextlib.suppress(ApiError):
                        await self.manager.remove(stream_id)
        self.error = None
        self.loaded_at = time.time()
        for stream_id, why in self.entry_errors.items():
            log.error("streams file %s: entry %s skipped: %s", self.path, stream_id, why)
        log.info(
            "streams file %s: %d streams declared (%s)",
            self.path,
            len(self.declared),
            ", ".join(sorted(self.declared)) or "none",
        )
