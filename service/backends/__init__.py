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
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


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


def declared_count(value: object, source: str) -> int | None:
    """A class count a model declares (a string or an int), or None when it declares none."""
    if value is None or value == "":
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = 0
    if count < 2:
        raise RuntimeError(f"{source} declares an unusable class count {value!r}")
    return count


def load_classes(
    repo: Path | None,
    model_name: str,
    counts: dict[str, int | None],
    embedded: str | None = None,
) -> ClassList:
    """The served model's classes: ``<repo>/<model>/classes.json`` (written by the export), else
    the list embedded in the model file (``embedded``, the ONNX metadata), else COCO for a model
    of 80 classes (or of an unknown count: exports before class lists were all COCO), with a
    warning. Anything else refuses to start: never a silent fallback to COCO's names.

    ``counts``: the class counts (classes + background) that sources beside the list declare
    (the model file, its Triton config, metadata.json written with it), by source; every one
    must agree with the list, and an embedded list with the repository's. That catches a
    classes.json restored by version control next to another model's files.
    """
    path = repo / model_name / "classes.json" if repo is not None else None
    lists: dict[str, ClassList] = {}
    texts = {}
    if path is not None and path.is_file():
        try:
            texts[str(path)] = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuntimeError(f"cannot read the class list {path}: {exc}") from None
    if embedded:
        texts[f"the metadata of model {model_name!r}"] = embedded
    for source, text in texts.items():
        try:
            lists[source] = ClassList.from_json(json.loads(text))
        except ValueError as exc:
            raise RuntimeError(f"cannot read the class list {source}: {exc}") from None
    if len(set(lists.values())) > 1:
        a, b = lists
        raise RuntimeError(
            f"the class lists of {a} and {b} differ: export the model and its class list together"
        )
    known = {source: n for source, n in counts.items() if n is not None}
    if lists:
        source, classes = next(iter(lists.items()))
        for where, n in known.items():
            if n != classes.num_classes:
                raise RuntimeError(
                    f"{source} lists {len(classes)} classes but {where} says model "
                    f"{model_name!r} has {n - 1}: export the model and its class list together"
                )
        return classes
    if all(n == COCO.num_classes for n in known.values()):
        log.warning(
            "model %r has no class list (%s): serving it as COCO's 80 classes",
            model_name,
            f"no {path}" if path is not None else "no model repository",
        )
        return COCO
    n = next(n for n in known.values() if n != COCO.num_classes)
    raise RuntimeError(
        f"model {model_name!r} has {n - 1} classes and no class list "
        f"({path or 'no model repository'}): re-export it with `python -m training.export`, "
        "which writes classes.json next to the model"
    )
