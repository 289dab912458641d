"""Model backends: anything that turns a uint8 [N, 300, 300, 3] batch into top-K candidates.

``onnx.py`` runs the exported graph in process (the embedded default); ``triton.py`` is the only
module that imports tritonclient. Both check the model against the contract at start-up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from service.errors import ApiError
from ssdcore.labels import COCO, ClassList

log = logging.getLogger("service")


@dataclass(frozen=True)
class Candidates:
    """Backend output for a batch: boxes (N, K, 4) normalised xyxy, scores (N, K), classes (N, K)."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray


@dataclass
class ModelInfo:
    name: str
    version: str
    backend: str
    topk: int
    random_weights: bool | None  # None: unknown (no metadata.json next to the model)
    metadata: dict = field(default_factory=dict)
    classes: ClassList = COCO  # contiguous label -> the dataset's category id and name


class Backend(Protocol):
    info: ModelInfo

    async def start(self) -> None: ...

    async def infer(self, images: np.ndarray, timeout: float | None = None) -> Candidates:
        """``timeout``: seconds the caller can still wait (a backend may not be able to abort)."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class BackendUnavailable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "backend_unavailable", message, {"Retry-After": "1"})


class BackendTimeout(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(504, "backend_timeout", message)


def read_metadata(repo: Path, model_name: str) -> dict:
    """metadata.json written by the export, or {} when the repository is not available here."""
    path = repo / model_name / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_contract(inputs: list[dict], outputs: list[dict]) -> int:
    """Validate model metadata against the contract (design §2); returns K.

    inputs/outputs: [{"name", "datatype", "shape"}] with the batch dimension first (-1 or N).
    """
    # Triton's JSON metadata gives dimensions as strings
    inputs = [{**t, "shape": [int(d) for d in t["shape"]]} for t in inputs]
    outputs = [{**t, "shape": [int(d) for d in t["shape"]]} for t in outputs]
    want_in = {"images": ("UINT8", [300, 300, 3])}
    want_out = {"boxes": "FP32", "scores": "FP32", "classes": "INT32"}
    by_name = {t["name"]: t for t in inputs}
    for name, (dtype, shape) in want_in.items():
        t = by_name.get(name)
        if t is None or t["datatype"] != dtype or list(t["shape"][1:]) != shape:
            raise RuntimeError(f"model input {name!r} must be {dtype} [N, 300, 300, 3], got {t}")
    out = {t["name"]: t for t in outputs}
    for name, dtype in want_out.items():
        if name not in out or out[name]["datatype"] != dtype:
            raise RuntimeError(f"model output {name!r} must be {dtype}, got {out.get(name)}")
    k = int(out["scores"]["shape"][1])
    if list(out["boxes"]["shape"][1:]) != [k, 4] or int(out["classes"]["shape"][1]) != k:
        raise RuntimeError("model outputs boxes [N, K, 4], scores [N, K], classes [N, K] disagree")
    return k


def load_classes(
    repo: Path | None, model_name: str, num_classes: int | None, embedded: str | None = None
) -> ClassList:
    """The served model's classes: ``<repo>/<model>/classes.json`` (written by the export), else
    the list embedded in the model file (``embedded``, the ONNX metadata), else COCO for a model
    of 80 classes (or of an unknown count: exports before class lists were all COCO), with a
    warning. Anything else refuses to start: never a silent fallback to COCO's names.

    ``num_classes`` (classes + background) is what the model itself declares, when it does; the
    list must agree with it.
    """
    path = repo / model_name / "classes.json" if repo is not None else None
    source, doc = None, None
    if path is not None and path.is_file():
        source = str(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"cannot read the class list {path}: {exc}") from None
    elif embedded:
        source = f"the metadata of model {model_name!r}"
        try:
            doc = json.loads(embedded)
        except ValueError as exc:
            raise RuntimeError(f"unreadable class list in {source}: {exc}") from None
    if doc is not None:
        try:
            classes = ClassList.from_json(doc)
        except ValueError as exc:
            raise RuntimeError(f"bad class list in {source}: {exc}") from None
        if num_classes is not None and classes.num_classes != num_classes:
            raise RuntimeError(
                f"{source} lists {len(classes)} classes but model {model_name!r} has "
                f"{num_classes - 1}: export the model and its class list together"
            )
        return classes
    if num_classes in (None, COCO.num_classes):
        log.warning(
            "model %r has no class list (%s): serving it as COCO's 80 classes",
            model_name,
            f"no {path}" if path is not None else "no model repository",
        )
        return COCO
    raise RuntimeError(
        f"model {model_name!r} has {num_classes - 1} classes and no class list "
        f"({path or 'no model repository'}): re-export it with `python -m training.export`, "
        "which writes classes.json next to the model"
    )
