"""Videos through the gateway (``POST /v1/videos``), side by side with the model alone.

1. speed: a 1280x720 H.264 clip (the test scene's shapes, 25 fps) through ``python -m service``
   over HTTP, decoding (worker process), micro-batching, NMS and tracking included, on ONNX
   Runtime fp32 (``ssd300_onnx``) and OpenVINO INT8 (``ssd300_onnx_int8``); against the same
   engine alone on the same 300x300 frames (decoded once beforehand) in batches of 8, as the
   batcher runs them. The ratio is the share of the model's own pace the video path keeps
   (goal: at least 0.9). Where the time went, from the answer's summary: waiting for a decoded
   frame (what decoding did not overlap), waiting for the model, NMS, tracking; and decode +
   resize alone per frame (libswscale, in one process).
2. long: a 10-minute 640x360 clip sampled at 2 frames/s (``fps=2``; 15000 frames decoded, 1200
   detected) on OpenVINO INT8, with the memory of the gateway and its decoding worker sampled
   every half second (goal: flat), and a single image request after another all along: its
   latency against the same requests without the video (goal: p50 within 1.5x).

Random weights (the cost does not depend on them). Run: .venv/bin/python benchmarks/video_bench.py
[--parts speed long] [--frames 100] [--minutes 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np
import openvino as ov
import psutil

from benchmarks.common import cpu_flags, cpu_name, goal, machine, table
from benchmarks.cpu_engines_bench import exported, ort_run, ov_compile, ov_run
from benchmarks.gateway_bench import jpeg, start
from devtools.videos import TEST_SCENE, Mover, write_clip
from loadtest.processes import free_port, service_command
from service.video.decode import frames, open_video
from service.video.protocol import VideoLimits

BATCH = 8
CASES = (
    ("onnx", "ssd300_onnx", "ONNX Runtime fp32"),
    ("openvino", "ssd300_onnx_int8", "OpenVINO INT8"),
)
LIMITS = VideoLimits(50_000_000, 8192, 7200)


def scaled(scene: tuple[Mover, ...], k: float) -> tuple[Mover, ...]:
    out = []
    for m in scene:
        kind = (*m.kind[:3], (m.kind[3][0] * k, m.kind[3][1] * k))
        start = (m.start[0] * k, m.start[1] * k)
        end = (m.end[0] * k, m.end[1] * k)
        out.append(Mover(kind, start, end, m.first, m.last))
    return tuple(out)


def decoded(clip: Path) -> tuple[list[np.ndarray], float]:
    """The clip's frames at 300x300, and decode + resize seconds per frame (in this process)."""
    t0 = time.perf_counter()
    with open_video(clip) as container:
        pixels = [f.pixels for f in frames(container, None, LIMITS, threads=1)]
    return pixels, (time.perf_counter() - t0) / len(pixels)


def model_alone(run, pixels: list[np.ndarray], batch: int) -> float:
    """Frames per second of the engine alone in batches of ``batch`` (a warm-up call first)."""
    batches = [np.stack(pixels[i : i + batch]) for i in range(0, len(pixels), batch)]
    run(batches[0])
    t0 = time.perf_counter()
    for b in batches:
        run(b)
    return len(pixels) / (time.perf_counter() - t0)


def post_video(url: str, clip: Path, **params) -> dict:
    with httpx.Client(timeout=600) as c, clip.open("rb") as f:
        r = c.post(url + "/v1/videos", params=params, files={"video": (clip.name, f)})
    r.raise_for_status()
    last = json.loads(r.text.strip().splitlines()[-1])
    if "summary" not in last:
        raise RuntimeError(f"the video ended with {last}")
    return last["summary"]


def serve(repo: Path, backend: str, model: str):
    port = free_port()
    cmd = service_command(port, repo, "--model-name", model, "--backend", backend)
    return start(cmd, port, dict(os.environ)), f"http://127.0.0.1:{port}"


def speed(repo: Path, tmp: Path, n: int) -> str:
    clip = tmp / "clip720.mp4"
    write_clip(clip, scaled(TEST_SCENE, 2.0), frames=n, size=(1280, 720))
    pixels, decode_s = decoded(clip)
    rows, shares, ratios = [], [], {}
    for backend, model, name in CASES:
        path = repo / model / "1" / "model.onnx"
        run = ort_run(path) if backend == "onnx" else ov_run(ov_compile(ov.Core(), path))
        by_batch = {b: model_alone(run, pixels, b) for b in (1, BATCH)}
        alone = max(by_batch.values())  # the engine's best pace
        proc, url = serve(repo, backend, model)
        try:
            post_video(url, clip, fps=25, max_detections=20)  # warm-up (the batcher's pace too)
            runs = [post_video(url, clip, max_detections=20) for _ in range(2)]
        finally:
            proc.terminate()
            proc.wait()
        fps = statistics.median(r["frames_per_second"] for r in runs)
        ratios[name] = fps / alone
        rows.append(
            [
                name,
                f"{fps:.2f}",
                f"{by_batch[1]:.2f}",
                f"{by_batch[BATCH]:.2f}",
                f"{fps / alone:.2f}",
            ]
        )
        t = runs[-1]["timings_ms"]
        total = t["total"]
        shares.append(
            [name]
            + [
                f"{100 * t[k] / total:.0f} %"
                for k in ("decode_wait", "model_wait", "postprocess", "tracking")
            ]
        )
    out = [
        f"{n} frames, 1280x720 H.264 at 25 fps, every frame detected; video: `POST /v1/videos` "
        "(median of 2 runs after a warm-up); model alone: the same engine on the same decoded "
        "frames, frames/s in batches of 1 and of 8 (on a CPU the batcher runs frames one at a "
        "time, since a batch is no faster per frame there).",
        "",
        table(
            [
                "engine",
                "video frames/s (HTTP, all included)",
                "model alone, batch 1",
                "model alone, batch 8",
                "ratio to batch 1",
                "ratio to the faster",
            ],
            rows,
        ),
        "",
        goal(
            "the video path keeps at least 0.9 of the model's pace",
            all(r >= 0.9 for r in ratios.values()),
            ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
        ),
        "",
        "Where the answer's time went (share of its wall time):",
        "",
        table(
            ["engine", "waiting for a decoded frame", "waiting for the model", "NMS", "tracking"],
            shares,
        ),
        "",
        f"Decode + resize to 300x300 alone (PyAV, libswscale bilinear, one thread): "
        f"{1e3 * decode_s:.1f} ms a frame.",
    ]
    return "\n".join(out)


class Sampler(threading.Thread):
    """RSS of a process and its children (MiB), every half second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, float, float]] = []  # (t, gateway, workers)
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.wait(0.5):
            try:
                main = self.proc.memory_info().rss
                kids = sum(c.memory_info().rss for c in self.proc.children(recursive=True))
            except psutil.Error:
                continue
            self.samples.append((time.monotonic() - t0, main / 2**20, kids / 2**20))


def image_latencies(url: str, body: bytes, stop: threading.Event, out: list[float]) -> None:
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = c.post(url + "/v1/detect", content=body, headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                out.append(time.perf_counter() - t0)
            time.sleep(0.2)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1e3, q))


def long(repo: Path, tmp: Path, minutes: float) -> str:
    clip = tmp / "long.mp4"
    n = int(minutes * 60 * 25)
    write_clip(clip, TEST_SCENE, frames=n, size=(640, 360))
    proc, url = serve(repo, "openvino", "ssd300_onnx_int8")
    body = jpeg(640, 480)
    try:
        base: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=image_latencies, args=(url, body, stop, base))
        t.start()
        time.sleep(20)
        stop.set()
        t.join()
        sampler = Sampler(proc.pid)
        sampler.start()
        during: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=image_latencies, args=(url, body, stop, during))
        t.start()
        summary = post_video(url, clip, fps=2, max_detections=20)
        stop.set()
        t.join()
        sampler.stop.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait()
    s = sampler.samples
    gateway = [g for _, g, _ in s]
    workers = [w for _, _, w in s if w > 0]
    tenth = max(1, len(s) // 10)
    early = statistics.median(g for _, g, _ in s[tenth : 2 * tenth])
    late = statistics.median(g for _, g, _ in s[-2 * tenth : -tenth] or s[-tenth:])
    ratio = pct(during, 50) / pct(base, 50)
    rows = [
        ["without the video", len(base), f"{pct(base, 50):.0f}", f"{pct(base, 99):.0f}"],
        [
            "while the video is processed",
            len(during),
            f"{pct(during, 50):.0f}",
            f"{pct(during, 99):.0f}",
        ],
    ]
    out = [
        f"A {minutes:g}-minute 640x360 H.264 clip ({n} frames at 25 fps), `fps=2`: "
        f"{summary['frames_decoded']} frames decoded, {summary['frames_processed']} detected in "
        f"{summary['timings_ms']['total'] / 1e3:.0f} s on OpenVINO INT8.",
        "",
        f"Memory (RSS) of the gateway: {early:.0f} MiB in the second tenth of the run, {late:.0f} "
        f"MiB in the ninth, {max(gateway):.0f} MiB at most; its decoding worker: "
        f"{min(workers):.0f}-{max(workers):.0f} MiB."
        if workers
        else "no worker seen",
        "",
        goal(
            "memory flat over the video", late <= early * 1.1 + 10, f"{early:.0f} -> {late:.0f} MiB"
        ),
        "",
        "A 640x480 JPEG request every 0.2 s after the previous answer (ms):",
        "",
        table(["", "requests", "p50", "p99"], rows),
        "",
        goal(
            "an image request's p50 within 1.5x of its value without video",
            ratio <= 1.5,
            f"{ratio:.2f}x",
        ),
    ]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--parts", nargs="+", default=["speed", "long"], choices=["speed", "long"])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--minutes", type=float, default=10)
    args = p.parse_args()
    print(f"{cpu_name()} ({cpu_flags()}), {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = exported(tmp)
        for part in args.parts:
            print()
            print(
                speed(repo, tmp, args.frames) if part == "speed" else long(repo, tmp, args.minutes)
            )


if __name__ == "__main__":
    main()
