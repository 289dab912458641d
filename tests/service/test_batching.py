"""The micro-batcher (service/batching.py) against a stand-in backend whose calls take a set time
and say which images they ran: per-request deadlines, no model time for requests already lost,
fairness between requests, every future resolved on every exit path, a bounded queue; then the
invariants under randomized concurrent traffic."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.backends import BackendTimeout, BackendUnavailable, Candidates
from service.batching import MicroBatcher, QueueFull
from service.errors import ApiError
from service.metrics import Metrics

K = 4


def image(tag: int) -> np.ndarray:
    """A 300x300 image carrying ``tag`` in its first pixel (the stand-in answers with it)."""
    pixels = np.zeros((300, 300, 3), np.uint8)
    pixels[0, 0] = (tag >> 16 & 255, tag >> 8 & 255, tag & 255)
    return pixels


def tag_of(pixels: np.ndarray) -> int:
    r, g, b = (int(v) for v in pixels[0, 0])
    return r << 16 | g << 8 | b


@dataclass
class Call:
    tags: list[int]
    pin: object
    started: float
    timeout: float
    ended: float = 0.0


@dataclass
class StandIn:
    """A backend whose call of n images takes ``seconds(n)``; it answers each image's tag as its
    score, honours the timeout as Triton does (504 when it passes), and may fail on demand."""

    seconds: object = lambda n: 0.05
    calls: list[Call] = field(default_factory=list)
    fail_with: BaseException | None = None
    at_once: int = 0
    most_at_once: int = 0

    async def infer(self, images, timeout=None, pin=None) -> Candidates:
        call = Call([tag_of(i) for i in images], pin, time.perf_counter(), timeout)
        self.calls.append(call)
        self.at_once += 1
        self.most_at_once = max(self.most_at_once, self.at_once)
        try:
            failure = self.fail_with
            if failure is not None:
                await asyncio.sleep(0.01)
                raise failure
            duration = self.seconds(len(images))
            if timeout is not None and timeout < duration:
                await asyncio.sleep(timeout)
                raise BackendTimeout("stand-in: the call's timeout passed")
            await asyncio.sleep(duration)
            n = len(images)
            scores = np.repeat(np.array(call.tags, np.float32)[:, None], K, axis=1)
            return Candidates(
                np.zeros((n, K, 4), np.float32), scores, np.ones((n, K), np.int32), str(pin)
            )
        finally:
            self.at_once -= 1
            call.ended = time.perf_counter()


def batcher(backend, max_size=8, delay=0.002, concurrency=1, max_queued=256) -> MicroBatcher:
    b = MicroBatcher(backend, max_size, delay, concurrency, Metrics(), max_queued)
    b.start()
    return b


def tags_answered(results) -> list[int]:
    return [int(r.candidates.scores[r.row, 0]) for r in results]


def run(coro):
    return asyncio.run(coro)


async def warm(b: MicroBatcher, n: int = 2) -> None:
    """A few calls of one image and of full batches, so the batcher knows the backend's pace."""
    for _ in range(n):
        await b.submit([image(0)], time.perf_counter() + 30)
        await b.submit([image(0)] * b.max_size, time.perf_counter() + 30)


# ---------------------------------------------------------------------------- 1. deadlines


def test_a_nearly_expired_request_never_times_out_the_rest_of_its_batch():
    """The call's timeout is the latest deadline in the batch; a request that could not finish in
    time leaves the batch with 504 before the call, the others are answered."""

    async def main():
        backend = StandIn(seconds=lambda n: 0.1)
        b = batcher(backend)
        now = time.perf_counter()
        # no pace measured yet: both run, and the call may take as long as the later deadline
        soon = asyncio.create_task(b.submit([image(1)], now + 0.03))
        later = asyncio.create_task(b.submit([image(2)], now + 30))
        assert tags_answered(await later) == [2]
        await soon  # answered (after its deadline: its request's own timeout handles that)
        assert backend.calls[0].timeout > 25
        # once the pace is known, a request that cannot make it is refused before the call
        await warm(b)
        now = time.perf_counter()
        backend.calls.clear()
        t0 = time.perf_counter()
        soon = asyncio.create_task(b.submit([image(3)], now + 0.03))
        later = asyncio.create_task(b.submit([image(4)], now + 30))
        with pytest.raises(BackendTimeout):
            await soon
        assert time.perf_counter() - t0 < 0.05  # at once, not after a wasted call
        assert tags_answered(await later) == [4]
        assert [c.tags for c in backend.calls] == [[4]]
        await b.close()

    run(main())


def test_images_of_cancelled_and_expired_requests_are_never_run():
    """A 16-image request whose waiter is cancelled while the model is busy (its client went
    away) and one whose deadline passes while it waits: neither reaches the backend."""

    async def main():
        backend = StandIn(seconds=lambda n: 0.2)
        b = batcher(backend)
        now = time.perf_counter()
        busy = asyncio.create_task(b.submit([image(1)], now + 30))
        await asyncio.sleep(0.02)  # the model is busy with it
        gone = asyncio.create_task(b.submit([image(100 + i) for i in range(16)], now + 30))
        late = asyncio.create_task(b.submit([image(200)], now + 0.1))
        await asyncio.sleep(0.05)
        assert b.queued == 17
        gone.cancel()
        await asyncio.sleep(0.005)
        assert b.queued == 1  # withdrawn at once, with the model still busy
        await busy
        with pytest.raises(BackendTimeout):  # its deadline passed while it waited
            await late
        await asyncio.sleep(0.3)
        ran = [t for c in backend.calls for t in c.tags]
        assert ran == [1], ran
        assert b.queued == 0
        await b.close()

    run(main())


# ---------------------------------------------------------------------------- 2. fairness


def test_a_single_image_waits_for_one_batch_behind_a_large_request_not_all_of_it():
    async def main():
        backend = StandIn(seconds=lambda n: 0.05)
        b = batcher(backend, max_size=8)
        now = time.perf_counter()
        big = asyncio.create_task(b.submit([image(100 + i) for i in range(16)], now + 30))
        await asyncio.sleep(0.01)  # its first batch is at the model
        t0 = time.perf_counter()
        single = await b.submit([image(7)], now + 30)
        waited = time.perf_counter() - t0
        await big
        batches = [c.tags for c in backend.calls]
        assert len(batches) == 3 and 7 in batches[1], batches
        assert waited < 2 * 0.05 + 0.03, waited  # the batch in progress and its own
        assert tags_answered(single) == [7]
        await b.close()

    run(main())


def test_batches_take_one_image_of_each_request_in_turn():
    async def main():
        backend = StandIn(seconds=lambda n: 0.05)
        b = batcher(backend, max_size=6)
        now = time.perf_counter()
        busy = asyncio.create_task(b.submit([image(1)], now + 30))
        await asyncio.sleep(0.01)
        reqs = [
            asyncio.create_task(b.submit([image(base + i) for i in range(n)], now + 30))
            for base, n in ((100, 5), (200, 1), (300, 3))
        ]
        await asyncio.gather(busy, *reqs)
        assert [sorted(c.tags) for c in backend.calls[1:]] == [
            [100, 101, 102, 200, 300, 301],  # 1 of each, then 100 and 300 again, then 100
            [103, 104, 302],
        ]
        await b.close()

    run(main())


async def _frames_and_an_image(backend: StandIn) -> tuple[list[list[int]], float]:
    """Two videos with 8 frames each waiting (background), then one image: the batches run and
    how long the image waited."""
    b = batcher(backend, max_size=4)
    await warm(b)
    backend.calls.clear()
    now = time.perf_counter()
    frames = [
        asyncio.create_task(b.submit([image(1000 * v + i)], now + 30, background=True))
        for i in range(8)
        for v in (1, 2)
    ]
    await asyncio.sleep(0.01)  # the first batch of frames is at the model
    t0 = time.perf_counter()
    single = await b.submit([image(7)], now + 30)
    waited = time.perf_counter() - t0
    assert tags_answered(single) == [7]
    await asyncio.gather(*frames)
    await b.close()
    return [c.tags for c in backend.calls], waited


def test_images_go_before_the_frames_of_videos():
    """On a CPU-like backend (a call's time grows with its size) frames run one at a time (a
    larger batch would not be faster per frame) and the image runs in the next call, alone: it
    waits for the one frame at the model and its own call, not for the 16 frames queued before
    it. The videos take turns."""
    batches, waited = run(_frames_and_an_image(StandIn(seconds=lambda n: 0.02 * n)))
    assert batches[0] == [1000] and batches[1] == [7], batches
    frames = [b[0] for b in batches[2:]]
    assert all(len(b) == 1 for b in batches), batches
    assert frames[:4] == [2000, 1001, 2001, 1002], frames  # round-robin between the videos
    assert waited < 0.02 + 0.02 + 0.03, waited


def test_streams_newest_frames_run_one_at_a_time_on_a_cpu():
    """Four live streams each have their newest frame waiting, never eight: once a batch of
    four has been measured on a CPU-like backend, frames run one at a time, so an image waits
    for one frame's call, not four (the rule once waited for the full size's time, which four
    streams never run, and kept running fours: image p50 went from 0.3 to 1.2 s)."""

    async def main(backend: StandIn):
        b = batcher(backend, max_size=8)
        for _ in range(2):  # images of one: the pace of a call of one
            await b.submit([image(0)], time.perf_counter() + 30)
        backend.calls.clear()
        waits = []
        for round_ in range(8):
            now = time.perf_counter()
            frames = [
                asyncio.create_task(b.submit([image(1000 + s)], now + 30, background=True))
                for s in range(4)
            ]
            await asyncio.sleep(0.005)  # the frames' first call has begun
            if round_ >= 4:
                t0 = time.perf_counter()
                await b.submit([image(7)], now + 30)
                waits.append(time.perf_counter() - t0)
            await asyncio.gather(*frames)
        await b.close()
        return [len(c.tags) for c in backend.calls if min(c.tags) >= 1000], waits  # frames

    sizes, waits = run(main(StandIn(seconds=lambda n: 0.02 * n)))
    # a few calls of more than one frame while their time is measured, then one at a time
    assert sizes[-8:] == [1] * 8, sizes
    assert max(waits) < 0.02 + 0.02 + 0.03, waits  # one frame's call and its own
    # a backend whose calls cost much less per frame when larger (a fixed cost, as a GPU's):
    # the streams' frames keep running together, their throughput kept
    sizes, _ = run(main(StandIn(seconds=lambda n: 0.01 + 0.006 * n)))
    assert min(sizes[-6:]) >= 3, sizes


def test_video_frames_never_fill_the_queue_for_images():
    """The queue's bound is on images: frames beyond it (each video's window bounds them) never
    turn an image away."""

    async def main():
        backend = StandIn(seconds=lambda n: 0.02 * n)
        b = batcher(backend, max_size=4, max_queued=8)
        now = time.perf_counter()
        frames = [
            asyncio.create_task(b.submit([image(1000 + i)], now + 30, background=True))
            for i in range(12)
        ]
        await asyncio.sleep(0.005)
        images = await b.submit([image(i) for i in range(8)], now + 30)  # the whole bound
        assert tags_answered(images) == list(range(8))
        await asyncio.gather(*frames)
        await b.close()

    run(main())


def test_frames_ride_along_with_an_image_where_batches_are_cheap():
    """On a GPU-like backend (a call of 4 costs little more than one) the image's call is
    filled with frames: they cost the image nothing."""
    batches, waited = run(_frames_and_an_image(StandIn(seconds=lambda n: 0.04 + 0.002 * n)))
    assert 7 in batches[1] and len(batches[1]) == 4, batches
    assert waited < 2 * 0.05 + 0.03, waited


# ---------------------------------------------------------------------------- 3. every exit


@pytest.mark.parametrize(
    "failure", [asyncio.CancelledError(), RuntimeError("boom"), KeyboardInterrupt()]
)
def test_whatever_ends_a_call_every_request_in_it_is_answered_at_once(failure):
    async def main():
        backend = StandIn(fail_with=failure)
        b = batcher(backend)
        now = time.perf_counter()
        t0 = time.perf_counter()
        outcome = await asyncio.gather(
            b.submit([image(1)], now + 30), b.submit([image(2)], now + 30), return_exceptions=True
        )
        assert time.perf_counter() - t0 < 1.0
        assert all(isinstance(o, (RuntimeError, BackendUnavailable)) for o in outcome), outcome
        backend.fail_with = None  # and the batcher goes on
        assert tags_answered(await b.submit([image(3)], time.perf_counter() + 30)) == [3]
        await b.close()

    if isinstance(failure, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):  # re-raised in its task after answering
            run(main())
    else:
        run(main())


def test_images_that_cannot_be_stacked_fail_their_batch_at_once():
    async def main():
        b = batcher(StandIn())
        t0 = time.perf_counter()
        now = time.perf_counter()
        outcome = await asyncio.gather(
            b.submit([np.zeros((300, 300, 3), np.uint8)], now + 30),
            b.submit([np.zeros((10, 10, 3), np.uint8)], now + 30),
            return_exceptions=True,
        )
        assert time.perf_counter() - t0 < 1.0
        assert all(isinstance(o, ValueError) for o in outcome), outcome
        await b.close()

    run(main())


# ---------------------------------------------------------------------------- 4. the queue


def test_the_queue_is_bounded_in_images():
    async def main():
        backend = StandIn(seconds=lambda n: 0.2)
        b = batcher(backend, max_queued=10)
        now = time.perf_counter()
        first = asyncio.create_task(b.submit([image(1)] * 8, now + 30))
        await asyncio.sleep(0.01)  # at the model: the queue is empty again
        second = asyncio.create_task(b.submit([image(2)] * 8, now + 30))
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull) as refused:
            await b.submit([image(3)] * 3, now + 30)
        assert time.perf_counter() - t0 < 0.01
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
        await asyncio.gather(first, second)
        await b.close()

    run(main())


def test_a_request_that_could_not_be_run_before_its_deadline_is_refused_at_once():
    async def main():
        backend = StandIn(seconds=lambda n: 0.1)
        b = batcher(backend, max_size=4)
        await warm(b)
        now = time.perf_counter()
        waiting = [asyncio.create_task(b.submit([image(1)] * 4, now + 30)) for _ in range(4)]
        await asyncio.sleep(0.01)  # 3 batches wait, 0.3 s of model time
        with pytest.raises(QueueFull):
            await b.submit([image(2)], time.perf_counter() + 0.2)
        ok = await b.submit([image(3)], time.perf_counter() + 2)  # this one has time
        assert tags_answered(ok) == [3]
        await asyncio.gather(*waiting)
        await b.close()

    run(main())


# ---------------------------------------------------------------------------- 5. invariants


@pytest.mark.parametrize("seed", range(6))
def test_invariants_under_randomized_concurrent_traffic(seed):
    """Requests of 1-16 images (some of them video frames), two model versions, random
    deadlines, waiters cancelled at
    random moments, a backend of random pace that fails now and then, up to 3 calls at once.
    Checked: every request is answered with its own images' results or an error, never after
    its deadline by more than one call; no batch mixes versions or exceeds the size; no image of
    a request that had ended is run after; the backend never has more calls than slots; the
    queue is empty at the end."""
    rng = random.Random(seed)

    async def main():
        def seconds(n: int) -> float:
            if rng.random() < 0.05:
                raise RuntimeError("flaky")
            return rng.uniform(0.005, 0.03) * (1 + n / 8)

        backend = StandIn(seconds=seconds)
        b = batcher(backend, max_size=8, delay=0.003, concurrency=3, max_queued=120)
        pins = [object(), object()]
        ended: dict[int, float] = {}  # request -> when its waiter ended
        outcomes = []
        tag = iter(range(1, 1 << 24))

        async def one(rid: int):
            n = rng.randint(1, 16)
            tags = [next(tag) for _ in range(n)]
            owner.update({t: rid for t in tags})
            budget = rng.choice([0.02, 0.1, 0.3, 2.0])
            deadline = time.perf_counter() + budget
            pin = pin_of[rid] = rng.choice(pins)
            video = rng.random() < 0.3  # a video's frames: behind images
            task = asyncio.create_task(
                b.submit([image(t) for t in tags], deadline, pin, background=video)
            )
            if rng.random() < 0.2:
                await asyncio.sleep(rng.uniform(0, 0.05))
                task.cancel()
            try:
                results = await asyncio.wait_for(task, budget + 1.0)
            except asyncio.CancelledError:
                outcomes.append(("cancelled", rid))
            except (ApiError, RuntimeError) as exc:
                outcomes.append((type(exc).__name__, rid))
            else:
                assert tags_answered(results) == tags
                outcomes.append(("ok", rid))
            finally:
                ended[rid] = time.perf_counter()

        owner: dict[int, int] = {}
        pin_of: dict[int, object] = {}
        jobs = []
        for rid in range(150):
            jobs.append(asyncio.create_task(one(rid)))
            await asyncio.sleep(rng.expovariate(1 / 0.01))
        await asyncio.gather(*jobs)  # wait_for above: none hangs past its deadline + 1 s
        await asyncio.sleep(0.1)
        assert b.queued == 0 and not b._waiting
        assert backend.most_at_once <= 3
        for call in backend.calls:
            assert 1 <= len(call.tags) <= 8
            assert {pin_of[owner[t]] for t in call.tags} == {call.pin}
            for t in call.tags:  # nothing of a request already over was started
                assert call.started <= ended[owner[t]] + 1e-3, (t, owner[t])
        assert {k for k, _ in outcomes} >= {"ok"}
        await b.close()
        return outcomes

    outcomes = run(main())
    assert len(outcomes) == 150


# ---------------------------------------------------------------------------- 6. from a review


def test_one_slow_call_never_decides_the_pace():
    """A slow first call (a warm-up, a stall) must not make later requests expire or be refused:
    a size's time counts from its second call, as the fastest of its recent ones."""

    async def main():
        slow = [0.8]
        backend = StandIn(seconds=lambda n: slow.pop() if slow else 0.01 * n)
        b = batcher(backend)
        await b.submit([image(1)], time.perf_counter() + 1.0)  # 0.8 s: within its budget
        outcome = []
        for _ in range(10):
            results = await asyncio.gather(
                *(b.submit([image(2)], time.perf_counter() + 1.0) for _ in range(8)),
                return_exceptions=True,
            )
            outcome += [type(r).__name__ for r in results]
        assert set(outcome) == {"list"}, outcome
        await b.close()

    run(main())


def test_a_failed_batch_withdraws_the_rest_of_its_requests():
    async def main():
        backend = StandIn(seconds=lambda n: 0.05)
        b = batcher(backend, max_size=8)
        backend.fail_with = RuntimeError("boom")
        with pytest.raises(RuntimeError):
            await b.submit([image(100 + i) for i in range(20)], time.perf_counter() + 30)
        await asyncio.sleep(0.2)
        assert len(backend.calls) == 1 and b.queued == 0  # its 12 other images never ran
        await b.close()

    run(main())


def test_a_fault_in_making_a_batch_answers_the_waiting_and_the_batcher_goes_on():
    async def main():
        backend = StandIn()
        b = batcher(backend)
        real, failures = b._turns, [RuntimeError("bug")]

        def turns():
            if failures:
                raise failures.pop()
            return real()

        b._turns = turns
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable):
            await b.submit([image(1)], time.perf_counter() + 30)
        assert time.perf_counter() - t0 < 0.5
        assert tags_answered(await b.submit([image(2)], time.perf_counter() + 30)) == [2]
        await b.close()
        with pytest.raises(BackendUnavailable):  # after close: at once, never a hang
            await b.submit([image(3)], time.perf_counter() + 30)

    run(main())


def test_the_queue_holds_a_whole_request_and_a_whole_batch():
    from service.settings import Settings

    with pytest.raises(ValueError, match="SSD_BATCH_MAX_QUEUED_IMAGES"):
        Settings(batch_max_queued_images=8, max_files=16)
    Settings(batch_max_queued_images=16, max_files=16)
