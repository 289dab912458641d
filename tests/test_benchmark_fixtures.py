"""The zero-cost backend that isolates the gateway's own cost in benchmarks/gateway_bench.py
keeps up with the Backend protocol, and the gateway answers through it over real HTTP."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import httpx

from benchmarks.zero_backend import ZeroCostBackend
from devtools.images import encode, photo
from loadtest.processes import free_port, wait_ready
from service.backends import Backend

ROOT = Path(__file__).resolve().parents[1]


def test_zero_cost_backend_has_every_member_of_the_protocol():
    backend = ZeroCostBackend()
    for name, member in vars(Backend).items():
        if name.startswith("_"):
            continue
        ours = getattr(backend, name, None)
        assert ours is not None, f"ZeroCostBackend has no {name}"
        if callable(member):
            want = list(inspect.signature(member).parameters)
            assert list(inspect.signature(getattr(ZeroCostBackend, name)).parameters) == want
    for name in Backend.__annotations__:
        assert hasattr(backend, name), f"ZeroCostBackend has no {name}"


def test_gateway_answers_through_the_zero_cost_backend():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "zero_backend.py"), str(port), "1"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=60)
        body = encode(photo(640, 480, seed=1), "JPEG")
        with httpx.Client(timeout=30) as client:
            for _ in range(3):  # the same keep-alive connection throughout
                r = client.post(
                    url + "/v1/detect", content=body, headers={"content-type": "image/jpeg"}
                )
                assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["model"]["version"] == "1"
        assert answer["images"][0]["detections"]
    finally:
        proc.terminate()
        proc.wait(10)
