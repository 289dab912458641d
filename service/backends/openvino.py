"""The embedded backend on OpenVINO: the same exported ONNX files (fp32 ``ssd300_onnx``, its QDQ
INT8 ``ssd300_onnx_int8``) read by OpenVINO's ONNX frontend and compiled for the CPU once per
version, with a dynamic batch dimension (benchmarks/openvino_bench.py measures it against
shapes fixed per batch size). Versions, pins, checks and warm-up are :class:`OnnxBackend`'s.

``SSD_OPENVINO_PRECISION=bf16`` asks the CPU plugin to run the fp32 parts in bfloat16 where the
CPU has it (AVX512_BF16 or AMX); elsewhere it says so and runs fp32. The only module that
imports openvino.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from service.backends.onnx import OUTPUTS, Engine, OnnxBackend
from ssdcore.spec import TENSOR_NAMES

log = logging.getLogger("service.openvino")

try:
    import openvino as ov
except ImportError as exc:  # the gateway image carries ONNX Runtime only
    raise RuntimeError(
        "SSD_BACKEND=openvino needs the openvino package (pip install 'ssd300[openvino]')"
    ) from exc

_OV_TYPES = {"u8": "UINT8", "f32": "FP32", "i32": "INT32"}
PRECISIONS = ("f32", "bf16")


def _name(port) -> str:
    """The contract's name of a port (a port can carry several names)."""
    names = port.get_names()
    return next((n for n in asdict(TENSOR_NAMES).values() if n in names), port.get_any_name())


def _describe(ports) -> list[dict]:
    return [
        {
            "name": _name(port),
            "datatype": _OV_TYPES.get(port.get_element_type().get_type_name(), "?"),
            "shape": [d.get_length() if d.is_static else -1 for d in port.get_partial_shape()],
        }
        for port in ports
    ]


def cpu_precision(requested: str, core: ov.Core) -> tuple[str, str | None]:
    """The inference precision to compile with, and why it differs from ``requested``."""
    if requested == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return "f32", "this CPU has no bfloat16 (AVX512_BF16 or AMX): running fp32"
    return requested, None


class OpenVinoEngine(Engine):
    def __init__(self, core: ov.Core, path: Path, threads: int, precision: str) -> None:
        try:
            model = core.read_model(str(path))
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError (and others) for a bad file
            raise RuntimeError(f"OpenVINO cannot load {path}: {exc}") from None
        self.inputs = _describe(self.compiled.inputs)
        self.outputs = _describe(self.compiled.outputs)
        self.props = {
            key: model.get_rt_info(["framework", key]).astype(str)
            for key in ("num_classes", "classes")
            if model.has_rt_info(["framework", key])
        }
        # one request, reused: the backend runs one batch at a time (its single thread)
        self.request = self.compiled.create_infer_request()
        self.ports = [self.compiled.output(name) for name in OUTPUTS]
        self.facts = {
            "name": "openvino",
            "version": ov.get_version().split("-")[0],
            "precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
        }

    def run(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # the input is read in place; the outputs are copies (the request's buffers are reused)
        result = self.request.infer({0: images}, share_inputs=True, share_outputs=False)
        return tuple(result[port] for port in self.ports)


class OpenVinoBackend(OnnxBackend):
    engine_name = "openvino"

    def __init__(
        self, repo: Path, model_name: str, threads: int = 0, precision: str = "f32"
    ) -> None:
        super().__init__(repo, model_name, threads)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        self.core = ov.Core()
        self.precision, why = cpu_precision(precision, self.core)
        self.requested_precision = precision
        if why:
            log.warning("SSD_OPENVINO_PRECISION=%s: %s", precision, why)
        log.info("OpenVINO %s on %s, precision %s", ov.get_version(), self._cpu(), self.precision)

    def _cpu(self) -> str:
        try:
            return str(self.core.get_property("CPU", "FULL_DEVICE_NAME"))
        except Exception:
            return "the CPU"

    def open_engine(self, path: Path) -> Engine:
        engine = OpenVinoEngine(self.core, path, self.threads, self.precision)
        if self.requested_precision != self.precision:
            engine.facts["precision_requested"] = self.requested_precision
        return engine
