"""Tiled inference (``POST /v1/detect?tiles=...``), through ``python -m service`` over HTTP.

1. accuracy: the small-object set (devtools/small_objects.py: people and cars of 12-40 px on
   2000x1500 canvases the model never saw) with a ResNet-18 SSD trained on 400-pixel crops of
   such canvases (``train_model``, about 3 minutes): recall (score > 0.3, IoU 0.5) and COCO AP,
   AP50, AP_small, without tiles, with tiles (auto, 400 px), with tiles and the whole image; for
   each merge of the boxes tiles find twice (``SSD_TILE_MERGE``: nmm, nms). ONNX Runtime fp32.
2. cost: the SSD300 ResNet-50 (random weights: the cost does not depend on them) on a 2000x1500
   and a 4000x3000 photo (JPEG), without tiles and with ``tiles=auto`` (the default 600-pixel
   tiles, 0.2 overlap, and the whole image): model runs and the median milliseconds per image,
   one request at a time, on ONNX Runtime fp32 (``ssd300_onnx``) and OpenVINO INT8
   (``ssd300_onnx_int8``).

Run: .venv/bin/python benchmarks/tiles_bench.py [--parts accuracy cost] [--repo DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np

from benchmarks.common import cpu_flags, cpu_name, machine, table
from benchmarks.cpu_engines_bench import exported
from benchmarks.gateway_bench import jpeg, start
from devtools.small_objects import (
    TILE,
    as_coco_results,
    canvas,
    coco_ground_truth,
    jpeg_bytes,
    matched,
    train_model,
)
from loadtest.processes import free_port, service_command
from training.coco_eval import coco_evaluate

WAYS = (
    ("whole image", {}),
    ("tiles", {"tiles": "auto", "tile_size": TILE, "tile_whole": "false"}),
    ("tiles + whole image", {"tiles": "auto", "tile_size": TILE}),
)


def gateway(repo: Path, model: str, backend: str, env: dict[str, str]):
    port = free_port()
    cmd = service_command(port, repo, "--model-name", model, "--backend", backend)
    return start(cmd, port, {**os.environ, **env}), f"http://127.0.0.1:{port}"


def post(url: str, body: bytes, params: dict) -> tuple[dict, float]:
    t = time.perf_counter()
    r = httpx.post(
        url + "/v1/detect",
        params=params,
        content=body,
        headers={"content-type": "image/jpeg"},
        timeout=300,
    )
    r.raise_for_status()
    return r.json(), (time.perf_counter() - t) * 1e3


def accuracy(repo: Path, seeds: list[int], tmp: Path) -> list[list[object]]:
    canvases = [canvas(s) for s in seeds]
    bodies = [jpeg_bytes(c.image) for c in canvases]
    truth = coco_ground_truth(canvases, tmp / "truth.json")
    rows = []
    for merge in ("nmm", "nms"):
        proc, url = gateway(repo, "ssd300_onnx", "onnx", {"SSD_TILE_MERGE": merge})
        try:
            post(url, bodies[0], {})  # warm
            for name, params in WAYS:
                if merge == "nms" and not params:
                    continue  # nothing to merge
                hits, found, runs, ms = [], [], [], []
                for i, (c, body) in enumerate(zip(canvases, bodies)):
                    answer, took = post(url, body, {**params, "score_threshold": 0.05})
                    image = answer["images"][0]
                    confident = [d for d in image["detections"] if d["score"] > 0.3]
                    hits.append(matched(c.boxes, c.category_ids, confident))
                    found += as_coco_results(i + 1, image["detections"])
                    runs.append(answer.get("model_runs", 1))
                    ms.append(took)
                stats, _ = coco_evaluate(truth, found)
                rows.append(
                    [
                        name,
                        merge if params else "-",
                        f"{np.concatenate(hits).mean():.3f}",
                        f"{stats['AP']:.3f}",
                        f"{stats['AP50']:.3f}",
                        f"{stats['AP_small']:.3f}",
                        statistics.median(runs),
                        f"{statistics.median(ms):.0f}",
                    ]
                )
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def cost(repo: Path, repeats: int) -> list[list[object]]:
    photos = {"2000x1500": jpeg(2000, 1500), "4000x3000": jpeg(4000, 3000)}
    rows = []
    for backend, model, name in (
        ("onnx", "ssd300_onnx", "ONNX Runtime fp32"),
        ("openvino", "ssd300_onnx_int8", "OpenVINO INT8"),
    ):
        proc, url = gateway(repo, model, backend, {})
        try:
            for size, body in photos.items():
                base = None
                for label, params in (("whole image", {}), ("tiles=auto", {"tiles": "auto"})):
                    post(url, body, params)  # warm
                    ms, runs = [], 0
                    for _ in range(repeats):
                        answer, took = post(url, body, params)
                        ms.append(took)
                        runs = answer.get("model_runs", 1)
                        grid = answer["images"][0].get("tiles", {}).get("grid")
                    med = statistics.median(ms)
                    base = base or med
                    shown = f"{label} ({grid[0]}x{grid[1]})" if grid else label
                    rows.append([name, size, shown, runs, f"{med:.0f}", f"{med / base:.1f}x"])
        finally:
            proc.terminate()
            proc.wait(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["accuracy", "cost"])
    ap.add_argument("--repo", type=Path, help="a trained small-object model (else trained here)")
    ap.add_argument("--seeds", type=int, default=5, help="test canvases")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"Machine: {cpu_name()} ({machine()}); CPU flags: {cpu_flags()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "accuracy" in args.parts:
            t0 = time.perf_counter()
            repo = args.repo or train_model(tmp / "small", bf16=False)
            trained = "" if args.repo else f" (trained in {time.perf_counter() - t0:.0f} s)"
            print(
                f"\nSmall objects: {args.seeds} canvases of 2000x1500, 40 objects of 12-40 px "
                f"each; ResNet-18 SSD trained on 400-px crops{trained}; ONNX Runtime fp32; "
                "ms: median per image, one request at a time"
            )
            print(
                table(
                    ["run", "merge", "recall", "AP", "AP50", "AP_small", "model runs", "ms"],
                    accuracy(repo, list(range(args.seeds)), tmp),
                )
            )
        if "cost" in args.parts:
            print(
                f"\nCost per image, SSD300 ResNet-50 (random weights), median of "
                f"{args.repeats}, one request at a time"
            )
            print(
                table(
                    ["engine", "photo", "run", "model runs", "ms", "vs whole"],
                    cost(exported(tmp), args.repeats),
                )
            )


if __name__ == "__main__":
    main()
