"""Gateway figures: its own cost per image (zero-cost backend) and its efficiency over a real one.

1. Gateway CPU per image with a zero-cost backend (decode, resize, NMS, HTTP, JSON), for 640x480 and
   4000x3000 JPEGs, with DCT-scaled JPEG decoding (default) and with full decoding: the CPU seconds
   the server process used, divided by the images it answered.
2. Efficiency: images/s through HTTP (service on the embedded ONNX Runtime backend, 640x480 JPEGs)
   vs calling the same backend directly (already-resized images), at the same concurrency.
3. Where a 640x480 JPEG's decoding time goes, in this process (medians of single calls): the
   whole ``decode_image``, Pillow's open + decode, and the 300x300 resize.
Servers run as subprocesses; the client is this process (pre-encoded bodies, httpx threads).
Run: .venv/bin/python benchmarks/gateway_bench.py [--seconds 20] [--repo model_repository]
     [--parts cost decode efficiency]
Needs an exported model in ``--repo`` (``make model`` puts one in model_repository).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures as cf
import io
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx
import numpy as np
from PIL import Image

from benchmarks.common import goal, machine, median_seconds, table
from loadtest.processes import NotReady, free_port, service_command, wait_ready


def jpeg(width: int, height: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    img = coarse.resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def decode_breakdown() -> list[list[object]]:
    from service.imaging import ImageLimits, decode_image

    body = jpeg(640, 480)

    def load() -> Image.Image:
        img = Image.open(io.BytesIO(body))
        img.load()
        return img

    loaded = load()
    parts = {
        "decode_image (what a request pays)": lambda: decode_image(body, ImageLimits()),
        "Pillow open + decode": load,
        "resize to 300x300 (antialiased bilinear)": lambda: loaded.resize(
            (300, 300), Image.Resampling.BILINEAR
        ),
    }
    return [[name, f"{1e3 * median_seconds(fn, 300, warmup=10):.2f}"] for name, fn in parts.items()]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(cmd: list[str], port: int, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc)
    except NotReady:
        proc.kill()
        raise
    return proc


def load(url: str, body: bytes, concurrency: int, seconds: float) -> tuple[int, float, int]:
    """Post ``body`` as a raw image/jpeg from ``concurrency`` threads; returns (ok, seconds, errors)."""
    stop = time.monotonic() + seconds
    headers = {"content-type": "image/jpeg"}

    def worker() -> tuple[int, int]:
        ok = err = 0
        with httpx.Client(timeout=60) as c:
            while time.monotonic() < stop:
                r = c.post(url + "/v1/detect", content=body, headers=headers)
                ok, err = (ok + 1, err) if r.status_code == 200 else (ok, err + 1)
        return ok, err

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: worker(), range(concurrency)))
    return sum(r[0] for r in results), time.monotonic() - t0, sum(r[1] for r in results)


def gateway_cost(seconds: float) -> list[list[object]]:
    rows = []
    bodies = {"640x480": jpeg(640, 480), "4000x3000": jpeg(4000, 3000)}
    for dct in (True, False):
        port = free_port()
        proc = start(
            [sys.executable, "benchmarks/zero_backend.py", str(port), "1" if dct else "0"], port
        )
        try:
            for name, body in bodies.items():
                url = f"http://127.0.0.1:{port}"
                load(url, body, 4, 2)  # warm-up
                c0 = cpu_seconds(proc.pid)
                ok, elapsed, errors = load(url, body, 4, seconds)
                used = cpu_seconds(proc.pid) - c0
                rows.append(
                    [
                        name,
                        f"{len(body) / 1e3:.0f} kB",
                        "DCT-scaled" if dct else "full decode",
                        f"{1e3 * used / ok:.2f}",
                        f"{ok / elapsed:.0f}",
                        errors,
                    ]
                )
        finally:
            proc.terminate()
            proc.wait()
    return rows


async def direct_rate(repo: Path, concurrency: int, seconds: float) -> tuple[int, float]:
    from service.backends.onnx import OnnxBackend

    backend = OnnxBackend(repo, "ssd300_onnx")
    await backend.start()
    image = np.random.default_rng(0).integers(0, 256, (1, 300, 300, 3), dtype=np.uint8)
    await backend.infer(image)
    stop = time.monotonic() + seconds
    done = 0

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await backend.infer(image)
            done += 1

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - t0
    await backend.close()
    return done, elapsed


def efficiency(repo: Path, seconds: float, concurrency: int = 8) -> list[list[object]]:
    port = free_port()
    proc = start(service_command(port, repo), port)
    try:
        url = f"http://127.0.0.1:{port}"
        body = jpeg(640, 480)
        load(url, body, concurrency, 5)
        ok, elapsed, errors = load(url, body, concurrency, seconds)
    finally:
        proc.terminate()
        proc.wait()
    direct, d_elapsed = asyncio.run(direct_rate(repo, concurrency, seconds))
    http_rate, direct_rate_ = ok / elapsed, direct / d_elapsed
    return [
        [
            concurrency,
            f"{direct_rate_:.2f}",
            f"{http_rate:.2f}",
            f"{http_rate / direct_rate_:.2f}",
            errors,
        ]
    ]


def main() -> None:
    import PIL

    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--repo", type=Path, default=ROOT / "model_repository")
    p.add_argument("--parts", nargs="+", choices=["cost", "decode", "efficiency"], default=PARTS)
    args = p.parse_args()
    print(f"machine: {machine()}, Pillow {PIL.__version__}")
    if "cost" in args.parts:
        print("\nGateway CPU per image, zero-cost backend, 4 concurrent clients:")
        headers = ["image", "JPEG size", "decoding", "gateway CPU ms/image", "req/s", "errors"]
        rows = gateway_cost(args.seconds)
        print(table(headers, rows))
        small = [float(r[3]) for r in rows if r[0] == "640x480"]
        print()
        print(goal("at most 3 ms of gateway CPU per 640x480 image", max(small) <= 3,
                   " / ".join(f"{v:.2f} ms" for v in small)))  # fmt: skip
    if "decode" in args.parts:
        print("\nDecoding one 640x480 JPEG, this process, one thread (median ms):")
        print(table(["step", "ms"], decode_breakdown()))
    if "efficiency" in args.parts:
        print("\nEfficiency over the embedded ONNX Runtime backend (640x480 JPEG):")
        headers = ["concurrency", "direct backend images/s", "HTTP images/s", "ratio", "errors"]
        rows = efficiency(args.repo, args.seconds)
        print(table(headers, rows))
        ratio = float(rows[0][3])
        print()
        print(goal("HTTP at least 0.95 of the direct backend", ratio >= 0.95, f"{ratio:.2f}"))


PARTS = ["cost", "decode", "efficiency"]


if __name__ == "__main__":
    main()
