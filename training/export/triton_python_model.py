"""Triton Python-backend model: runs the exported ONNX graph with ONNX Runtime on the CPU.

Copied by ``training.export`` to ``<repo>/<name>/<version>/model.py`` next to ``model.onnx``. This is
how a real Triton server is exercised on machines without a GPU; on a GPU the ``onnxruntime_onnx``
or ``pytorch_libtorch`` models of the same repository are the ones to serve.
"""

from __future__ import annotations

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

# the contract's names (ssdcore.spec.TENSOR_NAMES): this file runs inside Triton, without ssdcore
OUTPUTS = ("boxes", "scores", "classes")


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def execute(self, requests: list) -> list:
        # Triton's dynamic batcher hands over several requests: run them as one batch.
        arrays = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        outputs = self.session.run(list(OUTPUTS), {"images": np.concatenate(arrays)})
        responses = []
        start = 0
        for size in sizes:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                for name, out in zip(OUTPUTS, outputs)
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
