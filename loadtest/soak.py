"""Soak: sustained locust load on the service while its RSS, open files and latency are sampled.

    python loadtest/soak.py [--minutes 10] [--users 16] [--warmup 60] [--repo DIR]
                            [--out loadtest/reports/soak]

Starts the service on the embedded backend (exporting a random-init CPU model into --repo when it
has none), runs locust headless, samples the server process every 2 s and prints a JSON summary of
the window after --warmup: requests, failures, RSS growth over the second half (least-squares
trend), open-file change, latency percentiles per quarter. Exit 1 on any failed request.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import psutil

from loadtest.processes import add_repo_argument, free_port, ready_or_exit, service_command
from loadtest.run import locust_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--users", type=int, default=16)
    p.add_argument(
        "--warmup", type=float, default=60, help="seconds of load before the measured window"
    )
    add_repo_argument(p)
    p.add_argument("--sample-s", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "reports" / "soak")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "corpus.py")], check=True, capture_output=True
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.export",
            "--output",
            str(args.repo),
            "--ensure",
            "--random-init",
            "--cpu",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    port = free_port()
    server = subprocess.Popen(service_command(port, args.repo), cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    samples: list[dict] = []
    stop = threading.Event()
    try:
        ready_or_exit(url, server)
        ps = psutil.Process(server.pid)

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append(
                    {
                        "t": time.monotonic() - t0,
                        "rss_mb": ps.memory_info().rss / 2**20,
                        "fds": ps.num_fds(),
                        "threads": ps.num_threads(),
                    }
                )
                stop.wait(args.sample_s)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        seconds = int(args.minutes * 60 + args.warmup)
        subprocess.run(
            locust_command(url, args.users, seconds, args.out, "--csv-full-history"),
            cwd=ROOT,
            check=False,
        )
        stop.set()
        sampler.join()
    finally:
        server.terminate()
        server.wait(timeout=60)

    with open(f"{args.out}_stats.csv") as f:
        total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
    with open(f"{args.out}_stats_history.csv") as f:
        history = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    measured = [s for s in samples if s["t"] >= args.warmup]
    middle = (measured[0]["t"] + measured[-1]["t"]) / 2
    half = [s for s in measured if s["t"] >= middle]
    # RSS oscillates by tens of MB as batches come and go: a least-squares trend over the second
    # half says whether it grows, where the difference of two samples would mostly be noise
    t = np.array([s["t"] for s in half])
    rss = np.array([s["rss_mb"] for s in half])
    slope = float(np.polyfit(t, rss, 1)[0]) if len(half) > 2 else 0.0
    # the same trend over the whole measured window, and the spread around it (what a short
    # run's verdict is measured against: growth within that noise is not a trend)
    t_all = np.array([s["t"] for s in measured])
    rss_all = np.array([s["rss_mb"] for s in measured])
    if len(measured) > 2:
        fit = np.polyfit(t_all, rss_all, 1)
        span = t_all[-1] - t_all[0]
        growth_all = float(fit[0] * span)
        noise = float(np.std(rss_all - np.polyval(fit, t_all)))
        # the standard error of that growth (slope's standard error times the window)
        growth_se = noise / (np.sqrt(len(t_all)) * float(np.std(t_all))) * span
    else:
        growth_all, noise, growth_se = 0.0, 0.0, 0.0
    quarters = []
    if history:
        step = max(1, len(history) // 4)
        for i in range(0, len(history), step):
            row = history[min(i + step, len(history)) - 1]
            quarters.append({"p50_ms": row.get("50%"), "p95_ms": row.get("95%")})
    summary = {
        "minutes": args.minutes,
        "users": args.users,
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "req_s": float(total["Requests/s"]),
        "p50_ms": total["50%"],
        "p95_ms": total["95%"],
        "p99_ms": total["99%"],
        "warmup_s": args.warmup,
        "rss_start_mb": round(measured[0]["rss_mb"], 1),
        "rss_end_mb": round(samples[-1]["rss_mb"], 1),
        "rss_growth_second_half_mb": round(slope * (t[-1] - t[0]), 1),
        "rss_second_half_min_max_mb": [round(float(rss.min()), 1), round(float(rss.max()), 1)],
        "rss_growth_measured_mb": round(growth_all, 1),
        "rss_noise_mb": round(noise, 1),
        "rss_growth_se_mb": round(float(growth_se), 1),
        "fds_start": measured[0]["fds"],
        "fds_end": measured[-1]["fds"],
        "latency_by_quarter": quarters,
    }
    (args.out.parent / f"{args.out.name}_samples.json").write_text(json.dumps(samples))
    print(json.dumps(summary))
    return 1 if summary["failures"] or not summary["requests"] else 0


if __name__ == "__main__":
    sys.exit(main())
