"""Fixtures that run the real service over HTTP (uvicorn in a background thread)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from loadtest.processes import NotReady, free_port, service_command, wait_ready
from service.app import create_app
from service.http_server import server_config
from service.settings import Settings
from ssdcore.repository import METADATA, ModelVersion


@dataclass
class LiveService:
    url: str
    settings: Settings
    server: uvicorn.Server

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)

    def metric(self, sample: str, **labels: str) -> float:
        """Sum of the samples named ``sample`` whose labels include ``labels``."""
        text = httpx.get(self.url + "/metrics").text
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )


def triton_settings(grpc_url: str, repo: Path, **overrides) -> Settings:
    """The gateway on the Triton backend, serving the Python-backend model of ``repo``."""
    return Settings(
        backend="triton",
        triton_url=grpc_url,
        model_name="ssd300_python",
        model_repository=repo,
        **overrides,
    )


def rerecord(version: ModelVersion, name: str, data: bytes) -> None:
    """Replace a file of a published version and record it in its metadata as the export would
    (a version put together by hand: its files pass the size and hash checks)."""
    version.file(name).write_bytes(data)
    meta = json.loads(version.file(METADATA).read_text())
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    version.file(METADATA).write_text(json.dumps(meta))


@contextlib.contextmanager
def run_service(settings: Settings, backend=None) -> Iterator[LiveService]:
    port = free_port()
    settings = settings.model_copy(update={"port": port, "host": "127.0.0.1"})
    config = server_config(create_app(settings, backend), settings, "warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("service did not start")
        time.sleep(0.05)
    try:
        yield LiveService(f"http://127.0.0.1:{port}", settings, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def start_service(
    repo: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """``python -m service`` as a child process, ready; returns (process, base URL)."""
    port = free_port()
    proc = subprocess.Popen(
        service_command(port, repo, *extra),
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=60)
    except NotReady:
        proc.kill()
        raise
    return proc, url


@pytest.fixture(scope="session")
def service(model_repo) -> Iterator[LiveService]:
    """The service on the embedded ONNX Runtime backend over the session's exported repository."""
    with run_service(Settings(model_repository=model_repo, model_name="ssd300_onnx")) as live:
        yield live
