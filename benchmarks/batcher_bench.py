"""The micro-batcher under overload and beside large requests, over real HTTP.

The service (uvicorn, in this process) runs the exported ONNX model of ``model_repository/`` on
ONNX Runtime, paced so that a backend call of n images takes ``n x --per-image`` seconds (the
real run inside it, then a wait for the rest): the backend's capacity is known exactly
(1 / per-image images/s) and the load generator's threads do not change it.

1. Overload: single-image requests arrive at ``--overload`` x the capacity (open loop, evenly
   spaced) for ``--seconds``, each with the service's deadline ``--timeout`` (SSD_REQUEST_TIMEOUT_S).
   Measured: answers (200) per second against the capacity, refusals (503) and how fast they come,
   timeouts (504), and how many of the images the model ran belonged to answered requests.
   Goal: answered >= 90 % of the capacity, the rest refused fast or timed out.
2. Fairness: a single-image request sent just after a 16-image one, against the same single
   image alone (median of ``--trials``); the backend unpaced.

``--tree DIR`` imports the service from another checkout of this project (a before/after).

Run: .venv/bin/python benchmarks/batcher_bench.py [--seconds 20] [--tree /tmp/before]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose service to run")
    p.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--per-image", type=float, default=0.2, help="backend seconds per image")
    p.add_argument("--overload", type=float, default=1.5)
    p.add_argument("--timeout", type=float, default=1.0, help="the service's request deadline")
    p.add_argument("--trials", type=int, default=7)
    return p.parse_args()


ARGS = parse()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ARGS.tree))

import httpx
import numpy as np
import uvicorn

from benchmarks.common import cpu_flags, cpu_name, goal, machine, table
from devtools.images import encode
from loadtest.processes import free_port
from service.app import create_app
from service.backends.onnx import OnnxBackend
from service.http_server import server_config
from service.settings import Settings


class Paced:
    """The ONNX Runtime backend whose calls take ``per_image`` seconds an image (0: as they
    come); counts the images it ran."""

    def __init__(self, inner: OnnxBackend, per_image: float) -> None:
        self.inner, self.per_image = inner, per_image
        self.images = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    async def infer(self, images, timeout=None, pin=None):
        t0 = time.perf_counter()
        out = await self.inner.infer(images, timeout=timeout, pin=pin)
        rest = len(images) * self.per_image - (time.perf_counter() - t0)
        if rest > 0:
            await asyncio.sleep(rest)
        self.images += len(images)
        return out


class Service:
    def __init__(self, per_image: float, timeout: float) -> None:
        settings = Settings(
            model_repository=ARGS.repository,
            model_name="ssd300_onnx",
            request_timeout_s=timeout,
            max_in_flight=256,
            host="127.0.0.1",
            port=free_port(),
        )
        self.backend = Paced(
            OnnxBackend(ARGS.repository, "ssd300_onnx", settings.onnx_threads), per_image
        )
        config = server_config(create_app(settings, self.backend), settings, "warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{settings.port}"

    def __enter__(self) -> Service:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


IMAGE = encode(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8), quality=85)


def post(client: httpx.Client, n: int = 1) -> tuple[int, float]:
    files = [("images" if n > 1 else "image", (f"{i}.jpg", IMAGE, "image/jpeg")) for i in range(n)]
    t0 = time.perf_counter()
    status = client.post("/v1/detect", files=files).status_code
    return status, time.perf_counter() - t0


def overload() -> tuple[str, bool]:
    capacity = 1 / ARGS.per_image
    rate = ARGS.overload * capacity
    with Service(ARGS.per_image, ARGS.timeout) as live:
        with httpx.Client(base_url=live.url, timeout=30) as c:
            for _ in range(3):  # warm: the model's first runs, the batcher's pace
                post(c)
        ran0 = live.backend.images
        records: list[tuple[int, float]] = []
        local = threading.local()

        def one() -> None:
            if not hasattr(local, "client"):
                local.client = httpx.Client(base_url=live.url, timeout=30)
            records.append(post(local.client))

        n = int(rate * ARGS.seconds)
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(64) as pool:
            for i in range(n):
                time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
                pool.submit(one)
        elapsed = time.perf_counter() - t0
        ran = live.backend.images - ran0
    by = {s: [t for st, t in records if st == s] for s in {st for st, _ in records}}
    ok, refused, late = by.get(200, []), by.get(503, []), by.get(504, [])
    other = len(records) - len(ok) - len(refused) - len(late)
    answered_rate = len(ok) / elapsed
    share = answered_rate / capacity
    rows = [
        [
            f"{rate:.1f} req/s for {elapsed:.0f} s ({ARGS.overload}x)",
            f"{capacity:.1f}",
            f"{len(ok)} ({answered_rate:.2f}/s, **{100 * share:.0f} %** of capacity)",
            f"{len(refused)} (p95 {1e3 * p95(refused):.0f} ms)" if refused else "0",
            f"{len(late)} (p50 {statistics.median(late):.2f} s)" if late else "0",
            str(other),
            f"{ran} ({100 * len(ok) / max(ran, 1):.0f} % answered)",
            f"{statistics.median(ok):.2f} s" if ok else "-",
        ]
    ]
    text = table(
        [
            "offered",
            "capacity img/s",
            "answered (200)",
            "refused (503)",
            "timed out (504)",
            "other",
            "images run by the model",
            "answered p50",
        ],
        rows,
    )
    return text, share >= 0.9


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) > 1 else values[0]


def fairness() -> str:
    with (
        Service(0.0, 30.0) as live,
        httpx.Client(base_url=live.url, timeout=60) as c,
        httpx.Client(base_url=live.url, timeout=60) as big_client,
    ):
        for _ in range(3):
            post(c)
        alone = [post(c)[1] for _ in range(ARGS.trials)]
        behind, big = [], []
        for _ in range(ARGS.trials):
            with cf.ThreadPoolExecutor(1) as pool:
                large = pool.submit(post, big_client, 16)
                time.sleep(0.05)  # its first batch is at the model
                behind.append(post(c)[1])
                big.append(large.result()[1])
    a, b = statistics.median(alone), statistics.median(behind)
    text = table(
        ["single image", "median s", "ratio"],
        [
            ["alone", f"{a:.3f}", "1.00"],
            ["sent 50 ms after a 16-image request", f"{b:.3f}", f"{b / a:.2f}"],
            ["(the 16-image request itself)", f"{statistics.median(big):.3f}", ""],
        ],
    )
    return text


def main() -> None:
    tree = "this checkout" if ARGS.tree.resolve() == ROOT else f"the service of {ARGS.tree}"
    print(
        f"Measured on {cpu_name()} ({cpu_flags()}), {machine()}; {tree}; batches of 8 at most, "
        f"one backend call at a time; command: `python benchmarks/batcher_bench.py "
        f"--seconds {ARGS.seconds:g} --per-image {ARGS.per_image:g} --overload {ARGS.overload:g} "
        f"--timeout {ARGS.timeout:g}`.\n"
    )
    text, met = overload()
    print(f"Overload: single-image requests, deadline {ARGS.timeout:g} s, backend paced to "
          f"{ARGS.per_image:g} s an image.\n")  # fmt: skip
    print(text + "\n")
    print(goal("answered >= 90 % of the backend's capacity at 1.5x overload", met, "above") + "\n")
    text = fairness()
    print("Fairness: ONNX Runtime unpaced (about one model run per batch).\n")
    print(text)


if __name__ == "__main__":
    main()
