"""The embedded backend: the exported ONNX graph in process with ONNX Runtime (CPU).

:class:`OnnxBackend` keeps the versions; the engine that runs a version's file is
:meth:`OnnxBackend.open_engine` (ONNX Runtime here, OpenVINO in ``openvino.py``). It follows the model repository: :meth:`OnnxBackend.refresh` loads the newest version next to
the served one (in a thread of its own, so inference goes on), checks it against the contract,
runs a warm-up batch and only then switches. Requests pin the version they are admitted to;
a version that is no longer served is released once its last request has finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.backends import (
    Candidates,
    ModelInfo,
    Refresh,
    VersionsState,
    check_contract,
    declared_count,
    version_info,
)
from ssdcore.repository import ModelStore, ModelVersion, RepositoryError
from ssdcore.spec import SSD300, TENSOR_NAMES

log = logging.getLogger("service.onnx")
_ORT_TYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(int32)": "INT32"}
OUTPUTS = [TENSOR_NAMES.boxes, TENSOR_NAMES.scores, TENSOR_NAMES.classes]


def _describe(args) -> list[dict]:
    return [
        {
            "name": a.name,
            "datatype": _ORT_TYPES.get(a.type, a.type),
            "shape": [d if isinstance(d, int) else -1 for d in a.shape],
        }
        for a in args
    ]


class Engine:
    """One model file loaded by an inference engine: what the backends need of it."""

    inputs: list[dict]  # [{"name", "datatype", "shape"}] as check_contract reads them
    outputs: list[dict]
    props: dict[str, str]  # the file's metadata (num_classes, classes)
    facts: dict  # what GET /v1/models says of the engine

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """boxes, scores, classes of a uint8 [N, 300, 300, 3] batch (one thread at a time)."""
        raise NotImplementedError


class OrtEngine(Engine):
    def __init__(self, path: Path, threads: int, spinning: bool) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        # no arena: it keeps the largest batch's buffers forever and grows with every new shape
        options.enable_cpu_mem_arena = False
        # ONNX Runtime's threads spin after each run by default, taking the cores from the
        # decoding beside it (SSD_ONNX_SPINNING; README: measured under the gateway's load)
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spinning else "0"
        )
        try:
            self.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ONNX Runtime raises its own types for a bad file
            raise RuntimeError(f"ONNX Runtime cannot load {path}: {exc}") from None
        self.inputs = _describe(self.session.get_inputs())
        self.outputs = _describe(self.session.get_outputs())
        self.props = dict(self.session.get_modelmeta().custom_metadata_map)
        self.facts = {"name": "onnxruntime", "version": ort.__version__, "threads": threads}

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.session.run(OUTPUTS, {TENSOR_NAMES.images: images}))


@dataclass(eq=False)
class LoadedVersion:
    """One version in memory: its engine and the requests that use it."""

    info: ModelInfo
    session: Engine | None
    stamp: tuple[int, int]
    users: int = 0
    retired: bool = False


class OnnxBackend:
    engine_name = "onnxruntime"

    def __init__(
        self, repo: Path, model_name: str, threads: int = 0, spinning: bool = False
    ) -> None:
        self.store = ModelStore(Path(repo), model_name)
        self.model_name = model_name
        self.threads = threads
        self.spinning = spinning
        self.current: LoadedVersion | None = None
        self.versions = VersionsState()
        self._refused: dict[int, tuple[tuple[int, int], str]] = {}  # number -> (stamp, reason)
        # one thread: ONNX Runtime parallelises inside a run; batches queue in the micro-batcher
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx-load")
        self.info = ModelInfo(model_name, "", self.engine_name, 0, None)

    def open_engine(self, path: Path) -> Engine:
        """The engine that runs ``path`` (RuntimeError if it cannot load it)."""
        return OrtEngine(path, self.threads, self.spinning)

    # ------------------------------------------------------------------ versions

    async def start(self) -> None:
        """Serve the newest version that loads (older ones are tried when it does not)."""
        versions = self.store.with_metadata()
        if not versions:
            raise RuntimeError(
                f"no model version in {self.store.path}: export one with "
                "`python -m training.export` (or run `make serve`, which does it)"
            )
        errors = []
        for version in reversed(versions):
            loaded, reason = await self._load_or_refuse(version)
            if loaded is None:
                errors.append(f"version {version.number}: {reason}")
                continue
            self._switch(loaded)
            return
        raise RuntimeError(f"no version of {self.store.path} can be served: {'; '.join(errors)}")

    async def refresh(self) -> Refresh:
        """Serve the newest servable version: the newest one, else (refused, or refused before
        and unchanged since) the next older one; the served one stays when it is that."""
        self.versions.present = [v.label for v in self.store.versions()]
        if self.current is None:
            return Refresh()
        refused = None
        for candidate in reversed(self.store.with_metadata()):
            try:
                stamp = candidate.stamp()
            except OSError:  # removed while we looked
                continue
            if candidate.label == self.current.info.version and stamp == self.current.stamp:
                break
            if self._refused.get(candidate.number, (None,))[0] == stamp:
                continue  # refused already, unchanged since
            loaded, reason = await self._load_or_refuse(candidate)
            if loaded is None:
                refused = refused or (candidate.label, reason)
                continue
            old = self._switch(loaded)
            return Refresh(
                switched_to=loaded.info.version, switched_from=old.info.version, refused=refused
            )
        return Refresh(refused=refused)

    async def _load_or_refuse(self, version: ModelVersion) -> tuple[LoadedVersion | None, str]:
        """``version`` loaded in the loader thread, or refused with the reason."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._loader, self._load, version), ""
        except RuntimeError as exc:
            self._refuse(version, str(exc))
            return None, str(exc)

    def _load(self, version: ModelVersion) -> LoadedVersion:
        """Load, check and warm up ``version`` (in the loader thread); RuntimeError if refused,
        whatever failed (a model the contract check trips over refuses its version too)."""
        try:
            return self._load_checked(version)
        except RuntimeError:
            raise
        except Exception as exc:
            raise RuntimeError(f"{type(exc).__name__} while loading it: {exc}") from None

    def _load_checked(self, version: ModelVersion) -> LoadedVersion:
        try:
            stamp = version.stamp()
            meta = version.verify()
        except (OSError, RepositoryError) as exc:
            raise RuntimeError(str(exc)) from None
        path = version.file("model.onnx")
        if meta.format not in ("onnx", "onnx_int8", "python"):
            raise RuntimeError(f"{version.path} holds a {meta.format!r} model, not ONNX")
        engine = self.open_engine(path)
        k = check_contract(engine.inputs, engine.outputs)
        props = engine.props
        counts = {"the model file": declared_count(props.get("num_classes"), str(path))}
        info = version_info(version, self.engine_name, k, counts, props.get("classes"))
        info = replace(info, engine=engine.facts)
        warm_up(engine, info)
        return LoadedVersion(info, engine, stamp)

    def _switch(self, loaded: LoadedVersion) -> LoadedVersion | None:
        old, self.current = self.current, loaded
        self.info = loaded.info
        self.versions.served = loaded.info.version
        self.versions.present = [v.label for v in self.store.versions()]
        self.versions.switched_at = time.time()
        self._refused.pop(int(loaded.info.version), None)
        if old is not None:
            old.retired = True
            self._release_if_unused(old)
        return old

    def _refuse(self, version: ModelVersion, reason: str) -> None:
        try:
            stamp = version.stamp()
        except OSError:
            stamp = (0, 0)
        self._refused[version.number] = (stamp, reason)
        self.versions.refused = {"version": version.label, "reason": reason, "at": time.time()}

    def _release_if_unused(self, loaded: LoadedVersion) -> None:
        if loaded.retired and loaded.users == 0 and loaded.session is not None:
            loaded.session = None  # its memory goes back (no arena)
            log.info("released version %s of %s", loaded.info.version, self.model_name)

    # ------------------------------------------------------------------ requests

    def load_error(self, version: str) -> str | None:
        """Why ``version`` is not served, where it was refused."""
        refused = self.versions.refused
        return refused["reason"] if refused and refused["version"] == version else None

    def pin(self) -> LoadedVersion:
        loaded = self.current
        loaded.users += 1
        return loaded

    def unpin(self, pin: LoadedVersion) -> None:
        pin.users -= 1
        self._release_if_unused(pin)

    def info_for(self, version: str) -> ModelInfo:
        """The served version's info (the pipeline reads a pinned version's info from its pin)."""
        return self.info

    def _run(self, images: np.ndarray, loaded: LoadedVersion) -> Candidates:
        boxes, scores, classes = loaded.session.run(images)
        return Candidates(boxes, scores, classes, loaded.info.version)

    async def infer(
        self, images: np.ndarray, timeout: float | None = None, pin: LoadedVersion | None = None
    ) -> Candidates:
        # an ONNX Runtime run cannot be aborted; the request's own deadline still applies
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, images, pin or self.current)

    async def ready(self) -> bool:
        return self.current is not None and self.current.session is not None

    async def close(self) -> None:
        self._loader.shutdown(wait=True)
        self._executor.shutdown(wait=True)
        self.current = None


def warm_up(engine: Engine, info: ModelInfo) -> None:
    """One batch of a grey image through a new version before it is served: the outputs must
    have the contract's shapes and name only classes of its list."""
    size = SSD300.image_size
    images = np.full((2, size, size, 3), 114, dtype=np.uint8)
    try:
        boxes, scores, classes = engine.run(images)
    except Exception as exc:
        raise RuntimeError(f"the warm-up batch failed: {exc}") from None
    k = info.topk
    if boxes.shape != (2, k, 4) or scores.shape != (2, k) or classes.shape != (2, k):
        raise RuntimeError(
            f"the warm-up batch gave shapes {boxes.shape}, {scores.shape}, {classes.shape}"
        )
    if classes.size and (classes.min() < 1 or classes.max() > len(info.classes)):
        raise RuntimeError(
            f"the model names labels {classes.min()}..{classes.max()}; its class list has "
            f"1..{len(info.classes)}"
        )
    if not np.isfinite(scores).all():
        raise RuntimeError("the warm-up batch gave scores that are not finite")
