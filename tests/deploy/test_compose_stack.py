"""The compose stack built from the project's Dockerfiles and run for real (make compose-test).

Triton (the stand-in of the NGC image where it cannot be pulled) serves the Python-backend
model of a scratch repository; the gateway is the image of Dockerfile.serve; requests go to
the published port on 127.0.0.1 only. Without an engine (and no way to install one) these
tests are skipped with the reason, except in CI or under ``make compose-test``
(SSD_COMPOSE_REQUIRED=1), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from devtools.images import encode, photo
from loadtest.processes import free_port
from service.settings import Settings
from tests.deploy.docker_stack import (
    FIGURES,
    ROOT,
    EngineUnavailable,
    Stack,
    base_images,
    ensure_engine,
    image_size_mb,
    layers,
    request_latency_ms,
    run,
    timed,
    write_figures,
)
from tests.service.conftest import run_service

pytestmark = [pytest.mark.compose, pytest.mark.slow]
FIGURES_FILE = ROOT / "loadtest" / "reports" / "compose_figures.json"
IMAGE = encode(photo(640, 480, seed=7), "JPEG")
PARAMS = {"score_threshold": 0.1, "max_detections": 50}


def detect(url: str, timeout: float = 30) -> httpx.Response:
    return httpx.post(
        url + "/v1/detect", files={"image": ("a.jpg", IMAGE, "image/jpeg")}, params=PARAMS,
        timeout=timeout,
    )  # fmt: skip


def parse_time(stamp: str) -> float:
    """Docker's RFC 3339 timestamps (nanoseconds) -> epoch seconds."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    base = datetime.fromisoformat(head + "+00:00").timestamp()
    return base + float("0." + (frac.split("+")[0] or "0"))


@pytest.fixture(scope="module")
def repo():
    """A scratch model repository (random init, CPU instance groups), readable by uid 10001."""
    from training.export import ExportOptions, export

    folder = Path(tempfile.mkdtemp(prefix="ssd300-compose-"))
    folder.chmod(0o755)
    export(folder, ["onnx", "python"], random_init=True, opts=ExportOptions(gpu=False))
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(repo):
    try:
        ensure_engine()
    except EngineUnavailable as exc:
        if os.environ.get("CI") or os.environ.get("SSD_COMPOSE_REQUIRED"):
            pytest.fail(f"make compose-test cannot run: {exc}")
        pytest.skip(str(exc))
    python_image, triton_image, standins = base_images()
    FIGURES["bases"] = "stand-ins built here" if standins else "official images"
    s = Stack(f"ssd300test{os.getpid()}", repo, free_port(), python_image, triton_image)
    timed("gateway build s", s.compose, "build", "gateway", timeout=1800)
    timed("gateway rebuild (cached) s", s.compose, "build", "gateway")
    gateway_image = "ssd300-gateway:latest"
    FIGURES["gateway image MB"] = image_size_mb(gateway_image)
    FIGURES["base image MB"] = image_size_mb(python_image)
    FIGURES["gateway layers MB"] = round(
        (image_size_mb(gateway_image) - image_size_mb(python_image)), 1
    )
    FIGURES["gateway layers"] = [
        [created[-90:], round(size / 1e6, 1)] for created, size in layers(gateway_image)[:8]
    ]
    s.started = time.time()
    try:
        t0 = time.monotonic()
        # the scratch repository is exported already: the export service (the training image,
        # tested in test_compose_full.py) is not needed, so --no-deps starts the two others
        s.compose("up", "-d", "--wait", "--wait-timeout", "300", "--no-deps", "triton", "gateway",
                  timeout=400)  # fmt: skip
        FIGURES["up --wait s"] = round(time.monotonic() - t0, 1)
        while True:
            r = detect(s.url)
            if r.status_code == 200:
                break
            assert time.monotonic() - t0 < 120, r.text
            time.sleep(0.5)
        FIGURES["up to first 200 s"] = round(time.monotonic() - t0, 1)
        yield s
    finally:
        s.compose("down", "--remove-orphans", "--volumes", "--timeout", "20", check=False)
        write_figures(FIGURES_FILE, "compose figures")


def test_up_waits_for_triton_then_the_gateway(stack):
    triton, gateway = stack.inspect("triton"), stack.inspect("gateway")
    assert triton["State"]["Health"]["Status"] == "healthy"
    assert gateway["State"]["Health"]["Status"] == "healthy"
    events = run(
        ["docker", "events", "--since", str(int(stack.started)), "--until", str(int(time.time())),
         "--filter", f"container={triton['Id']}", "--filter", "event=health_status",
         "--format", "{{json .}}"], timeout=60,
    ).stdout.split("\n")  # fmt: skip
    healthy = min(
        json.loads(e)["timeNano"] / 1e9
        for e in events
        if e.strip() and json.loads(e).get("Action", "").endswith(": healthy")
    )
    # compose started the gateway only once Triton had passed its health check
    assert parse_time(gateway["State"]["StartedAt"]) >= healthy - 0.5
    assert httpx.get(stack.url + "/readyz", timeout=10).json() == {"ready": True}


def test_detections_through_the_published_port_are_the_embedded_ones(stack, repo):
    served = detect(stack.url)
    assert served.status_code == 200, served.text
    body = served.json()
    assert body["model"] == {
        "name": "ssd300_python", "version": "1", "backend": "triton", "random_weights": True,
    }  # fmt: skip
    model = httpx.get(stack.url + "/v1/models", timeout=10).json()["models"][0]
    assert model["name"] == "ssd300_python" and model["ready"] is True
    # the embedded backend, in this process, on the same ONNX file of the same repository
    with run_service(Settings(model_repository=repo, model_name="ssd300_onnx")) as live:
        embedded = detect(live.url).json()
    dets = body["images"][0]["detections"]
    assert dets and dets == embedded["images"][0]["detections"]


def test_a_video_through_the_stack(stack, tmp_path):
    """The gateway image decodes and tracks videos (PyAV, supervision) over Triton; the upload
    waits on the gateway's video volume, not in its memory-backed /tmp."""
    from devtools.videos import plain_clip

    clip = plain_clip(tmp_path / "clip.mp4", (160, 120), 12)
    r = httpx.post(
        stack.url + "/v1/videos",
        files={"video": ("clip.mp4", clip.read_bytes())},
        params={"max_detections": 5},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert "summary" in lines[-1], lines[-3:]  # an error line says why
    summary = lines[-1]["summary"]
    assert summary["frames_processed"] == 12 and summary["model"]["backend"] == "triton"
    assert all(x["model_version"] == "1" for x in lines[:-1])
    spool = stack.exec("gateway", "sh", "-c", "ls -d /videos/gateway-* && ls /tmp")
    assert spool.returncode == 0 and "/videos/gateway-" in spool.stdout, spool.stdout


def test_request_latency(stack):
    """The figure the played Kubernetes pods are compared with (test_kube_play.py)."""
    FIGURES["request ms (20 sequential, 640x480 JPEG)"] = request_latency_ms(stack.url)


def test_gateway_container_is_locked_down(stack):
    assert stack.exec("gateway", "id", "-u").stdout.strip() == "10001"
    touch = stack.exec("gateway", "sh", "-c", "touch /opt/x")
    assert touch.returncode != 0 and "Read-only file system" in touch.stderr
    caps = stack.exec("gateway", "sh", "-c", "grep CapEff /proc/1/status").stdout.split()
    assert caps[-1] == "0000000000000000"
    torch = stack.exec("gateway", "python", "-c", "import torch")
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr
    config = stack.inspect("gateway")["HostConfig"]
    assert config["ReadonlyRootfs"] is True and config["CapDrop"] == ["ALL"]
    # Triton publishes nothing on the host: it is reachable on the internal network only
    triton = stack.inspect("triton")
    assert not any(triton["NetworkSettings"]["Ports"].values())
    assert not triton["HostConfig"]["PortBindings"]


def test_killed_triton_gives_503_then_compose_restarts_it(stack):
    pid = stack.inspect("triton")["State"]["Pid"]
    restarts = stack.inspect("triton")["RestartCount"]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)  # a crash, not `docker stop`: the restart policy applies
    while True:
        r = detect(stack.url, timeout=15)
        if r.status_code == 503:
            break
        assert time.monotonic() - t0 < 30, f"no 503 after 30 s: {r.status_code} {r.text}"
        time.sleep(0.1)
    FIGURES["kill -> first 503 s"] = round(time.monotonic() - t0, 2)
    assert r.headers.get("Retry-After") and r.json()["error"]["code"] == "backend_unavailable"
    ready = httpx.get(stack.url + "/readyz", timeout=10)
    assert ready.status_code == 503 and ready.json()["ready"] is False
    while True:
        r = detect(stack.url, timeout=15)
        if r.status_code == 200:
            break
        assert r.status_code == 503, r.text  # never a 500 or a hang while Triton is away
        assert time.monotonic() - t0 < 180, "Triton did not come back within 180 s"
        time.sleep(0.25)
    FIGURES["kill -> 200 again s"] = round(time.monotonic() - t0, 1)
    assert stack.inspect("triton")["RestartCount"] == restarts + 1
    assert httpx.get(stack.url + "/readyz", timeout=10).json() == {"ready": True}


def test_locust_against_the_stack(stack):
    import subprocess
    import sys

    from loadtest.run import run_locust

    subprocess.run([sys.executable, str(ROOT / "loadtest" / "corpus.py")], check=True)
    # users from a latency measured now, not a fixed number: each Triton call has the gateway's
    # 5 s deadline (SSD_TRITON_TIMEOUT_S) and waits behind the calls of the other users on the
    # one CPU instance, so u users need about u x L; keep that under half the deadline, so that
    # another process taking a core (CI runs beside other jobs) cannot push a call past it
    latency = unloaded_latency(stack.url)
    users = max(1, min(4, int(0.5 * TRITON_DEADLINE_S / latency)))
    result = run_locust(stack.url, users, 20, ROOT / "loadtest" / "reports" / "compose_users")
    FIGURES[f"locust {users} users 20 s (unloaded latency {latency:.2f} s)"] = result
    assert result["requests"] > 0 and result["failures"] == 0


TRITON_DEADLINE_S = 5.0  # the gateway's default SSD_TRITON_TIMEOUT_S, which compose keeps


def unloaded_latency(url: str, n: int = 5) -> float:
    """Median seconds of ``n`` sequential detection requests (one image each)."""
    from devtools.images import encode, photo

    body = encode(photo(640, 480, seed=4), "JPEG")
    times = []
    for _ in range(n):
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/detect", files={"image": ("a.jpg", body)}, timeout=60)
        assert r.status_code == 200, r.text
        times.append(time.monotonic() - t0)
    return sorted(times)[n // 2]


def test_down_leaves_no_container_or_network(stack):
    assert stack.leftovers()["container"]  # while up, the filter does find them
    stack.compose("down", "--remove-orphans", "--timeout", "20")
    assert stack.leftovers() == {"container": [], "network": []}
