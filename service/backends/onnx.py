"""The embedded backend: the exported ONNX graph in process with ONNX Runtime (CPU)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service.backends import (
    Candidates,
    ModelInfo,
    check_contract,
    declared_count,
    load_classes,
    read_metadata,
)

_ORT_TYPES = {"tensor(uint8)": "UINT8", "tensor(float)": "FP32", "tensor(int32)": "INT32"}


def _describe(args) -> list[dict]:
    return [
        {
            "name": a.name,
            "datatype": _ORT_TYPES.get(a.type, a.type),
            "shape": [d if isinstance(d, int) else -1 for d in a.shape],
        }
        for a in args
    ]


class OnnxBackend:
    def __init__(
        self, repo: Path, model_name: str, threads: int = 0, spinning: bool = False
    ) -> None:
        self.path = repo / model_name / "1" / "model.onnx"
        self.repo = repo
        self.model_name = model_name
        self.threads = threads
        self.spinning = spinning
        self.session: ort.InferenceSession | None = None
        # one thread: ONNX Runtime parallelises inside a run; batches queue in the micro-batcher
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnx")
        self.info = ModelInfo(model_name, "1", "onnxruntime", 0, None)

    async def start(self) -> None:
        if not self.path.is_file():
            raise RuntimeError(
                f"no model at {self.path}: export one with `python -m training.export` "
                "(or run `make serve`, which does it)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # no arena: it keeps the largest batch's buffers forever and grows with every new shape
        options.enable_cpu_mem_arena = False
        # ONNX Runtime's threads spin after each run by default, taking the cores from the
        # decoding beside it (SSD_ONNX_SPINNING; README: measured under the gateway's load)
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if self.spinning else "0"
        )
        loop = asyncio.get_running_loop()
        self.session = await loop.run_in_executor(
            self._executor,
            lambda: ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            ),
        )
        k = check_contract(
            _describe(self.session.get_inputs()), _describe(self.session.get_outputs())
        )
        meta = read_metadata(self.repo, self.model_name)
        props = self.session.get_modelmeta().custom_metadata_map
        counts = {
            "the model file": declared_count(props.get("num_classes"), str(self.path)),
            "metadata.json": declared_count(meta.get("num_classes"), "metadata.json"),
        }
        classes = load_classes(self.repo, self.model_name, counts, props.get("classes"))
        self.info = ModelInfo(
            self.model_name, "1", "onnxruntime", k, meta.get("random_init"), meta, classes
        )

    def _run(self, images: np.ndarray) -> Candidates:
        boxes, scores, classes = self.session.run(
            ["boxes", "scores", "classes"], {"images": images}
        )
        return Candidates(boxes, scores, classes)

    async def infer(self, images: np.ndarray, timeout: float | None = None) -> Candidates:
        # an ONNX Runtime run cannot be aborted; the request's own deadline still applies
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, images)

    async def ready(self) -> bool:
        return self.session is not None

    async def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.session = None
