"""The gateway under a real tritonserver that is killed, restarted and hung (reliability §3)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from devtools.images import encode, photo
from devtools.load import Load
from devtools.triton_server import start_triton
from tests.service.conftest import run_service, triton_settings
from tests.waiting import wait_for

pytestmark = [pytest.mark.triton, pytest.mark.slow]
JPEG = encode(photo(), "JPEG")


def test_triton_killed_and_restarted(model_repo, tmp_path, figures):
    log = tmp_path / "triton.log"
    server = start_triton(model_repo, ["ssd300_python"], log)
    ports = (server.grpc_port, server.http_port)
    settings = triton_settings(
        server.grpc_url,
        model_repo,
        request_timeout_s=5.0,
        triton_timeout_s=5.0,
    )
    try:
        with run_service(settings) as live, Load(live.url, JPEG, clients=3, timeout=30) as load:
            wait_for(lambda: any(a.status == 200 for a in load.answers), 30)
            killed_at = time.monotonic()
            server.proc.send_signal(signal.SIGKILL)
            server.proc.wait()
            first_503 = wait_for(
                lambda: any(a.status == 503 and a.end > killed_at for a in load.answers), 10
            )
            assert httpx.get(live.url + "/readyz").status_code == 503
            time.sleep(1.0)
            server = start_triton(model_repo, ["ssd300_python"], log, ports=ports)
            ready_at = time.monotonic()
            recovery = wait_for(
                lambda: any(a.status == 200 and a.start > ready_at for a in load.answers), 15
            )
            wait_for(lambda: httpx.get(live.url + "/readyz").status_code == 200, 5)
        statuses = {a.status for a in load.answers}
        hung = [
            a.end - a.start
            for a in load.answers
            if a.end - a.start > settings.request_timeout_s + 1
        ]
    finally:
        server.stop()
    figures(
        "Triton killed under load, restarted",
        "503 while down, /readyz false, back after",
        f"statuses {sorted(statuses)}; {len(hung)} hung requests",
        f"first 503 {first_503:.2f} s after the kill; 200 again {recovery:.2f} s after Triton "
        "was ready",
    )
    assert first_503 <= 1.0
    assert recovery <= 5.0
    assert statuses <= {200, 503}, statuses
    assert not hung


def test_triton_hung_gives_504_at_the_deadline(model_repo, tmp_path, figures):
    server = start_triton(model_repo, ["ssd300_python"], tmp_path / "triton.log")
    deadline = 2.0
    settings = triton_settings(
        server.grpc_url,
        model_repo,
        request_timeout_s=deadline,
    )
    try:
        with run_service(settings) as live, live.client() as c:
            assert c.post("/v1/detect", files={"image": ("x.jpg", JPEG)}).status_code == 200
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                results = []
                for _ in range(3):
                    t0 = time.monotonic()
                    r = c.post("/v1/detect", files={"image": ("x.jpg", JPEG)})
                    results.append((r.status_code, time.monotonic() - t0, r.json()))
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            wait_for(
                lambda: c.post("/v1/detect", files={"image": ("x.jpg", JPEG)}).status_code == 200,
                20,
                0.2,
            )
    finally:
        server.stop()
    figures(
        "Triton hung (SIGSTOP), 2 s deadline",
        "504 at the deadline",
        ", ".join(str(s) for s, _, _ in results),
        "latencies " + ", ".join(f"{t:.2f} s" for _, t, _ in results),
    )
    for status, elapsed, body in results:
        assert status == 504 and body["error"]["code"] == "backend_timeout", (status, elapsed, body)
        assert abs(elapsed - deadline) <= 0.5, elapsed


def test_triton_queue_full_surfaces_as_503(model_repo, tmp_path, figures):
    """Triton's bounded queue (REJECT when full) becomes a quick 503 at the gateway."""
    import shutil

    from training.export import ExportOptions, triton_config

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / "ssd300_python", repo / "ssd300_python")
    opts = ExportOptions(max_queue_size=1, queue_delay_us=0, max_batch_size=1)
    (repo / "ssd300_python" / "config.pbtxt").write_text(triton_config("python", opts))
    server = start_triton(repo, ["ssd300_python"], tmp_path / "triton.log")
    settings = triton_settings(
        server.grpc_url,
        repo,
        backend_concurrency=12,
        batch_max_size=1,
        batch_max_delay_ms=0,
        request_timeout_s=30,
    )
    try:
        with run_service(settings) as live:

            def post(_):
                with httpx.Client(base_url=live.url, timeout=60) as c:
                    t0 = time.monotonic()
                    r = c.post("/v1/detect", files={"image": ("x.jpg", JPEG)})
                    return r.status_code, time.monotonic() - t0, r.json()

            import concurrent.futures as cf

            with cf.ThreadPoolExecutor(12) as pool:
                results = list(pool.map(post, range(24)))
    finally:
        server.stop()
    codes = [s for s, _, _ in results]
    rejected = [(t, b) for s, t, b in results if s == 503]
    figures(
        "Triton queue full (queue of 1, 12 concurrent calls)",
        "503 from the gateway",
        f"{codes.count(200)} served, {len(rejected)} 503, {len(codes) - codes.count(200) - len(rejected)} other",
        f"503 answered in at most {max(t for t, _ in rejected):.2f} s; 0 hung",
    )
    assert set(codes) <= {200, 503} and rejected and 200 in codes
    assert all(b["error"]["code"] == "backend_unavailable" for _, b in rejected)
