"""The training image and the export service of the compose file, for real (make compose-test,
and make test in CI; a plain make test elsewhere skips it: torch's CUDA wheels are GBs to fetch).

The image of Dockerfile.train is built (on the stand-in base where the official one cannot be
pulled), runs ``--help``, and the compose file's ``export`` service turns a checkpoint into the
model repository that Triton then serves to the gateway: the stack exactly as ``docker compose
up`` runs it, GPU reservation aside.
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
import torch

from devtools.images import encode, photo
from loadtest.processes import free_port
from tests.deploy.docker_stack import (
    FIGURES,
    ROOT,
    EngineUnavailable,
    Stack,
    base_images,
    ensure_engine,
    image_size_mb,
    timed,
    write_figures,
)
from training.model import build_model, calibrate_random_model

pytestmark = [pytest.mark.compose, pytest.mark.slow]
FIGURES_FILE = ROOT / "loadtest" / "reports" / "compose_full_figures.json"


@pytest.fixture(scope="module")
def folders():
    if not (os.environ.get("CI") or os.environ.get("SSD_COMPOSE_REQUIRED")):
        pytest.skip("make compose-test runs this (it fetches torch's CUDA wheels: GBs)")
    try:
        ensure_engine()
    except EngineUnavailable as exc:
        pytest.fail(f"make compose-test cannot run: {exc}")
    base = Path(tempfile.mkdtemp(prefix="ssd300-compose-full-"))
    repo, checkpoints = base / "repo", base / "checkpoints"
    for folder in (base, repo, checkpoints):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o777)  # the export container writes as uid 10001
    torch.manual_seed(0)
    model = build_model()
    calibrate_random_model(model)  # trained-like outputs; the stack does not care
    torch.save({"model": model.state_dict()}, checkpoints / "checkpoint.pt")
    (checkpoints / "checkpoint.pt").chmod(0o644)
    yield repo, checkpoints
    shutil.rmtree(base, ignore_errors=True)


def test_training_image_runs_help_and_the_export_service_feeds_the_stack(folders):
    repo, checkpoints = folders
    python_image, triton_image, _ = base_images()
    stack = Stack(
        f"ssd300full{os.getpid()}", repo, free_port(), python_image, triton_image, checkpoints
    )
    try:
        timed("training image build s", stack.compose, "build", "export", timeout=3600)
        timed("training image rebuild (cached) s", stack.compose, "build", "export", timeout=3600)
        FIGURES["training image MB"] = image_size_mb("ssd300-train:latest")
        usage = stack.compose("run", "--rm", "--no-deps", "export", "--help")
        assert "python -m training.export" in usage.stdout and "--checkpoint" in usage.stdout
        train_help = stack.compose(
            "run", "--rm", "--no-deps", "--entrypoint", "python", "export", "training/train.py",
            "--help",
        )  # fmt: skip
        assert "--backbone-weights" in train_help.stdout
        timed("up (export, triton, gateway) s", stack.compose, "up", "-d", "--wait",
              "--wait-timeout", "600", timeout=700)  # fmt: skip
        exported = stack.inspect("export")["State"]
        assert exported["ExitCode"] == 0 and exported["Status"] == "exited"
        meta = json.loads((repo / "ssd300_python" / "1" / "metadata.json").read_text())
        assert meta["random_init"] is False and meta["source"]["checkpoint"].endswith(
            "checkpoint.pt"
        )
        image = encode(photo(640, 480, seed=1), "JPEG")
        r = httpx.post(stack.url + "/v1/detect", files={"image": ("a.jpg", image)}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"]["random_weights"] is False
        assert r.json()["model"]["version"] == "1"
        # a retrained model rolls out into the running stack: the export service writes
        # version 2, Triton loads it when the gateway asks, and neither is restarted
        started = {s: stack.inspect(s)["State"]["StartedAt"] for s in ("triton", "gateway")}
        torch.manual_seed(1)
        model = build_model()
        calibrate_random_model(model)
        torch.save({"model": model.state_dict()}, checkpoints / "retrained.pt")
        (checkpoints / "retrained.pt").chmod(0o644)
        timed("export of version 2 s", stack.compose, "run", "--rm", "--no-deps", "export",
              "--checkpoint=/checkpoints/retrained.pt", "--output=/models", "--formats",
              "python", timeout=900)  # fmt: skip
        assert (repo / "ssd300_python" / "2" / "metadata.json").is_file()
        t0 = time.monotonic()
        version = "1"
        while version != "2" and time.monotonic() - t0 < 120:
            r = httpx.post(stack.url + "/v1/detect", files={"image": ("a.jpg", image)}, timeout=60)
            assert r.status_code == 200, r.text
            version = r.json()["model"]["version"]
        assert version == "2", "the stack did not move to version 2"
        FIGURES["version 2 complete -> first response from it s"] = round(time.monotonic() - t0, 1)
        assert {s: stack.inspect(s)["State"]["StartedAt"] for s in started} == started
    finally:
        stack.compose("down", "--remove-orphans", "--volumes", "--timeout", "20", check=False)
        write_figures(FIGURES_FILE, "compose-full figures")
