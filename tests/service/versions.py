"""Model versions for the tests: exported from seeded untrained weights, or copied from another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ssdcore.labels import COCO, ClassList
from ssdcore.repository import ModelStore
from training.export import ExportOptions, Weights, export
from training.model import build_model, calibrate_random_model


def weights(seed: int, classes: ClassList) -> Weights:
    """Untrained ResNet-18 weights of their own (seeded), calibrated to give detections."""
    torch.manual_seed(seed)
    model = build_model("resnet18", num_classes=classes.num_classes)
    calibrate_random_model(model)
    source = {"checkpoint": f"seed-{seed}", "sha256": f"{seed:064d}", "backbone": "resnet18"}
    return Weights(model, classes, source)


def write_version(
    repo: Path, fmt: str, seed: int, classes: ClassList = COCO, version: int | None = None
) -> int:
    meta = export(
        repo, [fmt], weights=weights(seed, classes), opts=ExportOptions(gpu=False), version=version
    )
    return meta[fmt].version


def copy_version(source: Path, store: ModelStore, number: int) -> None:
    """``source`` (a version folder) published again as version ``number``: the same files,
    appearing in one rename as the export does."""
    staging = store.path / f".staging-{number}-copy"
    shutil.copytree(source, staging)
    meta = json.loads((staging / "metadata.json").read_text())
    (staging / "metadata.json").write_text(json.dumps({**meta, "version": number}))
    staging.rename(store.version(number).path)


def truncated_copy(repo: Path, store: ModelStore, seed: int) -> int:
    """A version whose model file was cut short after its export (a copy that died)."""
    scratch = repo.parent / f"scratch-{seed}"
    number = write_version(scratch, "onnx", seed, COCO, version=store.next_number())
    model_file = ModelStore(scratch, store.name).version(number).file("model.onnx")
    model_file.write_bytes(model_file.read_bytes()[:4096])
    ModelStore(scratch, store.name).version(number).path.rename(store.version(number).path)
    return number
