"""Live streams sharing the model with image requests (``/v1/streams``, docs/streams.md).

Four MJPEG cameras on 127.0.0.1 (the test scene, 640x360, 25 frames/s each) detected at 5
frames/s each through ``python -m service`` over HTTP, while one client sends an image request
after another (a 640x480 JPEG, 0.2 s apart). Measured: the images' latency without the streams and
with them (goal: p50 within 1.5x of unloaded, the fairness rule of videos: frames are background
work), each stream's processed rate, and its lag (arrival at the worker -> detections) in the
first and the last third of the run (goal: no growth: the newest frame each time). On ONNX Runtime
fp32 (the default engine) and OpenVINO INT8. Random weights (the cost does not depend on them).

The camera mode's transport, measured: the scene's 640x360 frames sent one at a time (the next
once the answer came, as the page does) over the WebSocket of ``/v1/camera`` against one
``POST /v1/detect`` per frame on a kept-alive connection; frames a second and the median round
trip, on the same engines.

Run: PYTHONPATH=. .venv/bin/python benchmarks/streams_bench.py [--seconds 40] [--streams 4]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx

from benchmarks.common import cpu_flags, cpu_name, goal, machine, table
from benchmarks.cpu_engines_bench import exported
from benchmarks.gateway_bench import jpeg
from benchmarks.video_bench import image_latencies, pct, serve
from tests.service.video.stream_sources import Sources, scene_jpegs

CASES = (
    ("onnx", "ssd300_onnx", "ONNX Runtime fp32"),
    ("openvino", "ssd300_onnx_int8", "OpenVINO INT8"),
)


def measure(url: str, camera: str, streams: int, fps: float, seconds: float) -> dict:
    body = jpeg(640, 480)
    base: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=image_latencies, args=(url, body, stop, base))
    t.start()
    time.sleep(seconds / 2)
    stop.set()
    t.join()
    with httpx.Client(base_url=url, timeout=60) as c:
        ids = []
        for _ in range(streams):
            r = c.post("/v1/streams", json={"source": camera, "fps": fps, "max_detections": 20})
            r.raise_for_status()
            ids.append(r.json()["id"])
        time.sleep(3)  # connected, first frames through
        during: list[float] = []
        stop = threading.Event()
        t = threading.Thread(target=image_latencies, args=(url, body, stop, during))
        t.start()
        samples: list[list[dict]] = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            samples.append(c.get("/v1/streams").json()["streams"])
            time.sleep(1.0)
        stop.set()
        t.join()
        final = {s["id"]: s for s in c.get("/v1/streams").json()["streams"]}
        for sid in ids:
            c.delete(f"/v1/streams/{sid}")
    third = max(1, len(samples) // 3)
    lags = {
        sid: (
            statistics.median(
                s["lag_ms"]
                for row in samples[:third]
                for s in row
                if s["id"] == sid and s["lag_ms"]
            ),
            statistics.median(
                s["lag_ms"]
                for row in samples[-third:]
                for s in row
                if s["id"] == sid and s["lag_ms"]
            ),
        )
        for sid in ids
    }
    return {"base": base, "during": during, "final": final, "lags": lags, "ids": ids}


def camera_transport(url: str, frames: list[bytes]) -> list[list[object]]:
    """Frames a second and median round trip: WebSocket session against POST per frame."""
    from websockets.sync.client import connect

    rows = []
    ws_times: list[float] = []
    with connect(url.replace("http://", "ws://") + "/v1/camera", max_size=None) as ws:
        ws.send(frames[0])
        ws.recv()  # warm
        t0 = time.perf_counter()
        for f in frames:
            t = time.perf_counter()
            ws.send(f)
            ws.recv()
            ws_times.append(time.perf_counter() - t)
        ws_total = time.perf_counter() - t0
    post_times: list[float] = []
    with httpx.Client(base_url=url, timeout=60) as c:
        c.post("/v1/detect", content=frames[0], headers={"content-type": "image/jpeg"})
        t0 = time.perf_counter()
        for f in frames:
            t = time.perf_counter()
            r = c.post("/v1/detect", content=f, headers={"content-type": "image/jpeg"})
            r.raise_for_status()
            post_times.append(time.perf_counter() - t)
        post_total = time.perf_counter() - t0
    for name, total, times in (
        ("WebSocket /v1/camera (tracks, counts)", ws_total, ws_times),
        ("POST /v1/detect per frame (no tracks)", post_total, post_times),
    ):
        rows.append([name, len(times), f"{len(times) / total:.2f}", f"{pct(times, 50):.0f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=5.0)
    args = parser.parse_args(argv)
    print(f"# {machine()}: {cpu_name()} ({cpu_flags()})\n")
    camera_server = Sources(scene_jpegs(), fps=25)
    camera = camera_server.url + "/mjpeg"
    with tempfile.TemporaryDirectory() as tmp:
        repo = exported(Path(tmp))
        for backend, model, label in CASES:
            proc, url = serve(repo, backend, model)
            try:
                transport = camera_transport(url, scene_jpegs(60))
                m = measure(url, camera, args.streams, args.fps, args.seconds)
            finally:
                proc.terminate()
                proc.wait()
            ratio = pct(m["during"], 50) / pct(m["base"], 50)
            rows = [
                ["images alone", len(m["base"]), f"{pct(m['base'], 50):.0f}",
                 f"{pct(m['base'], 99):.0f}"],
                [f"images with {args.streams} streams", len(m["during"]),
                 f"{pct(m['during'], 50):.0f}", f"{pct(m['during'], 99):.0f}"],
            ]  # fmt: skip
            print(f"## {label}: the camera's transport, 60 frames of 640x360 one at a time\n")
            print(table(["", "frames", "frames/s", "round trip p50 ms"], transport))
            print(f"\n## {label}: {args.streams} streams at {args.fps:g} frames/s of 25\n")
            print(table(["", "requests", "p50 ms", "p99 ms"], rows))
            print(
                f"\n{goal('image p50 with streams within 1.5x of alone', ratio <= 1.5, f'{ratio:.2f}x')}\n"
            )
            srows = []
            for sid in m["ids"]:
                s = m["final"][sid]
                first, last = m["lags"][sid]
                srows.append(
                    [sid, s["state"], f"{s['input_fps']:.1f}", f"{s['processed_fps']:.2f}",
                     f"{first:.0f}", f"{last:.0f}", s["frames_processed"], s["frames_skipped"],
                     s["frames_late"], s["reconnects"]]
                )  # fmt: skip
            print(
                table(
                    [
                        "stream",
                        "state",
                        "input fps",
                        "processed fps",
                        "lag ms (first third)",
                        "lag ms (last third)",
                        "processed",
                        "skipped",
                        "late",
                        "reconnects",
                    ],
                    srows,
                )
            )
            growth = max(last / max(first, 1.0) for first, last in m["lags"].values())
            print(
                f"\n{goal('no stream lag growing (last third within 1.5x of the first)', growth <= 1.5, f'{growth:.2f}x at most')}\n"
            )
    camera_server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
