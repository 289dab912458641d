"""Resident memory and throughput of the service under load: glibc's adaptive mmap threshold
(``SSD_MMAP_THRESHOLD=0``) vs the service's fixed 1 MiB threshold (the default).

The two configurations run alternately, ``--rounds`` times each, on the embedded ONNX Runtime
backend with 640x480 JPEGs from ``--clients`` threads for ``--seconds`` each; the server's RSS is
sampled every 0.5 s. Reported per configuration: images/s (median over rounds), RSS median and
maximum over the second half of each round, and the least-squares RSS trend over that half.
Run: .venv/bin/python benchmarks/memory_bench.py [--seconds 60] [--rounds 2] [--clients 8]
Needs an exported model in ``--repo`` (default model_repository; ``make model`` puts one there).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import psutil

from benchmarks.common import machine, table
from benchmarks.gateway_bench import jpeg, load
from loadtest.processes import free_port, ready_or_exit, service_command
from service.memory import MMAP_THRESHOLD

CONFIGS = {
    "glibc adaptive (SSD_MMAP_THRESHOLD=0)": "0",
    f"fixed {MMAP_THRESHOLD >> 20} MiB (default)": str(MMAP_THRESHOLD),
}


def one_round(repo: Path, threshold: str, seconds: float, clients: int) -> dict:
    port = free_port()
    env = dict(os.environ, SSD_MMAP_THRESHOLD=threshold)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    proc = subprocess.Popen(
        service_command(port, repo),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    try:
        url = f"http://127.0.0.1:{port}"
        ready_or_exit(url, proc)
        ps = psutil.Process(proc.pid)
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic() - t0, ps.memory_info().rss / 2**20))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ok, elapsed, errors = load(url, jpeg(640, 480), clients, seconds)
        stop.set()
        sampler.join()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    half = [(t, r) for t, r in samples if t >= samples[-1][0] / 2]
    t, rss = np.array([h[0] for h in half]), np.array([h[1] for h in half])
    return {
        "rate": ok / elapsed,
        "errors": errors,
        "rss_median": float(np.median(rss)),
        "rss_max": float(rss.max()),
        "trend": float(np.polyfit(t, rss, 1)[0] * (t[-1] - t[0])),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    args = p.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, threshold in CONFIGS.items():
            results[name].append(one_round(args.repo, threshold, args.seconds, args.clients))
    print(
        f"machine: {machine()}; {args.rounds} rounds of {args.seconds:.0f} s, {args.clients} clients"
    )
    rows = []
    for name, runs in results.items():
        rows.append(
            [
                name,
                f"{statistics.median(r['rate'] for r in runs):.2f}",
                " / ".join(f"{r['rss_median']:.0f}" for r in runs),
                " / ".join(f"{r['rss_max']:.0f}" for r in runs),
                " / ".join(f"{r['trend']:+.0f}" for r in runs),
                sum(r["errors"] for r in runs),
            ]
        )
    headers = [
        "malloc",
        "images/s (median)",
        "RSS MB, median (each round)",
        "RSS MB, max",
        "RSS trend MB",
        "errors",
    ]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
