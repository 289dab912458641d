"""Model backends: anything that turns a uint8 [N, 300, 300, 3] batch into top-K candidates.

``onnx.py`` runs the exported graph in process with ONNX Runtime (the embedded default),
``openvino.py`` with OpenVINO (the only module that imports openvino); ``triton.py`` is the only
module that imports tritonclient. Each checks the model against the contract at start-up.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.errors import ApiError
from ssdcore.labels import COCO, ClassList
from ssdcore.repository import CLASSES, ModelVersion, RepositoryError
from ssdcore.spec import TENSOR_NAMES

log = logging.getLogger("service")


@dataclass(frozen=True)
class Candidates:
    """Backend output for a batch: boxes (N, K, 4) normalised xyxy, scores (N, K), classes (N, K),
    and the model version that produced them."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    version: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """One version of the served model: what a response produced by it says."""

    name: str
    version: str
    backend: str
    topk: int
    random_weights: bool | None  # None: unknown (no metadata next to the model)
    metadata: dict = field(default_factory=dict)
    classes: ClassList = COCO  # contiguous label -> the dataset's category id and name
    engine: dict = field(default_factory=dict)  # the embedded engine: name, version, precision


@dataclass
class VersionsState:
    """What ``GET /v1/models`` says about the versions (kept by each backend)."""

    served: str = ""
    present: list[str] = field(default_factory=list)
    refused: dict | None = None  # {"version", "reason", "at"}: the last version refused
    switched_at: float | None = None  # time.time() of the last switch
    # the newest version on disk, not served for longer than the bound (VersionFollower)
    stale: dict | None = None  # {"newest", "served", "since", "last_error"}


@dataclass(frozen=True)
class Refresh:
    """What one check of the repository did (the follower logs it and counts it)."""

    switched_to: str | None = None
    switched_from: str | None = None
    refused: tuple[str, str] | None = None  # (version, reason)


class Backend(Protocol):
    info: ModelInfo  # the version new requests go to
    versions: VersionsState

    async def start(self) -> None: ...

    def pin(self) -> object:
        """A handle on the version a request is admitted to (None where the server picks):
        the request's batches all go to it, and it stays loaded until :meth:`unpin`."""
        ...

    def unpin(self, pin: object) -> None: ...

    async def infer(
        self, images: np.ndarray, timeout: float | None = None, pin: object = None
    ) -> Candidates:
        """``timeout``: seconds the caller can still wait (a backend may not be able to abort)."""
        ...

    def info_for(self, version: str) -> ModelInfo:
        """The info (class list above all) of the version that produced a result."""
        ...

    async def refresh(self) -> Refresh:
        """Follow the repository: move to its newest servable version, or refuse it."""
        ...

    async def ready(self) -> bool: ...

    async def close(self) -> None: ...


class BackendUnavailable(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "backend_unavailable", message, {"Retry-After": "1"})


class BackendTimeout(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(504, "backend_timeout", message)


def version_info(
    version: ModelVersion,
    backend: str,
    topk: int,
    counts: dict[str, int | None] | None = None,
    embedded: str | None = None,
) -> ModelInfo:
    """The info of a repository version: its metadata and class list, checked against every
    class count that sources beside it declare (``counts``: the model file's, by source) and
    against the list ``embedded`` in the model file. RuntimeError says what disagrees."""
    try:
        meta = version.metadata()
        classes = version.classes(meta)
    except RepositoryError as exc:
        raise RuntimeError(str(exc)) from None
    if embedded:
        try:
            inside = ClassList.from_json(json.loads(embedded))
        except ValueError as exc:
            raise RuntimeError(
                f"cannot read the class list in {version.path}'s model file: {exc}"
            ) from None
        if inside != classes:
            raise RuntimeError(
                f"the class lists of {version.file(CLASSES)} and of its model file differ: "
                "export the model and its class list together"
            )
    for where, n in (counts or {}).items():
        if n is not None and n != classes.num_classes:
            raise RuntimeError(
                f"{version.file(CLASSES)} lists {len(classes)} classes but {where} says the "
                f"model has {n - 1}: export the model and its class list together"
            )
    if meta.topk and topk and meta.topk != topk:
        raise RuntimeError(f"{version.path}: metadata says K={meta.topk}, the model K={topk}")
    return ModelInfo(
        meta.name,
        version.label,
        backend,
        topk or meta.topk,
        meta.random_init,
        meta.public(),
        classes,
    )


def coco_info(name: str, version: str, backend: str, topk: int, why: str) -> ModelInfo:
    """A model without a repository next to the gateway (Triton only): COCO's names, said."""
    log.warning("model %r has no class list (%s): serving it as COCO's 80 classes", name, why)
    return ModelInfo(name, version, backend, topk, None, {}, COCO)


def check_contract(inputs: list[dict], outputs: list[dict]) -> int:
    """Validate model metadata against the contract (docs/design.md); returns K.

    inputs/outputs: [{"name", "datatype", "shape"}] with the batch dimension first (-1 or N).
    """
    # Triton's JSON metadata gives dimensions as strings
    inputs = [{**t, "shape": [int(d) for d in t["shape"]]} for t in inputs]
    outputs = [{**t, "shape": [int(d) for d in t["shape"]]} for t in outputs]
    names = TENSOR_NAMES
    want_in = {names.images: ("UINT8", [300, 300, 3])}
    want_out = {names.boxes: "FP32", names.scores: "FP32", names.classes: "INT32"}
    by_name = {t["name"]: t for t in inputs}
    for name, (dtype, shape) in want_in.items():
        t = by_name.get(name)
        if t is None or t["datatype"] != dtype or list(t["shape"][1:]) != shape:
            raise RuntimeError(f"model input {name!r} must be {dtype} [N, 300, 300, 3], got {t}")
    out = {t["name"]: t for t in outputs}
    for name, dtype in want_out.items():
        if name not in out or out[name]["datatype"] != dtype:
            raise RuntimeError(f"model output {name!r} must be {dtype}, got {out.get(name)}")
    k = int(out[names.scores]["shape"][1])
    boxes_shape = list(out[names.boxes]["shape"][1:])
    if boxes_shape != [k, 4] or int(out[names.classes]["shape"][1]) != k:
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
