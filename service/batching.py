"""Micro-batching: images from concurrent requests share backend calls.

Each image waits at most ``max_delay`` for company, and a batch holds at most ``max_size`` images.
Up to ``concurrency`` batches are at the backend at once (1 for the in-process ONNX Runtime, which
already uses every core; more for Triton, whose own dynamic batcher merges them further). A batch
holds images pinned to one model version only (the embedded backend pins each request to the
version it was admitted to); images of another version wait for the next batch.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass

import numpy as np

from service.backends import Backend, Candidates
from service.metrics import Metrics


@dataclass(frozen=True)
class BatchResult:
    candidates: Candidates  # of the whole batch
    row: int  # this image's row in it
    queued_s: float
    infer_s: float


@dataclass
class _Item:
    pixels: np.ndarray  # (300, 300, 3) uint8
    future: asyncio.Future
    enqueued: float
    deadline: float  # perf_counter time by which the request must be answered
    pin: object = None  # the model version (Backend.pin) its request was admitted to


class MicroBatcher:
    def __init__(
        self,
        backend: Backend,
        max_size: int,
        max_delay_s: float,
        concurrency: int,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.max_size = max_size
        self.max_delay_s = max_delay_s
        self.metrics = metrics
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._slots = asyncio.Semaphore(concurrency)
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._held: collections.deque[_Item] = collections.deque()  # of another version

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="micro-batcher")

    async def submit(
        self, pixels: list[np.ndarray], deadline: float, pin: object = None
    ) -> list[BatchResult]:
        """Queue images and wait for their results (in the same order).

        ``deadline`` (a ``time.perf_counter()`` value) bounds the backend call of their batch;
        ``pin``: the model version they go to.
        """
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(p, loop.create_future(), now, deadline, pin) for p in pixels]
        for item in items:
            self._queue.put_nowait(item)
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for item in items:  # on timeout/cancel: a queued item is skipped by the loop
                item.future.cancel()

    async def _run(self) -> None:
        while True:
            first = self._held.popleft() if self._held else await self._queue.get()
            batch = [first]
            deadline = time.perf_counter() + self.max_delay_s
            while len(batch) < self.max_size:
                item = self._held_for(first.pin)
                if item is None:
                    try:
                        item = self._queue.get_nowait()
                    except asyncio.QueueEmpty:
                        remaining = deadline - time.perf_counter()
                        if remaining <= 0:
                            break
                        try:
                            item = await asyncio.wait_for(self._queue.get(), remaining)
                        except TimeoutError:
                            break
                if item.pin is first.pin:
                    batch.append(item)
                else:
                    self._held.append(item)
            batch = [i for i in batch if not i.future.done()]
            if not batch:
                continue
            await self._slots.acquire()
            task = asyncio.create_task(self._infer(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _held_for(self, pin: object) -> _Item | None:
        for index, item in enumerate(self._held):
            if item.pin is pin:
                del self._held[index]
                return item
        return None

    async def _infer(self, batch: list[_Item]) -> None:
        try:
            started = time.perf_counter()
            images = np.stack([i.pixels for i in batch])
            self.metrics.batch_size.observe(len(batch))
            try:
                remaining = min(i.deadline for i in batch) - time.perf_counter()
                out = await self.backend.infer(
                    images, timeout=max(0.01, remaining), pin=batch[0].pin
                )
            except Exception as exc:  # delivered to every waiting request
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                return
            infer_s = time.perf_counter() - started
            for row, item in enumerate(batch):
                if not item.future.done():
                    item.future.set_result(BatchResult(out, row, started - item.enqueued, infer_s))
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
