"""The chart's Triton and gateway pod specs, rendered by Helm, run for real by `podman kube play`
with the project's images (the gateway of Dockerfile.serve, the Triton image the compose tests
use), and detection requests sent through them.

Skipped where neither Docker nor podman can be had, except in CI, where that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from deploy.chart import one, render
from devtools.images import encode, photo
from loadtest.processes import free_port
from tests.deploy.docker_stack import (
    ROOT,
    EngineUnavailable,
    Stack,
    base_images,
    ensure_engine,
    image_exists,
    request_latency_ms,
)
from tests.deploy.kube_play import Played, PodmanUnavailable, copy_image, ensure_podman, podman

pytest.importorskip("helm_python")
pytestmark = [pytest.mark.kube, pytest.mark.slow]
FIGURES_FILE = ROOT / "loadtest" / "reports" / "kube_play_figures.json"
FIGURES: dict[str, object] = {}
GATEWAY_IMAGE = "ssd300-gateway:latest"
RELEASE, NAMESPACE = "play", "ssd300"
MODEL = "ssd300_python"  # no GPU and no ONNX Runtime backend in the Triton stand-in


def image_values(tag: str) -> dict:
    repository, _, version = tag.rpartition(":")
    return {"repository": repository, "tag": version, "pullPolicy": "Never"}


def values(triton_image: str, gateway_port: int, metrics_port: int, triton_url: str = "") -> dict:
    small = {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "3Gi"}}
    return {
        "model": {"name": MODEL},
        "export": {"enabled": False},  # the scratch repository is exported here (the claim)
        "triton": {"gpu": False, "image": image_values(triton_image), "pollSeconds": 2,
                   "resources": small, "shmSize": "256Mi"},
        "gateway": {"image": image_values(GATEWAY_IMAGE), "replicas": 1, "port": gateway_port,
                    "metricsPort": metrics_port, "tritonUrl": triton_url, "resources": small,
                    "apiKey": {"value": "play-key"}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def images():
    """Both images, built from the project's Dockerfiles as the compose tests build them."""
    try:
        ensure_engine()
        env = ensure_podman()
    except (EngineUnavailable, PodmanUnavailable) as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the pod specs cannot be played here: {exc}")
        pytest.skip(str(exc))
    python_image, triton_image, _ = base_images()
    if not image_exists(GATEWAY_IMAGE):
        Stack("ssd300play", Path(tempfile.gettempdir()), free_port(), python_image,
              triton_image).compose("build", "gateway", timeout=1800)  # fmt: skip
    FIGURES["copy to podman s"] = {
        tag: copy_image(env, tag) for tag in (GATEWAY_IMAGE, triton_image)
    }
    return env, triton_image


@pytest.fixture(scope="module")
def repo():
    from training.export import ExportOptions, export

    folder = Path(tempfile.mkdtemp(prefix="ssd300-play-"))
    folder.chmod(0o755)
    export(folder, ["python"], random_init=True, opts=ExportOptions(gpu=False))
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def without_shm_volume(deployment: dict) -> dict:
    """The one change to a rendered pod spec: podman plays an emptyDir of medium Memory as a
    disk volume, and one mounted on /dev/shm stays root's (a kubelet makes it a world-writable
    tmpfs), so the Python backend (uid 1000) could not create its shared memory there. Without
    that mount podman gives the container a tmpfs /dev/shm of its own, which is what a kubelet's
    emptyDir is."""
    spec = deployment["spec"]["template"]["spec"]
    spec["volumes"] = [v for v in spec["volumes"] if v["name"] != "shm"]
    for c in spec["containers"]:
        c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/dev/shm"]
    return deployment


def wait_for(url: str, timeout: float, headers: dict | None = None, what: str = "") -> float:
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what or url} not ready after {timeout} s")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def played(images, repo, tmp_path_factory):
    env, triton_image = images
    folder = tmp_path_factory.mktemp("play")
    port, metrics = free_port(), free_port()
    first = render(values(triton_image, port, metrics), RELEASE, NAMESPACE)
    claim = one(first, "PersistentVolumeClaim")["metadata"]["name"]
    # the claim: a podman volume of that name, bound to the scratch repository
    podman(env, "volume", "rm", "-f", claim, check=False)
    podman(env, "volume", "create", "--opt", "type=none", "--opt", "o=bind",
           "--opt", f"device={repo}", claim)  # fmt: skip
    triton = Played(env, [without_shm_volume(one(first, "Deployment", "triton"))], folder,
                    "triton")  # fmt: skip
    gateway = None
    try:
        t0 = time.monotonic()
        triton.play()
        triton_ip = triton.ip()
        ready = f"http://{triton_ip}:8000/v2/models/{MODEL}/ready"  # its readiness probe
        try:
            FIGURES["triton: play to model ready s"] = round(wait_for(ready, 180), 1)
        except AssertionError:
            raise AssertionError(triton.logs()) from None
        rendered = render(values(triton_image, port, metrics, f"{triton_ip}:8001"), RELEASE,
                          NAMESPACE)  # fmt: skip
        # the API key's Secret, as the API server would hold it: podman 4.3 looks a
        # secretKeyRef up in a podman secret of that name holding the Secret's data as JSON
        secret = one(rendered, "Secret")
        podman(env, "secret", "rm", secret["metadata"]["name"], check=False)
        podman(env, "secret", "create", secret["metadata"]["name"], "-",
               input=json.dumps(secret["data"]))  # fmt: skip
        gateway = Played(env, [one(rendered, "Deployment", "gateway")], folder, "gateway")
        t1 = time.monotonic()
        gateway.play()
        url = f"http://{gateway.ip()}:{port}"
        try:
            wait_for(url + "/readyz", 120)
        except AssertionError:
            raise AssertionError(gateway.logs()) from None
        FIGURES["gateway: play to /readyz 200 s"] = round(time.monotonic() - t1, 1)
        FIGURES["both: first play to gateway ready s"] = round(time.monotonic() - t0, 1)
        yield {"url": url, "metrics": f"http://{gateway.ip()}:{metrics}", "triton": triton,
               "gateway": gateway, "triton_url": f"http://{triton_ip}:8000"}  # fmt: skip
    finally:
        for p in (gateway, triton):
            if p is not None:
                p.down()
        podman(env, "volume", "rm", "-f", claim, check=False)
        podman(env, "secret", "rm", f"{RELEASE}-ssd300-api-key", check=False)
        FIGURES_FILE.parent.mkdir(parents=True, exist_ok=True)
        FIGURES_FILE.write_text(json.dumps(FIGURES, indent=2))
        print("\nkube play figures:", json.dumps(FIGURES, indent=2))


KEY = {"X-API-Key": "play-key"}


def test_detections_through_the_played_pods(played):
    body = encode(photo(640, 480, seed=7), "JPEG")
    r = httpx.post(played["url"] + "/v1/detect", files={"image": ("a.jpg", body, "image/jpeg")},
                   params={"score_threshold": 0.1}, headers=KEY, timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["model"]["name"] == MODEL and r.json()["model"]["backend"] == "triton"
    assert r.json()["model"]["version"] == "1"
    # the key from the chart's Secret is required
    refused = httpx.post(played["url"] + "/v1/detect", files={"image": ("a.jpg", body)},
                         timeout=60)  # fmt: skip
    assert refused.status_code == 401
    # /metrics on its own port without the key (what the PodMonitor scrapes), not on the API's
    assert "ssd_requests_total" in httpx.get(played["metrics"] + "/metrics", timeout=10).text
    assert httpx.get(played["url"] + "/metrics", headers=KEY, timeout=10).status_code == 404
    assert (
        "nv_inference_request_success"
        in httpx.get(played["triton_url"].replace(":8000", ":8002") + "/metrics", timeout=10).text
    )


def test_latency_beside_the_compose_stack(played):
    latency = request_latency_ms(played["url"], headers=KEY)
    FIGURES["request ms (20 sequential, 640x480 JPEG)"] = latency


def test_pod_specs_are_honoured(played):
    env = played["gateway"].env
    gateway = played["gateway"].container("gateway")
    config, host = gateway["Config"], gateway["HostConfig"]
    assert config["User"].split(":")[0] == "10001"
    assert host["ReadonlyRootfs"] is True
    assert host["Memory"] == 3 * 1024**3
    assert not gateway["EffectiveCaps"]
    assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or [])
    proc = podman(env, "exec", gateway["Id"], "python", "-c", "open('/opt/x', 'w')", check=False)
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    proc = podman(env, "exec", gateway["Id"], "python", "-c", "open('/models/x', 'w')",
                  check=False)  # fmt: skip
    assert proc.returncode != 0 and "Read-only file system" in proc.stderr
    assert podman(env, "exec", gateway["Id"], "id", "-u").stdout.strip() == "10001"
    triton = played["triton"].container("tritonserver")
    assert triton["Config"]["User"].split(":")[0] == "1000"
    assert triton["HostConfig"]["ReadonlyRootfs"] is True and not triton["EffectiveCaps"]


def test_a_new_version_rolls_out_in_the_played_pods(played, repo):
    """Poll mode as the chart runs it: a version copied into the claim is loaded by Triton
    itself, and the gateway labels its answers with it, with no restart of either pod."""
    from ssdcore.repository import ModelStore
    from tests.service.versions import copy_version

    store = ModelStore(repo, MODEL)
    t0 = time.monotonic()
    copy_version(store.version(1).path, store, 2)  # appears in one rename, as the export's
    for path in [store.version(2).path, *store.version(2).path.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)  # readable by the pods' users
    body = encode(photo(320, 240, seed=3), "JPEG")
    while True:
        r = httpx.post(played["url"] + "/v1/detect", files={"image": ("a.jpg", body)},
                       headers=KEY, timeout=60)  # fmt: skip
        assert r.status_code == 200, r.text
        if r.json()["model"]["version"] == "2":
            break
        assert time.monotonic() - t0 < 90, played["triton"].logs()
        time.sleep(0.25)
    FIGURES["new version on the claim to the first answer from it s"] = round(
        time.monotonic() - t0, 1
    )
    restarts = [c["RestartCount"] for p in ("triton", "gateway") for c in played[p].containers()]
    assert restarts == [0] * len(restarts)
