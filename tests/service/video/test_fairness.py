"""Image requests keep their latency while videos are processed (the batcher's rule: images
before frames, and on a CPU no frame in an image's batch): real HTTP, the real model, two videos
streaming. The bound comes from what this machine measures: the image's latency without videos,
plus at most one batch of frames already at the model."""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from devtools.images import encode, photo
from devtools.videos import plain_clip
from service.settings import Settings
from tests.service.conftest import run_service

pytestmark = pytest.mark.slow
BATCH = 4


def latencies(url: str, body: bytes, n: int) -> tuple[list[float], list[float]]:
    """n sequential image requests: their latencies and the model's time for each (s)."""
    took, infer = [], []
    with httpx.Client(timeout=60) as c:
        for _ in range(n):
            t0 = time.perf_counter()
            r = c.post(url + "/v1/detect", content=body, headers={"content-type": "image/jpeg"})
            took.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            infer.append(r.json()["timings_ms"]["infer"] / 1e3)
    return took, infer


def test_an_image_waits_for_one_batch_of_frames_at_most(model_repo, tmp_path, figures):
    clip = plain_clip(tmp_path / "v.mp4", (96, 64), 400)
    body = encode(photo(640, 480, seed=4))
    settings = Settings(
        model_repository=model_repo, model_name="ssd300_onnx", batch_max_size=BATCH, max_videos=2
    )
    with run_service(settings) as live:
        latencies(live.url, body, 2)  # warm-up
        alone, infer = latencies(live.url, body, 8)
        progress = [0, 0]
        stop = threading.Event()

        def video(k: int) -> None:
            with (
                httpx.Client(timeout=120) as c,
                c.stream(
                    "POST", live.url + "/v1/videos", files={"video": ("v.mp4", clip.read_bytes())}
                ) as r,
            ):
                for line in r.iter_lines():
                    if line and "frame" in json.loads(line):
                        progress[k] += 1
                    if stop.is_set():
                        return

        threads = [threading.Thread(target=video, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while min(progress) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert min(progress) >= 2, "the videos did not start"
        before = list(progress)
        during, _ = latencies(live.url, body, 8)
        after = list(progress)
        stop.set()
        for t in threads:
            t.join(timeout=60)
    one = statistics.median(infer)
    base, busy = statistics.median(alone), statistics.median(during)
    bound = base + 1.5 * BATCH * one  # a batch of frames already at the model, with margin
    figures(
        "image latency while two videos run",
        f"p50 at most the latency alone + one batch of {BATCH} frames ({bound * 1e3:.0f} ms)",
        f"alone {base * 1e3:.0f} ms, with two videos {busy * 1e3:.0f} ms",
        f"{busy / base:.2f}x",
    )
    assert busy <= bound, (base, busy, one)
    assert all(a > b for a, b in zip(after, before)), "the videos stalled while images ran"
