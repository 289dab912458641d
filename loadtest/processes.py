"""The service as a child process: a free port, its command line, waiting until it is ready.

Shared by the load tests, the soak, the benchmarks and the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SCRATCH_REPO = Path(__file__).resolve().parents[1] / "loadtest" / "reports" / "model_repository"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_command(port: int, repo: Path | str, *extra: str) -> list[str]:
    """``python -m service`` on 127.0.0.1:``port`` over the model repository ``repo``."""
    return [
        sys.executable,
        "-m",
        "service",
        "--port",
        str(port),
        "--model-repository",
        str(repo),
        "--log-level",
        "warning",
        *extra,
    ]


class NotReady(RuntimeError):
    """The service exited or did not answer /readyz in time."""


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Poll ``url``/readyz until it answers 200; raise NotReady if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise NotReady(f"the service exited with {proc.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    raise NotReady(f"the service did not become ready within {timeout:.0f} s")


def ready_or_exit(url: str, proc: subprocess.Popen) -> None:
    """:func:`wait_ready` for the scripts: a service that does not come up ends them with an error."""
    try:
        wait_ready(url, proc)
    except NotReady as exc:
        raise SystemExit(f"error: {exc}") from None


def add_repo_argument(p: argparse.ArgumentParser) -> None:
    """``--repo`` of the load-test scripts, which export a CPU model into it when it has none."""
    p.add_argument(
        "--repo",
        type=Path,
        default=SCRATCH_REPO,
        help="model repository; a model with CPU instance groups is exported there when it has "
        "none (the default is a scratch folder: the checked-in repository is left alone)",
    )
