"""The video tests' scene: a clip of shapes moving on known paths (devtools/videos.py), and a model
trained on stills of the same scene, exported and served."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.videos import scene_training_set, write_clip
from service.settings import Settings
from tests.service.conftest import LiveService, run_service
from tests.training.conftest import run_train


@pytest.fixture(scope="session")
def scene_clip(tmp_path_factory) -> tuple[Path, list]:
    """(clip.mp4, per-frame ground truth): 640x360, 25 fps, 75 frames, H.264."""
    folder = tmp_path_factory.mktemp("scene_clip")
    truth = write_clip(folder / "clip.mp4")
    return folder / "clip.mp4", truth


@pytest.fixture(scope="session")
def scene_repo(tmp_path_factory) -> Path:
    """A ResNet-18 SSD trained on 48 stills of the scene (15 epochs, about 2.5 minutes on two
    cores; mAP@0.5 0.98 on its stills on an Intel Xeon), exported to ONNX (and the
    Python-backend model Triton runs on a CPU). fp32: in bf16 (``--cpu-bf16``, 1.5 minutes) the
    model of seed 0 gave a second car track and an extra box, which the tests count."""
    from training.export import ExportOptions, export

    if os.environ.get("SCENE_REPO"):  # another training of it (checking the margins over seeds)
        return Path(os.environ["SCENE_REPO"])
    root = tmp_path_factory.mktemp("scene")
    data = scene_training_set(root / "data")
    run = root / "run"
    run_train(
        [
            "--data", str(data), "--epochs", "15", "--batch-size", "4",
            "--eval-batch-size", "8", "--data-backend", "torch", "--no-augment",
            "--evaluation", "14", "--learning-rate", "0.05", "--multistep", "12",
            "--save", str(run), "--backbone", "resnet18", "--backbone-weights", "none",
            "--num-workers", "0", "--warmup", "5", "--seed", "0", "--log-interval", "10",
            "--keep-checkpoints", "1",
        ]
    )  # fmt: skip
    repo = root / "repo"
    export(repo, ["onnx", "python"], checkpoint=run / "epoch_14.pt", opts=ExportOptions(gpu=False))
    return repo


@pytest.fixture(scope="session")
def video_service(scene_repo) -> Iterator[LiveService]:
    with run_service(Settings(model_repository=scene_repo, model_name="ssd300_onnx")) as live:
        yield live
