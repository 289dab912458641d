"""Start a real tritonserver (the binary shipped in nvidia-pytriton) for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from loadtest.processes import free_port


def triton_home() -> Path:
    import pytriton

    return Path(pytriton.__file__).parent / "tritonserver"


def prepare_python_backend() -> Path:
    """Put the Python 3.11 backend stub where tritonserver looks for it; returns backends dir."""
    home = triton_home()
    stub = home / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        src = home / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy2(src / "triton_python_backend_stub", stub)
    return home / "backends"


@dataclass
class TritonProcess:
    proc: subprocess.Popen
    grpc_port: int
    http_port: int
    log_path: Path

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_triton(
    repo: Path,
    models: list[str],
    log_path: Path,
    timeout: float = 60,
    ports: tuple[int, int] | None = None,
    poll_s: float | None = None,
) -> TritonProcess:
    """Start tritonserver with only ``models`` loaded; wait until ready.

    ``ports``: (grpc, http) to reuse (a restart); default: free ports. ``poll_s``: repository
    polling every so many seconds (every model of ``repo`` is loaded; the Helm chart's mode)
    instead of explicit model control.
    """
    import urllib.request

    backends = prepare_python_backend()
    home = triton_home()
    libs = home.parents[1] / "nvidia_pytriton.libs"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{libs}:{env.get('LD_LIBRARY_PATH', '')}"
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    grpc_port, http_port = ports or (free_port(), free_port())
    metrics_port = free_port()
    cmd = [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repo}",
        f"--backend-directory={backends}",
        *(
            ["--model-control-mode=explicit", *[f"--load-model={m}" for m in models]]
            if poll_s is None
            else ["--model-control-mode=poll", f"--repository-poll-secs={poll_s}"]
        ),
        f"--grpc-port={grpc_port}",
        f"--http-port={http_port}",
        f"--metrics-port={metrics_port}",
        "--strict-model-config=true",
        "--exit-on-error=true",
        "--log-verbose=0",
    ]
    log_file = open(log_path, "ab")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = TritonProcess(proc, grpc_port, http_port, log_path)
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{http_port}/v2/health/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"tritonserver exited with {proc.returncode}:\n{server.log()[-3000:]}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"tritonserver not ready after {timeout} s:\n{server.log()[-3000:]}")


@contextlib.contextmanager
def running_triton(repo: Path, models: list[str], log_path: Path) -> Iterator[TritonProcess]:
    server = start_triton(repo, models, log_path)
    try:
        yield server
    finally:
        server.stop()
