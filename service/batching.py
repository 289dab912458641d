"""Micro-batching: images from concurrent requests share backend calls.

The rules, in the order a batch is made:

- **Admission.** ``submit`` refuses a request at once (503) when the images waiting would exceed
  ``max_queued`` (``SSD_BATCH_MAX_QUEUED_IMAGES``; video frames are not counted: each video's
  window bounds them), or when, at the backend's measured pace, the
  images ahead of it could not be run before its deadline: it would only time out later, after
  taking model time from requests that can still be answered.
- **A free slot first.** Up to ``concurrency`` batches are at the backend at once (1 for the
  in-process engines, which use every core already; more for Triton, whose own dynamic batcher
  merges them further). The batch is made once a slot is free, from what is waiting then, so no
  image is committed to a batch long before it runs.
- **Company.** Once a slot is free, the batch waits until ``max_delay`` has passed since its
  oldest image arrived, or until ``max_size`` images are waiting, whichever comes first.
- **Fair between requests.** A batch takes one image from each waiting request in turn (in the
  order the requests arrived) until it is full; requests that had images in it go to the back
  of the order. A single image behind a 16-image request waits for one batch at most, not two.
- **Images before video frames.** A video's frames are submitted as background requests: a batch
  takes the images of still-image requests first, and fills the places left with frames (round-
  robin between videos too) only while the call, at the measured pace, stays within 1.25x of
  the images' own (on a GPU, where a larger batch costs little more, frames fill it; on a CPU,
  where a call's time grows with its size, an image's batch holds images only). Batches of
  frames alone hold one frame where a batch is hardly cheaper per frame (a CPU: an image then
  waits for one frame's call) and every frame waiting otherwise (a GPU, a backend with a fixed
  cost per call); a size runs as it is, to measure it, while no size as large has a known time. A video never delays an
  image request by more than the one batch already at the backend (on a CPU, mostly one
  frame's call); under a steady flood of images, videos slow down, not images.
- **One model version.** A batch holds images pinned to one model version only (the embedded
  backend pins each request to the version it was admitted to); the version of the first
  request in the order picks it, the others wait for the next batch.
- **Only images that can still be answered.** A request cancelled (its client went away, its
  timeout passed, another of its images failed) leaves the queue at once. A batch takes as many
  images, in turn order, as can be run (calls of each size are timed) before the deadline of
  every request among them; a request that not even a call of one image could answer in time
  fails with 504 instead of being run. The backend call's timeout is the latest deadline in the
  batch: each request keeps its own deadline, and a nearly expired one never times out the
  others.
- **Every future resolved.** Whatever ends a backend call (an error, a cancellation, a failure
  to stack the images), every request in its batch gets an answer at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from service.backends import Backend, BackendTimeout, BackendUnavailable, Candidates
from service.errors import ApiError
from service.metrics import Metrics

log = logging.getLogger("service")
PACE_SAMPLES = 8  # recent calls kept per batch size
PACE_AGE_S = 60.0  # a call's time counts this long
PACE_MIN_SAMPLES = 2  # calls of a size before its time counts (the first may be a warm-up)
RIDE_ALONG = 1.25  # video frames join a batch of images while it takes at most this much longer


@dataclass(frozen=True)
class BatchResult:
    candidates: Candidates  # of the whole batch
    row: int  # this image's row in it
    queued_s: float
    infer_s: float


@dataclass(eq=False)
class _Request:
    """The images of one ``submit`` that are not in a batch yet."""

    deadline: float  # perf_counter time by which the request must be answered
    pin: object  # the model version (Backend.pin) its request was admitted to
    enqueued: float
    background: bool = False  # a video's frames: taken after every waiting image
    items: collections.deque = field(default_factory=collections.deque)


@dataclass(eq=False)
class _Item:
    pixels: np.ndarray  # (300, 300, 3) uint8
    future: asyncio.Future
    request: _Request


class QueueFull(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "overloaded", message, {"Retry-After": "1"})


class MicroBatcher:
    def __init__(
        self,
        backend: Backend,
        max_size: int,
        max_delay_s: float,
        concurrency: int,
        metrics: Metrics,
        max_queued: int = 256,
    ) -> None:
        self.backend = backend
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.concurrency = concurrency
        self.max_queued = max_queued
        self.metrics = metrics
        self._waiting: collections.deque[_Request] = collections.deque()  # the turn order
        self._queued = 0  # images in self._waiting
        self._arrived = asyncio.Event()
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._samples: dict[int, collections.deque] = {}  # batch size -> (when, seconds)
        self._closed = False
        self._busy_until: list[float] = []  # when each call at the backend should end

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    @property
    def queued(self) -> int:
        """Images waiting for a batch."""
        return self._queued

    async def submit(
        self,
        pixels: list[np.ndarray],
        deadline: float,
        pin: object = None,
        background: bool = False,
    ) -> list[BatchResult]:
        """Queue images and wait for their results (in the same order).

        ``deadline`` (a ``time.perf_counter()`` value): when the request must be answered;
        ``pin``: the model version they go to; ``background``: video frames (run after images).
        """
        if self._closed:
            raise BackendUnavailable("the service is shutting down")
        now = time.perf_counter()
        self._admit(len(pixels), deadline, now, background)
        loop = asyncio.get_running_loop()
        request = _Request(deadline, pin, now, background=background)
        items = [_Item(p, loop.create_future(), request) for p in pixels]
        request.items.extend(items)
        self._waiting.append(request)
        self._count(len(items))
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            self._withdraw(request)  # what is not in a batch yet never will be
            for item in items:
                item.future.cancel()

    def _admit(self, n: int, deadline: float, now: float, background: bool) -> None:
        # the bound is on images: a video's frames are bounded by its window (service/video/),
        # and counting them here would let videos fill the queue and turn images away
        # images wait only for images; frames for everything
        ahead = self._queued if background else self._queued_images()
        if not background and ahead + n > self.max_queued:
            self.metrics.rejected.labels("batch_queue_full").inc()
            raise QueueFull(
                f"{ahead} images are waiting for the model already (at most "
                f"{self.max_queued}); retry shortly"
            )
        if ahead or len(self._busy_until) >= self.concurrency:
            # a slot, then the calls that run what waits ahead and this request's images
            full, rest = divmod(ahead + n, self.max_size)
            known = self._estimates()
            drain = full * self.call_seconds(self.max_size, known) + self.call_seconds(rest, known)
            wait = self._slot_free_in(now) + drain / self.concurrency
            if now + wait > deadline:
                self.metrics.rejected.labels("would_time_out").inc()
                raise QueueFull(
                    f"the {ahead} images waiting need about {wait:.2f} s of the model, "
                    f"more than this request has left; retry shortly"
                )

    def _queued_images(self) -> int:
        """Images of still-image requests waiting (frames excluded)."""
        return sum(len(r.items) for r in self._waiting if not r.background)

    def _slot_free_in(self, now: float) -> float:
        """Seconds until a backend slot should be free (0 when one is)."""
        if len(self._busy_until) < self.concurrency:
            return 0.0
        return max(0.0, min(self._busy_until) - now)

    def _count(self, delta: int) -> None:
        self._queued += delta
        self.metrics.batch_queue.set(self._queued)

    def _withdraw(self, request: _Request) -> None:
        if request.items:
            self._count(-len(request.items))
            request.items.clear()
        with contextlib.suppress(ValueError):
            self._waiting.remove(request)

    def _expire(self, request: _Request, needed_s: float) -> None:
        """``request`` could not be answered in time: 504 now, not after a wasted run."""
        error = BackendTimeout(
            f"the request's deadline would pass before its images could be run "
            f"(about {needed_s:.2f} s of the model needed)"
        )
        for item in request.items:
            if not item.future.done():
                item.future.set_exception(error)
        self.metrics.rejected.labels("expired_in_queue").inc()
        self._withdraw(request)

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            launched = False
            try:
                await self._wait_for_company()
                batch = self._take(time.perf_counter())
                if batch:
                    task = asyncio.create_task(self._infer(batch, self._busy_until[-1]))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                    launched = True
            except Exception:  # a bug here must not leave requests hanging, nor spin
                log.exception("the micro-batcher failed to make a batch")
                self._fail_waiting(BackendUnavailable("the batcher failed; retry"))
                await asyncio.sleep(0.01)
            finally:
                if not launched:
                    self._slots.release()

    async def _wait_for_company(self) -> None:
        while self._waiting and self._queued < self.max_size:
            oldest = min(r.enqueued for r in self._waiting)
            remaining = oldest + self.max_delay_s - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self, now: float) -> list[_Item]:
        """The next batch, taken out of the queue: as many images, in turn order, as can be run
        before the deadline of every request among them (on a CPU, whose calls grow with their
        size, a shorter batch can answer requests a full one would lose). A request that not
        even a call of one image could answer in time expires."""
        known = self._estimates()
        one = self.call_seconds(1, known)
        for request in [r for r in self._waiting if r.deadline < now + one]:
            self._expire(request, one)
        order = self._turns()
        size, earliest = 0, float("inf")
        for k, request in enumerate(order, start=1):
            earliest = min(earliest, request.deadline)
            if earliest >= now + self.call_seconds(k, known):
                size = k
        images = sum(1 for r in order[:size] if not r.background)
        if images:  # frames ride along only where that costs the images little (a GPU), not
            # where a call's time grows with its size (a CPU: 4 images cost 4 single runs)
            alone = self.call_seconds(images, known)
            while size > images and self.call_seconds(size, known) > RIDE_ALONG * alone:
                size -= 1
        elif size > 1 and any(k >= size for k in known):
            # frames alone: a batch only as large as still pays, so that an image arriving
            # waits for a short call (a CPU: one frame at a time, as fast per frame as eight;
            # a GPU: full batches). A size runs as it is whenever no size as large has a known
            # time (at first, and once the samples have aged out), to measure it: the size the
            # frames waiting make, not the largest (four streams' newest frames never make
            # eight, and a rule waiting for eight's time never shrank their batches)
            # one frame where a batch is hardly cheaper per frame (a CPU: its calls grow in
            # proportion, and an image then waits for one frame's call); the whole batch where
            # it is (a GPU, a backend with a fixed cost per call: the throughput kept)
            per_frame = self.call_seconds(size, known) / size
            if RIDE_ALONG * per_frame >= self.call_seconds(1, known):
                size = 1
        chosen: dict[_Request, int] = {}
        for request in order[:size]:
            chosen[request] = chosen.get(request, 0) + 1
        batch = []
        for request, n in chosen.items():
            batch.extend(request.items.popleft() for _ in range(n))
            self._count(-n)
        # those served go to the back of the turn order, in their order; emptied ones leave
        for request in chosen:
            self._waiting.remove(request)
            if request.items:
                self._waiting.append(request)
        if batch:
            self._busy_until.append(now + self.call_seconds(len(batch), known))
        return batch

    def _turns(self) -> list[_Request]:
        """The requests whose images the next batch would take, one entry per image, in turn:
        one image of each waiting image request of the first one's model version, then again;
        then, in the places left, one frame of each waiting video in turn."""
        waiting = [r for r in self._waiting if r.items]
        if not waiting:
            return []
        images = [r for r in waiting if not r.background]
        pin = (images or waiting)[0].pin
        order: list[_Request] = []
        for group in (images, [r for r in waiting if r.background]):
            eligible = [r for r in group if r.pin is pin]
            left = {r: len(r.items) for r in eligible}
            while len(order) < self.max_size and any(left.values()):
                for request in eligible:
                    if len(order) < self.max_size and left[request]:
                        left[request] -= 1
                        order.append(request)
        return order

    async def _infer(self, batch: list[_Item], expected_end: float) -> None:
        started = time.perf_counter()
        try:
            images = np.stack([i.pixels for i in batch])
            self.metrics.batch_size.observe(len(batch))
            # the call serves every request in it: the latest deadline bounds it
            timeout = max(i.request.deadline for i in batch) - started
            out = await self.backend.infer(
                images, timeout=max(0.01, timeout), pin=batch[0].request.pin
            )
            infer_s = time.perf_counter() - started
            self._measure(infer_s, len(batch), timeout)
            for row, item in enumerate(batch):
                if not item.future.done():
                    queued_s = started - item.request.enqueued
                    item.future.set_result(BatchResult(out, row, queued_s, infer_s))
        except BaseException as exc:  # every request in the batch is answered, whatever ended it
            error = (
                exc
                if isinstance(exc, Exception)
                else BackendUnavailable("the model call was interrupted; retry")
            )
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
                self._withdraw(item.request)  # its other images would be run for nothing
            if not isinstance(exc, Exception):
                raise
        finally:
            self._busy_until.remove(expected_end)
            self._slots.release()

    def _measure(self, infer_s: float, size: int, timeout: float) -> None:
        samples = self._samples.setdefault(size, collections.deque(maxlen=PACE_SAMPLES))
        samples.append((time.perf_counter(), min(infer_s, timeout)))

    def _estimates(self) -> dict[int, float]:
        """Batch size -> the fastest of its recent calls (samples age out after PACE_AGE_S; a
        size counts from its second call): one slow call (a warm-up, a stall) never decides, and
        a size not run lately is estimated from the others again."""
        oldest = time.perf_counter() - PACE_AGE_S
        out = {}
        for size, samples in self._samples.items():
            while samples and samples[0][0] < oldest:
                samples.popleft()
            if len(samples) >= PACE_MIN_SAMPLES:
                out[size] = min(seconds for _, seconds in samples)
        return out

    def call_seconds(self, size: int, known: dict[int, float] | None = None) -> float:
        """What a backend call of ``size`` images takes, as measured (0 before any call, and for
        0 images): the size itself, else between the nearest sizes measured, else in proportion
        to the nearest one (as on a CPU; a GPU's calls grow less with the size, and are soon
        measured). ``known``: :meth:`_estimates`, when the caller asks for several sizes."""
        known = self._estimates() if known is None else known
        if size <= 0 or not known:
            return 0.0
        if size in known:
            return known[size]
        below = [s for s in known if s < size]
        above = [s for s in known if s > size]
        if below and above:
            lo, hi = max(below), min(above)
            return known[lo] + (known[hi] - known[lo]) * (size - lo) / (hi - lo)
        if below:
            lo = max(below)
            return known[lo] * size / lo
        hi = min(above)
        return known[hi] * size / hi  # in proportion too: rather a wasted call than a lost answer

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._fail_waiting(BackendUnavailable("the service is shutting down"))

    def _fail_waiting(self, error: ApiError) -> None:
        for request in list(self._waiting):
            for item in request.items:
                if not item.future.done():
                    item.future.set_exception(error)
            self._withdraw(request)
