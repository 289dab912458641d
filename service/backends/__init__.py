"""Model backends: anything that turns a uint8 [N, 300, 300, 3] batch into top-K candidates.

``onnx.py`` runs the exported graph in process (the embedded default); ``triton.py`` is the only
module that imports tritonclient. Both check the model against the contract at start-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from service.errors import ApiError


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
