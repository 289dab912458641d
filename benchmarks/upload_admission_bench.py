"""Normal requests beside upload attacks, for two source trees side by side (before / after).

For each tree (``--trees DIR ...``, each a checkout of this project; ``python -m service`` runs
from it on its default settings) and each attack, over raw sockets from many loopback addresses:
- N stalled uploads (headers and a few bytes of a 9 MiB body, then nothing), N = 100, 500, 960
  (the connection cap is 1024);
- N trickling uploads, each at 1.5x ``SSD_BODY_MIN_RATE`` (12 kB/s) toward 9 MiB.
Measured: sequential normal requests (a 640x480 JPEG sent whole) for 10 s before and during the
attack: p50/p99, how many were refused, and the service's largest RSS during the attack.

Run: .venv/bin/python benchmarks/upload_admission_bench.py --trees /tmp/before . [--seconds 10]
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np
import psutil
from PIL import Image

from benchmarks.common import cpu_flags, cpu_name, machine, table
from devtools.raw_uploads import Trickler, partial_upload, source
from loadtest.processes import free_port, wait_ready

RATE = 8192  # the default SSD_BODY_MIN_RATE


def jpeg() -> bytes:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize((640, 480))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def normal(url: str, body: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    try:
        r = httpx.post(url + "/v1/detect", content=body, headers={"content-type": "image/jpeg"},
                       timeout=120)  # fmt: skip
        status = r.status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - t0


def measure(url: str, body: bytes, seconds: float, proc=None) -> dict:
    statuses, times, rss = [], [], []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        status, took = normal(url, body)
        statuses.append(status)
        times.append(took)
        if proc is not None:
            rss.append(psutil.Process(proc.pid).memory_info().rss / 2**20)
    ok = [t for s, t in zip(statuses, times) if s == 200]
    return {
        "n": len(statuses),
        "refused": sum(s != 200 for s in statuses),
        "p50": 1e3 * statistics.median(ok) if ok else float("nan"),
        "p99": 1e3 * sorted(ok)[max(0, round(0.99 * len(ok)) - 1)] if ok else float("nan"),
        "rss": max(rss) if rss else float("nan"),
    }


def run(tree: Path, repo: Path, attack: str, n: int, seconds: float, body: bytes) -> dict:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--model-repository", str(repo)],
        cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    trickler = None
    socks: list[socket.socket] = []
    try:
        wait_ready(url, proc, timeout=120)
        measure(url, body, 2)  # warm-up
        before = measure(url, body, seconds)
        rss0 = psutil.Process(proc.pid).memory_info().rss / 2**20
        socks = [partial_upload(port, source(i)) for i in range(n)]
        if attack == "trickling":
            trickler = Trickler(socks, 1.5 * RATE).start()
        time.sleep(1.0)
        during = measure(url, body, seconds, proc)
    finally:
        if trickler is not None:
            trickler.close()
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(timeout=30)
    return {"before": before, "during": during, "rss0": rss0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", nargs="+", type=Path, default=[ROOT])
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--counts", nargs="+", type=int, default=[100, 500, 960])
    args = p.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    print(f"machine: {cpu_name()}, {machine()}; CPU flags: {cpu_flags()}")
    body = jpeg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        subprocess.run([sys.executable, "-m", "training.export", "--output", str(repo),
                        "--formats", "onnx", "--cpu", "--random-init"], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        for attack in ("stalled", "trickling"):
            for n in args.counts:
                for tree in args.trees:
                    r = run(tree.resolve(), repo, attack, n, args.seconds, body)
                    b, d = r["before"], r["during"]
                    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                                         capture_output=True, text=True).stdout.strip()  # fmt: skip
                    rows.append([f"{n} {attack}", rev, f"{b['p50']:.0f} / {b['p99']:.0f}",
                                 f"{d['p50']:.0f} / {d['p99']:.0f}",
                                 f"{d['refused']} of {d['n']}",
                                 f"{r['rss0']:.0f} -> {d['rss']:.0f}"])  # fmt: skip
                    print(rows[-1], flush=True)
    print()
    print(table(["attack", "tree", "normal p50 / p99 ms, unloaded", "p50 / p99 ms, during",
                 "normal refused", "RSS MB"], rows))  # fmt: skip


if __name__ == "__main__":
    main()
