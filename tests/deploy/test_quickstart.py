"""The README's quick start, `make serve`: on an empty model repository it exports a model and
serves it on the embedded ONNX Runtime backend; a detection request over HTTP is answered."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from loadtest.processes import NotReady, free_port, wait_ready
from ssdcore.labels import COCO

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)


@pytest.mark.slow
def test_make_serve_exports_a_model_and_answers(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo, port, log = tmp_path / "repo", free_port(), tmp_path / "serve.log"
    # this test's own environment, taken as installed (-o: never reinstall into it from here)
    command = ["make", "-s", "-o", f"{VENV}/.installed", "serve", f"VENV={VENV}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*command, f"REPO={repo}", f"PORT={port}"],
            cwd=ROOT,
            # no NVIDIA checkpoint cached from elsewhere: this is a fresh machine
            env={**os.environ, "TORCH_HOME": str(tmp_path / "torch_home")},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make and the service in one group, stopped together
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, proc, timeout=240)
        except NotReady:
            pytest.fail(f"`make serve` did not come up:\n{log.read_text()[-4000:]}")
        buf = io.BytesIO()
        Image.new("RGB", (320, 240), (90, 140, 200)).save(buf, "JPEG")
        r = httpx.post(
            url + "/v1/detect", files={"image": ("a.jpg", buf.getvalue(), "image/jpeg")}, timeout=60
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["backend"] == "onnxruntime"
        assert body["images"][0]["width"] == 320 and body["images"][0]["height"] == 240
        assert (repo / "ssd300_onnx" / "1" / "model.onnx").is_file()
        model = httpx.get(url + "/v1/models", timeout=30).json()["models"][0]
    finally:
        stop(proc)
    text = log.read_text()
    assert f"on http://127.0.0.1:{port}/" in text  # the URL is printed for the user
    # without CHECKPOINT, NVIDIA's checkpoint is tried first; offline (as here) the fallback is
    # a random-init model, and the log, the API and every response say so, and why
    if body["model"]["random_weights"]:
        assert "cannot download NVIDIA's SSD300 COCO checkpoint" in model["random_weights_reason"]
        assert "could not be had" in text and "RANDOM WEIGHTS" in text
    else:  # a machine that reaches NGC serves the real checkpoint
        assert model["metadata"]["source"]["checkpoint"].endswith("nvidia_ssdpyt_amp_200703.pt")
    assert model["classes"] == [{"id": i, "name": n} for i, n in zip(COCO.ids, COCO.names)]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to make and the service; SIGKILL if they have not ended within a minute."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
