"""Live streams: each a task that keeps a worker connected to its source (service/streams/
worker.py), detects on the newest frame at the stream's rate, tracks, counts line crossings and
publishes one event per processed frame to its subscribers.

- Latest-frame rule: the worker always hands over its newest frame; frames the model had no time
  for are counted (``frames_skipped``), never queued, so lag stays bounded however slow the model.
  Tracks continue through skipped frames (the tracker is told the rate actually processed).
- Frames go to the micro-batcher as background work, after still images (the fairness rule of
  videos): an image request waits for one batch of frames at most.
- A source that drops (camera restart, network cut, end of a file served as a stream) is
  reconnected with backoff (0.5 s doubling to 8 s), state ``reconnecting``; tracks restart after
  a reconnection (ids keep growing: an id is never given twice in one stream). A stream whose
  source sent no frame for ``SSD_STREAM_FAIL_AFTER_S`` ends ``failed`` with the reason; a refused
  address or a source of the wrong kind ends it at once.
- Every frame is answered by the version the backend serves then; an event names it. Tracks go
  on across a new version with the same class list and restart when the list changes.
- Subscribers each have a queue of ``SUBSCRIBER_QUEUE`` events; a full queue loses its oldest
  event, and the next event delivered says how many were ``missed``. A slow subscriber never
  slows the stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import secrets
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from service.addresses import AddressRefused, ResolverBusy, SourcePolicy, Target, Unresolvable
from service.backends import ModelInfo
from service.batching import BatchResult
from service.errors import ApiError
from service.metrics import Metrics
from service.pipeline import Pipeline, describe
from service.settings import Settings
from service.streams.params import StreamParams
from service.streams.worker import SourceSpec, StreamWorker
from service.video.processing import count_crossings, frame_detections, track_detections
from service.video.protocol import LiveFrame, VideoError, VideoInfo, VideoLimits
from service.video.tracking import LineCounter, Tracker, ZoneCounter
from ssdcore.tiling import TilePlan, TileSpec

log = logging.getLogger("service")

SCHEMES = ("rtsp", "rtsps", "http", "https")
SUBSCRIBER_QUEUE = 16
BACKOFF_S = (0.5, 8.0)  # first wait before reconnecting, longest
MAX_INTERNAL_ERRORS = 5  # unexpected errors in a row that end a stream as failed
# a source answering this is not retried: it will not become another kind of source
PERMANENT = {
    "unsupported_source",
    "source_redirected",
    "source_refused",  # a URL a playlist names
    "video_too_large",
    "frame_too_large",
}


class Subscriber:
    """One listener's queue of events (on the event loop; no locks)."""

    def __init__(self, size: int = SUBSCRIBER_QUEUE) -> None:
        self.events: collections.deque[dict] = collections.deque()
        self.size = size
        self.missed = 0
        self.ready = asyncio.Event()
        self.closed = False

    def offer(self, event: dict) -> None:
        if len(self.events) >= self.size:
            self.events.popleft()
            self.missed += 1
        self.events.append(event)
        self.ready.set()

    async def next(self, timeout: float) -> dict | None:
        """The next event (with ``missed`` when some were lost before it), or None when
        ``timeout`` passed without one."""
        if not self.events and not self.closed:
            self.ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.ready.wait()
        if not self.events:
            return None
        event = self.events.popleft()
        if self.missed:
            event = {**event, "missed": self.missed}
            self.missed = 0
        return event


class _Rate:
    """Events a second over the last few seconds: (n - 1) / (last - first) of the events in the
    window, by the times they happened."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.times: collections.deque[float] = collections.deque()
        self.window_s = window_s

    def add(self, t: float) -> None:
        self.times.append(t)
        while self.times and self.times[0] < t - self.window_s:
            self.times.popleft()

    def per_second(self, now: float) -> float:
        while self.times and self.times[0] < now - self.window_s:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        return round((len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-6), 2)


class _SourceRate:
    """Frames a second the source sends: from the worker's frame counts and arrival times."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.marks: collections.deque[tuple[float, int]] = collections.deque()
        self.window_s = window_s

    def add(self, captured: float, count: int) -> None:
        self.marks.append((captured, count))
        while len(self.marks) > 2 and self.marks[0][0] < captured - self.window_s:
            self.marks.popleft()

    def reset(self) -> None:
        self.marks.clear()  # counts start again with each connection

    def per_second(self) -> float:
        if len(self.marks) < 2:
            return 0.0
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return round((n1 - n0) / max(t1 - t0, 1e-6), 2)


class LiveStream:
    """One stream: its state, figures and subscribers, and the task that runs it."""

    def __init__(
        self,
        stream_id: str,
        params: StreamParams,
        pipe: Pipeline,
        policy: SourcePolicy,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.id = stream_id
        self.params = params
        self.pipe = pipe
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.state = "connecting"
        self.reason: str | None = None
        self.created = time.time()
        self.last_frame_at: float | None = None  # monotonic
        self.processed = 0
        self.skipped = 0  # frames of the source never detected on (the rate, or the model's pace)
        self.late = 0  # processed frames that came after their turn: the model could not keep up
        self.reconnects = 0
        self.lag_s: float | None = None
        self.source_info: VideoInfo | None = None
        self.model_version: str | None = None
        self.counts: list[dict] = [{"in": {}, "out": {}} for _ in params.lines]
        self._zones: ZoneCounter | None = None  # the current tracks' (occupancy restarts with them)
        self.zone_counts: list[dict] = [{"entered": {}, "exited": {}} for _ in params.zones]
        self.subscribers: set[Subscriber] = set()
        self._processed_rate = _Rate()
        self._input_rate = _SourceRate()
        self._worker: StreamWorker | None = None
        self._occupancy: list[dict[str, int]] | None = None  # per zone, by class name
        # a new tracker (after a reconnection, or a new class list) numbers from 1 again: its
        # ids are shown above every id given before, so an id names one object in a stream
        self._id_offset = 0
        self._max_id = 0
        self.task: asyncio.Task | None = None
        self.draining = False  # the server shuts down: subscriptions end
        self.ended_at: float | None = None  # monotonic, once failed or stopped

    # --- what GET /v1/streams says ---

    def describe(self) -> dict[str, Any]:
        now = time.monotonic()
        info = self.source_info
        return {
            "id": self.id,
            "name": self.params.name,
            "source": redacted(self.params.source),
            "state": self.state,
            "reason": self.reason,
            "fps": self.params.fps,
            "input_fps": self._input_rate.per_second(),
            "processed_fps": self._processed_rate.per_second(now),
            "lag_ms": round(self.lag_s * 1e3, 1) if self.lag_s is not None else None,
            "frames_processed": self.processed,
            "frames_skipped": self.skipped,
            "frames_late": self.late,
            "reconnects": self.reconnects,
            "model_version": self.model_version,
            "width": info.width if info else None,
            "height": info.height if info else None,
            "codec": info.codec if info else None,
            "lines": [
                {"line": [ln.x1, ln.y1, ln.x2, ln.y2], **counts}
                for ln, counts in zip(self.params.lines, self.counts)
            ],
            "zones": [
                {"zone": [list(p) for p in zone.points], **counts, "inside": inside}
                for zone, counts, inside in zip(self.params.zones, self.zone_counts, self._inside())
            ],
            "tiles": self._tiles_described(),
            "subscribers": len(self.subscribers),
            "created": self.created,
        }

    def _inside(self) -> list[dict[str, int]]:
        """Per zone, the tracks inside it now by class name (as the last frame left them: a
        copy made by the thread that counts, never read while it changes)."""
        return self._occupancy or [{} for _ in self.params.zones]

    def _tiles_described(self) -> dict | None:
        tiling, info = self.params.detect.tiling, self.source_info
        if tiling is None:
            return None
        if info is None:
            return {"planned": None}
        plan = self._plan(info.width, info.height)
        return describe(plan) if plan is not None else {"runs": 1}

    def _plan(self, width: int, height: int) -> TilePlan | None:
        """A frame's tiles, as the worker cuts them (None: the frame whole)."""
        tiling = self.params.detect.tiling
        return tiling.cut(width, height, self.settings.tile_budget) if tiling is not None else None

    # --- events ---

    def publish(self, kind: str, body: dict) -> None:
        event = {"event": kind, "stream": self.id, **body}
        for subscriber in self.subscribers:
            subscriber.offer(event)

    def subscribe(self) -> Subscriber:
        subscriber = Subscriber()
        # nothing more will come, or the server is shutting down
        subscriber.closed = self.state in ("failed", "stopped") or self.draining
        self.subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def _set_state(self, state: str, reason: str | None = None) -> None:
        if (state, reason) == (self.state, self.reason):
            return
        self.state, self.reason = state, reason
        self.metrics.stream_up.labels(self.id).set(1 if state == "running" else 0)
        log.info("stream %s: %s%s", self.id, state, f" ({reason})" if reason else "")
        self.publish("state", {"state": state, "reason": reason, "reconnects": self.reconnects})

    # --- the task ---

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"stream-{self.id}")

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.state != "failed":
            self._set_state("stopped")
        self.ended_at = self.ended_at or time.monotonic()
        self.close_subscribers()
        self.metrics.forget_stream(self.id)

    def close_subscribers(self) -> None:
        """Their responses end once they have had every event so far."""
        for subscriber in self.subscribers:
            subscriber.closed = True
            subscriber.ready.set()

    def _fail(self, reason: str) -> None:
        self._set_state("failed", reason)
        self.ended_at = time.monotonic()
        self.close_subscribers()
        self.metrics.forget_stream(self.id)

    async def _run(self) -> None:
        backoff = BACKOFF_S[0]
        since = time.monotonic()  # the last frame, or the start
        first = True
        internal = 0  # unexpected errors in a row
        while True:
            reason = None
            if not first:
                self.reconnects += 1
                self.metrics.stream_reconnects.labels(self.id).inc()
            first = False
            try:
                await self._connect_and_process()
                reason = "the source ended"
                internal = 0
            except AddressRefused as exc:
                self._fail(f"source_refused: {exc}")
                return
            except VideoError as exc:
                if exc.code in PERMANENT:
                    self._fail(f"{exc.code}: {exc.message}")
                    return
                reason = f"{exc.code}: {exc.message}"
            except (Unresolvable, ResolverBusy, ApiError, TimeoutError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a fault of ours or of the backend: said, and retried
                log.exception("stream %s: unexpected error", self.id)
                reason = f"internal error: {type(exc).__name__}"
                internal += 1
                if internal >= MAX_INTERNAL_ERRORS:
                    self._fail(f"{reason}, {internal} times in a row (the log has them)")
                    return
            finally:
                if self._worker is not None:
                    self._worker.kill()
                    self._worker = None
            if self.last_frame_at is not None:
                since = max(since, self.last_frame_at)
            if time.monotonic() - since >= self.settings.stream_fail_after_s:
                self._fail(f"no frame for {self.settings.stream_fail_after_s:g} s; last: {reason}")
                return
            self._set_state("reconnecting", reason)
            await asyncio.sleep(backoff)
            fresh = self._ran_a_while() and not internal  # our own faults keep backing off
            backoff = BACKOFF_S[0] if fresh else min(2 * backoff, BACKOFF_S[1])

    def _ran_a_while(self) -> bool:
        return self.last_frame_at is not None and time.monotonic() - self.last_frame_at < 1.0

    async def _connect_and_process(self) -> None:
        timeout = self.settings.stream_timeout_s
        target = await self.policy.check(self.params.source, SCHEMES)
        spec = source_spec(target, self.settings, self.params.detect.tiling)
        self._worker = worker = await StreamWorker.launch(spec)
        async with asyncio.timeout(timeout):
            info = await worker.info()
        self.source_info = info
        self._set_state("running")
        await self._process(worker, info)

    async def _process(self, worker: StreamWorker, info: VideoInfo) -> None:
        pipe, params = self.pipe, self.params
        loop = asyncio.get_running_loop()
        period = 1.0 / params.fps
        tracker: Tracker | None = None
        counter: LineCounter | None = None
        classes = None
        last_index = -1
        next_at = time.monotonic()
        self._input_rate.reset()
        while True:
            wait = next_at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -period:  # its turn passed a whole period ago: the model is behind
                self.late += 1
                self.metrics.stream_late_frames.labels(self.id).inc()
            next_at = max(next_at + period, time.monotonic())
            async with asyncio.timeout(2 * self.settings.stream_timeout_s):
                frame = await worker.newest()
            if frame is None:
                return
            now = time.monotonic()
            self.last_frame_at = now
            skipped = frame.index - last_index - 1
            self._input_rate.add(frame.captured, frame.index + 1)
            last_index = frame.index
            if skipped:
                self.skipped += skipped
                self.metrics.stream_frames_skipped.labels(self.id).inc(skipped)
            try:
                results = await self._infer(frame)
            except ApiError as exc:  # the model's trouble (overload, a backend down), not the
                # source's: this frame is lost, the camera stays connected
                log.warning("stream %s: frame %d not detected: %s", self.id, frame.index, exc)
                self.publish("frame_lost", {"frame": frame.index, "reason": exc.message})
                next_at = time.monotonic() + max(period, 0.5)
                continue
            model: ModelInfo = pipe.backend.info_for(results[0].candidates.version)
            if model.classes != classes or tracker is None:  # a new class list: new tracks
                tracker = Tracker(
                    self._processed_rate.per_second(now) or params.fps,
                    params.detect.postprocess.score_threshold,
                    span=max(frame.width, frame.height),
                )
                counter = LineCounter(list(params.lines)) if params.lines else None
                self._zones = ZoneCounter(list(params.zones)) if params.zones else None
                self._id_offset = self._max_id
                classes = model.classes
                self._occupancy = None
            detections, crossings, zone_events = await loop.run_in_executor(
                pipe.pool, self._detect, results, model, frame, tracker, counter, self._zones
            )
            self.lag_s = time.time() - frame.captured
            self.processed += 1
            self._processed_rate.add(time.monotonic())
            self._record(model, crossings, zone_events)
            event: dict[str, Any] = {
                "frame": frame.index,
                "captured": round(frame.captured, 3),
                "lag_ms": round(self.lag_s * 1e3, 1),
                "skipped": skipped,
                "model_version": model.version,
                "width": frame.width,
                "height": frame.height,
                "detections": detections,
            }
            if crossings:
                event["crossings"] = crossings
            if zone_events:
                event["zones"] = zone_events
            self.publish("frame", event)

    async def _infer(self, frame: LiveFrame) -> list[BatchResult]:
        """The model's answer for a frame (or for each of its tiles, all from one version)."""
        pipe = self.pipe
        inputs = list(frame.pixels) if frame.pixels.ndim == 4 else [frame.pixels]
        plan = self._plan(frame.width, frame.height)
        if len(inputs) != (plan.runs if plan is not None else 1):
            raise VideoError(502, "invalid_source", "the worker cut a frame into other tiles")
        deadline = time.perf_counter() + pipe.timeout_s
        results = await pipe.batcher.submit(inputs, deadline=deadline, background=True)
        if len(results) > 1:  # a frame's tiles: from one version (Triton may move mid-frame)
            results = await pipe.infer_one_version(
                inputs, deadline, None, background=True, first=results
            )
        return results

    def _detect(
        self,
        results: list[BatchResult],
        model: ModelInfo,
        frame: LiveFrame,
        tracker: Tracker,
        counter: LineCounter | None,
        zones: ZoneCounter | None,
    ) -> tuple[list[dict], list[dict], list[dict]]:
        width, height = frame.width, frame.height
        plan = self._plan(width, height)
        detections, det = frame_detections(
            results, model, self.params.detect, plan, self.pipe.tile_merge, width, height
        )
        crossings = track_detections(detections, det, tracker, counter)
        for d in detections:
            if d["track_id"] is not None:
                d["track_id"] += self._id_offset
                self._max_id = max(self._max_id, d["track_id"])
        labels = {d["track_id"]: d["label"] for d in detections}
        for c in crossings:
            c["track_id"] += self._id_offset
            c["label"] = labels.get(c["track_id"])
        zone_events = []
        if zones is not None:
            ids = np.asarray(
                [d["track_id"] - self._id_offset if d["track_id"] is not None else -1
                 for d in detections],
                dtype=np.int64,
            )  # fmt: skip
            pixels = np.asarray(
                [[d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in detections],
                dtype=np.float64,
            ).reshape(-1, 4)
            for index, track, label, kind in zones.update(pixels, det.classes, ids, frame.captured):
                zone_events.append(
                    {
                        "zone": index,
                        "track_id": track + self._id_offset,
                        "label": model.classes.name(label),
                        "event": "exit" if kind == "lost" else kind,
                        **({"lost": True} if kind == "lost" else {}),
                    }
                )
            self._occupancy = [  # replaced whole: describe() reads it on the event loop
                {model.classes.name(label): n for label, n in by_label.items()}
                for by_label in zones.occupancy()
            ]
        return detections, crossings, zone_events

    def _record(self, model: ModelInfo, crossings: list[dict], zone_events: list[dict]) -> None:
        if model.version != self.model_version:
            if self.model_version is not None:
                self.publish(
                    "model_version_changed", {"from": self.model_version, "to": model.version}
                )
            self.model_version = model.version
        count_crossings(self.counts, crossings)
        for z in zone_events:
            tally = self.zone_counts[z["zone"]]["entered" if z["event"] == "enter" else "exited"]
            tally[z["label"]] = tally.get(z["label"], 0) + 1
        now = time.monotonic()
        self.metrics.stream_processed_fps.labels(self.id).set(self._processed_rate.per_second(now))
        self.metrics.stream_input_fps.labels(self.id).set(self._input_rate.per_second())
        self.metrics.stream_lag.labels(self.id).set(self.lag_s or 0.0)


# a name of a query parameter (or of a ``name=value`` in the path, as some cameras have) that
# may carry a credential: its value is not shown
_SECRET = re.compile(
    r"(?i)([a-z0-9_.-]*(?:pas|pwd|token|key|secret|sig|cred|auth|user|usr|login)[a-z0-9_.-]*=)"
    r"[^&;/]*"
)


def redacted(url: str) -> str:
    """A source URL as it is shown: no user name or password in it, nor the values of query
    parameters or path segments named like credentials (``?user=admin&pwd=...``,
    ``/user=admin_password=...``)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    path = _SECRET.sub(r"\1***", parts.path)
    query = _SECRET.sub(r"\1***", parts.query)
    return urlunsplit(parts._replace(netloc=netloc, path=path, query=query))


def source_spec(target: Target, settings: Settings, tiles: TileSpec | None = None) -> SourceSpec:
    """What the worker connects to: the checked address, never the name again; ``tiles``: each
    frame cut into tiles there (as the gateway plans them, within ``SSD_MAX_TILES`` runs)."""
    url = target.url
    address = target.addresses[0]
    shown = f"[{address}]" if ":" in address else address
    path = url.path or "/"
    if url.query:
        path += "?" + url.query
    scheme = url.scheme.lower()
    auth = ""
    if url.username is not None:
        auth = url.username + (f":{url.password}" if url.password is not None else "") + "@"
    pinned = f"{scheme}://{auth}{shown}:{target.port}{path}"
    limits = VideoLimits(settings.max_video_pixels, settings.max_video_side, float("inf"))
    return SourceSpec(
        kind="rtsp" if scheme.startswith("rtsp") else "http",
        url=pinned,
        address=address,
        port=target.port,
        host=target.host,
        path=path,
        tls=scheme in ("https", "rtsps"),
        timeout_s=settings.stream_timeout_s,
        limits=limits,
        max_part_bytes=settings.max_body_bytes,
        ca_file=str(settings.image_url_ca_file) if settings.image_url_ca_file else None,
        tiles=tiles,
        max_runs=settings.tile_budget,
        sources=tuple(settings.stream_sources),
    )


class StreamManager:
    """The gateway's streams (``SSD_MAX_STREAMS`` at most running; as many ended ones kept for
    inspection, the oldest forgotten first)."""

    def __init__(
        self, pipe: Pipeline, policy: SourcePolicy, settings: Settings, metrics: Metrics
    ) -> None:
        self.pipe, self.policy, self.settings, self.metrics = pipe, policy, settings, metrics
        self.streams: dict[str, LiveStream] = {}
        self.lock = asyncio.Lock()  # the count and the table change together
        self.loop = asyncio.get_running_loop()
        self.draining = False

    def _room(self, stream_id: str | None) -> None:
        if self.settings.max_streams == 0:
            raise ApiError(503, "streams_disabled", "streams are off here (SSD_MAX_STREAMS=0)")
        running = [
            s
            for s in self.streams.values()
            if s.state not in ("failed", "stopped") and s.id != stream_id  # one it replaces
        ]
        if len(running) >= self.settings.max_streams:
            self.metrics.rejected.labels("too_many_streams").inc()
            raise ApiError(
                503,
                "too_many_streams",
                f"{self.settings.max_streams} streams run already (SSD_MAX_STREAMS); stop one "
                "(DELETE /v1/streams/{id}) first",
            )

    async def add(self, params: StreamParams, stream_id: str | None = None) -> LiveStream:
        """A new stream, its source checked first (4xx when refused); 503 beyond the limit."""
        self.pipe.check_tiles(params.detect)  # a grid beyond SSD_MAX_TILES: 422
        self._room(stream_id)  # before a lookup: a full service answers at once
        try:
            target = await self.policy.check(params.source, SCHEMES)
        except AddressRefused as exc:
            raise ApiError(422, "source_refused", str(exc)) from None
        except Unresolvable as exc:
            raise ApiError(422, "source_unresolvable", str(exc)) from None
        except ResolverBusy as exc:
            raise ApiError(503, "resolver_busy", str(exc), {"Retry-After": "5"}) from None
        except ValueError as exc:
            raise ApiError(422, "invalid_source", str(exc)) from None
        if target.url.scheme.lower() == "rtsps":
            raise ApiError(
                422,
                "source_refused",
                "rtsps is not supported yet: the camera's certificate would not be verified "
                "(FFmpeg's RTSP over TLS), so its password could go to anyone on the way",
            )
        async with self.lock:
            self._room(stream_id)  # again: other streams may have started during the lookup
            stream_id = stream_id or secrets.token_hex(6)
            old = self.streams.pop(stream_id, None)
            if old is not None:
                await old.stop()
            self._forget_ended()
            stream = LiveStream(
                stream_id, params, self.pipe, self.policy, self.settings, self.metrics
            )
            stream.draining = self.draining
            self.streams[stream_id] = stream
            stream.start()
            return stream

    def _forget_ended(self) -> None:
        """Ended streams beyond ``SSD_MAX_STREAMS`` go, the longest ended first."""
        ended = sorted(
            (s for s in self.streams.values() if s.ended_at is not None),
            key=lambda s: s.ended_at or 0.0,
        )
        for stream in ended[: max(0, len(ended) - max(1, self.settings.max_streams) + 1)]:
            del self.streams[stream.id]

    def end_subscriptions(self) -> None:
        """The server is shutting down: every event stream ends now (and new ones at once), so
        the open connections do not hold the shutdown."""
        self.draining = True
        for stream in self.streams.values():
            stream.draining = True
            stream.close_subscribers()

    def get(self, stream_id: str) -> LiveStream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise ApiError(404, "stream_not_found", f"no stream {stream_id!r}")
        return stream

    async def remove(self, stream_id: str) -> None:
        stream = self.get(stream_id)
        del self.streams[stream_id]
        await stream.stop()

    async def close(self) -> None:
        streams, self.streams = list(self.streams.values()), {}
        await asyncio.gather(*(s.stop() for s in streams), return_exceptions=True)
