"""Rolling out a new model version under load: how long it takes to be served, and what the
requests around it see.

For each backend (embedded ONNX Runtime; the gateway over a real tritonserver, Python-backend
model), the gateway runs as ``python -m service`` with ``--clients`` threads posting 640x480
JPEGs. ``--rollouts`` new versions (ResNet-50, other weights each time) are written one after the
other with the export; after each one the gateway is sent SIGHUP (a check at once instead of the
next ``SSD_MODEL_POLL_S`` tick, so the figure is the switch itself, not the poll interval).

Reported: switch time (version complete on disk -> end of the first response from it; median and
max over the rollouts), and the latency of requests in the ``--seconds-before`` before any export
("before") and during a switch (from a version complete on disk to 1 s after its first
response), p50/p99, side by side in one run. On a 2-core machine the export itself (between the
switches) also takes CPU from the service; that time is in neither window. Failed requests are counted (the goal is 0).
Run: .venv/bin/python benchmarks/rollout_bench.py [--rollouts 3] [--clients 4] [--backbone resnet50]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from benchmarks.common import goal, machine, table
from benchmarks.gateway_bench import jpeg
from devtools.load import Load
from devtools.triton_server import start_triton
from loadtest.processes import free_port, ready_or_exit, service_command
from ssdcore.labels import COCO
from training.export import ExportOptions, Weights, export
from training.model import build_model, calibrate_random_model


def weights(seed: int, backbone: str) -> Weights:
    torch.manual_seed(seed)
    model = build_model(backbone)
    calibrate_random_model(model)
    return Weights(
        model, COCO, {"checkpoint": f"seed-{seed}", "sha256": None, "backbone": backbone}
    )


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "-"
    ms = np.array(latencies) * 1e3
    return f"{np.percentile(ms, 50):.0f} / {np.percentile(ms, 99):.0f}"


def run_backend(name: str, repo: Path, fmt: str, args, image: bytes) -> list:
    export(repo, [fmt], weights=weights(1, args.backbone), opts=ExportOptions(gpu=False))
    triton = None
    extra = ["--backend", "onnx"]
    if name == "triton":
        triton = start_triton(repo, ["ssd300_python"], repo.parent / "triton.log")
        extra = ["--backend", "triton", "--triton-url", triton.grpc_url,
                 "--model-name", "ssd300_python"]  # fmt: skip
    port = free_port()
    env = dict(os.environ, SSD_MODEL_POLL_S="3600", SSD_BACKEND_CONCURRENCY="2")
    proc = subprocess.Popen(service_command(port, repo, *extra), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    load = Load(url, image, args.clients)
    switches, windows = [], []
    try:
        ready_or_exit(url, proc)
        for t in load.threads:
            t.start()
        time.sleep(args.warmup)
        before_from = time.monotonic()
        time.sleep(args.seconds_before)
        before_until = time.monotonic()  # the exports below take CPU from the service too
        for seed in range(2, 2 + args.rollouts):
            written = export(repo, [fmt], weights=weights(seed, args.backbone),
                             opts=ExportOptions(gpu=False), keep=2)  # fmt: skip
            complete = time.monotonic()
            proc.send_signal(signal.SIGHUP)
            seen = load.wait_for(str(written[fmt].version), complete, timeout=300)
            switches.append(seen - complete)
            windows.append((complete, seen + 1.0))
            time.sleep(2.0)
    finally:
        load.stop.set()
        for t in load.threads:
            t.join(timeout=60)
        proc.terminate()
        proc.wait(timeout=60)
        if triton is not None:
            triton.stop()
    recs = load.answers
    before = [r.end - r.start for r in recs if before_from <= r.start and r.end <= before_until]
    during = [r.end - r.start for r in recs if any(a <= r.start <= b for a, b in windows)]
    failed = sum(1 for r in recs if r.status != 200)
    return [
        name,
        f"{statistics.median(switches):.2f} / {max(switches):.2f}",
        percentiles(before),
        percentiles(during),
        f"{len(before)} / {len(during)}",
        f"{failed} of {len(recs)}",
    ]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rollouts", type=int, default=3)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--seconds-before", type=float, default=15.0)
    p.add_argument("--backends", nargs="+", default=["embedded", "triton"])
    args = p.parse_args()
    image = jpeg(640, 480)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backends:
            fmt = "python" if name == "triton" else "onnx"
            rows.append(run_backend(name, Path(tmp) / name / "repo", fmt, args, image))
    print(f"machine: {machine()}; {args.clients} clients, {args.rollouts} rollouts, "
          f"{args.backbone}, SIGHUP after each version is complete")  # fmt: skip
    headers = ["backend", "switch s, median / max", "latency ms before, p50 / p99",
               "latency ms during a switch, p50 / p99", "requests before / during", "failed"]  # fmt: skip
    print(table(headers, rows))
    failed = [row[-1] for row in rows]
    print()
    print(goal("no failed request through the rollouts", all(f.startswith("0 of") for f in failed),
               "; ".join(f"{row[0]}: {row[-1]}" for row in rows)))  # fmt: skip


if __name__ == "__main__":
    main()
