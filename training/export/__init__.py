"""The bridge from training to serving: a checkpoint becomes a new version of each model in a
Triton model repository (``ssdcore.repository`` is the layout both sides share).

- ``served.py``: the served graph (preprocessing, decode, softmax, top-K inside the model);
- ``weights.py``: the checkpoint (ours or NVIDIA's) or an untrained model, with its classes;
- ``writer.py``: ONNX / TorchScript / Python-backend files, written as the next version;
- ``int8.py``: static INT8 quantization with ONNX Runtime;
- ``config_pbtxt.py``: Triton's configuration;
- ``triton_python_model.py``: the model Triton's Python backend runs (ONNX Runtime on the CPU);
- ``__main__.py``: the command line (``python -m training.export``).
"""

from ssdcore.repository import MODEL_NAMES
from training.export.config_pbtxt import DEFAULT_TOPK, ExportOptions, triton_config
from training.export.weights import Weights, load_weights, random_weights
from training.export.writer import FORMATS, export, export_onnx, export_torchscript

__all__ = [
    "DEFAULT_TOPK",
    "FORMATS",
    "MODEL_NAMES",
    "ExportOptions",
    "Weights",
    "export",
    "export_onnx",
    "export_torchscript",
    "load_weights",
    "random_weights",
    "triton_config",
]


def main(argv: list[str] | None = None) -> int:
    from training.export.__main__ import main as cli

    return cli(argv)
