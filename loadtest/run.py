"""Headless locust runs against the service, with CSV/HTML reports and a summary table.

    python loadtest/run.py [--host URL] [--backend onnx|triton] [--users 1 4 16] [--seconds 30]

Without --host it starts the service itself on the embedded backend (exporting a random-init model
with CPU instance groups first if --repo, by default loadtest/reports/model_repository, has none),
or, with --backend triton, a local tritonserver (Python backend, CPU) plus the gateway. Fails
(exit 1) on any failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from loadtest.processes import add_repo_argument, free_port, ready_or_exit, service_command


@contextlib.contextmanager
def local_service(repo: Path, backend: str, tmp: Path) -> Iterator[str]:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "training.export",
            "--output",
            str(repo),
            "--ensure",
            "--random-init",
            "--cpu",
        ],
        cwd=ROOT,
        check=True,
    )
    port = free_port()
    cmd = service_command(port, repo)
    env = dict(os.environ)
    with contextlib.ExitStack() as stack:
        if backend == "triton":
            from devtools.triton_server import running_triton

            server = stack.enter_context(
                running_triton(repo, ["ssd300_python"], tmp / "triton.log")
            )
            cmd += [
                "--backend",
                "triton",
                "--triton-url",
                server.grpc_url,
                "--model-name",
                "ssd300_python",
            ]
            env["SSD_BACKEND_CONCURRENCY"] = "2"
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            ready_or_exit(url, proc)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def locust_command(host: str, users: int, seconds: int, prefix: Path, *extra: str) -> list[str]:
    """Headless locust over the locustfile, CSV reports under ``prefix``."""
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(ROOT / "loadtest" / "locustfile.py"),
        "--headless",
        "--host",
        host,
        "--users",
        str(users),
        "--spawn-rate",
        str(users),
        "--run-time",
        f"{seconds}s",
        "--csv",
        str(prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
        *extra,
    ]


def run_locust(host: str, users: int, seconds: int, prefix: Path) -> dict:
    cmd = locust_command(host, users, seconds, prefix, "--html", f"{prefix}.html")
    subprocess.run(cmd, cwd=ROOT, check=False)
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    images_per_s = 0.0
    for r in rows:
        if r["Name"].startswith("POST"):
            n = int(r["Name"].split("(")[1].split()[0])
            images_per_s += n * float(r["Requests/s"])
    return {
        "users": users,
        "requests": int(total["Request Count"]),
        "failures": int(total["Failure Count"]),
        "req_s": float(total["Requests/s"]),
        "images_s": images_per_s,
        "p50": total["50%"],
        "p95": total["95%"],
        "p99": total["99%"],
    }


async def model_rate(repo: Path, seconds: float = 10, batch: int = 8) -> float:
    """The model alone: ONNX Runtime in process, batches of 8 already-resized images."""
    import numpy as np

    from service.backends.onnx import OnnxBackend

    backend = OnnxBackend(repo, "ssd300_onnx")
    await backend.start()
    images = np.random.default_rng(0).integers(0, 256, (batch, 300, 300, 3), dtype=np.uint8)
    await backend.infer(images)
    n, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < seconds:
        await backend.infer(images)
        n += batch
    rate = n / (time.monotonic() - t0)
    await backend.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--host", help="target a running service instead of starting one")
    p.add_argument("--backend", choices=["onnx", "triton"], default="onnx")
    p.add_argument("--users", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--seconds", type=int, default=30)
    add_repo_argument(p)
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "reports")
    p.add_argument("--model-rate", action="store_true", help="also time the model alone")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "loadtest" / "corpus.py")], check=True)
    results = []
    with contextlib.ExitStack() as stack:
        host = args.host or stack.enter_context(local_service(args.repo, args.backend, args.out))
        for users in args.users:
            results.append(
                run_locust(host, users, args.seconds, args.out / f"{args.backend}_{users}users")
            )
    print(f"\nbackend {args.backend}, {args.seconds} s per run, reports in {args.out}")
    print("| users | requests | failures | req/s | images/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['users']} | {r['requests']} | {r['failures']} | {r['req_s']:.2f} | "
            f"{r['images_s']:.2f} | {r['p50']} | {r['p95']} | {r['p99']} |"
        )
    if args.model_rate:
        rate = asyncio.run(model_rate(args.repo))
        print(f"\nthe model alone (ONNX Runtime in process, batch 8): {rate:.2f} images/s")
    failed = sum(r["failures"] for r in results)
    if failed or any(r["requests"] == 0 for r in results):
        print(f"FAILED: {failed} failed requests", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
