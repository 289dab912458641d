"""The weights to export: a checkpoint (ours or NVIDIA's) or an untrained model, with its classes
and where it came from (recorded in each version's metadata)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdcore.labels import COCO, ClassList
from ssdcore.repository import file_sha256
from training.checkpoint import (
    CheckpointError,
    extract_state_dict,
    num_classes_of,
    read_checkpoint,
    recorded_classes,
)
from training.model import SSD300, build_model, calibrate_random_model


@dataclass
class Weights:
    """The model to export, its classes and where it came from (recorded in metadata.json)."""

    model: SSD300
    classes: ClassList
    source: dict


def load_weights(checkpoint: Path, backbone: str | None, classes: ClassList | None) -> Weights:
    """A checkpoint (ours or NVIDIA's) as a model with its classes.

    The backbone is the checkpoint's (ours record it) unless given; the class list is the
    checkpoint's; a checkpoint without one is COCO when it has 81 outputs (NVIDIA's), else
    ``classes`` (``--classes FILE``) must say what it is.
    """
    obj = read_checkpoint(checkpoint)
    state = extract_state_dict(obj)
    if "conf.0.weight" not in state:
        raise CheckpointError(f"{checkpoint} is not an SSD300 checkpoint (no conf.0.weight)")
    recorded = recorded_classes(obj)
    count = num_classes_of(state)
    if classes is not None and recorded is not None and classes != recorded:
        raise CheckpointError(
            f"{checkpoint} records its classes ({recorded.summary()}); --classes says "
            f"otherwise ({classes.summary()})"
        )
    classes = classes or recorded or (COCO if count == COCO.num_classes else None)
    if classes is None:
        raise CheckpointError(
            f"{checkpoint} has {count - 1} classes and records no class list: pass "
            "--classes FILE (the instances JSON it was trained on, or a classes.json)"
        )
    if classes.num_classes != count:
        raise CheckpointError(
            f"{checkpoint} has {count - 1} classes; the class list has {len(classes)}"
        )
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    arch = backbone or config.get("backbone") or "resnet50"
    model = build_model(arch, num_classes=count)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit a {arch} SSD300: {exc}") from exc
    source = {
        "checkpoint": str(checkpoint),
        "sha256": file_sha256(checkpoint),
        "epoch": obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
    }
    return Weights(model, classes, {**source, "backbone": arch})


def random_weights(backbone: str | None, classes: ClassList | None, reason: str | None) -> Weights:
    """An untrained (calibrated) model, marked random; reproducible."""
    classes = classes or COCO
    torch.manual_seed(0)
    arch = backbone or "resnet50"
    model = build_model(arch, num_classes=classes.num_classes)
    calibrate_random_model(model)
    return Weights(
        model,
        classes,
        {"checkpoint": None, "sha256": None, "backbone": arch, "random_init_reason": reason},
    )


def read_class_file(path: Path) -> ClassList:
    """``--classes``: an instances JSON (its ``categories``) or a ``classes.json``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "categories" in doc:
            return ClassList.from_categories(doc["categories"])
        return ClassList.from_json(doc)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --classes {path}: {exc}") from None
