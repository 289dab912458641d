"""The served graph on CPU: PyTorch eager vs TorchScript vs ONNX Runtime, and bytes on the wire.

Exports a random-init model (timings do not depend on the weights) to a temporary repository and
times the three runtimes on the same uint8 batches, interleaved in one process.
Run: .venv/bin/python benchmarks/export_bench.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort
import torch

from benchmarks.common import machine, median_seconds, table
from ssdcore.spec import SSD300
from training.export import DEFAULT_TOPK, ExportOptions, export
from training.export.served import ServedSSD
from training.model import build_model, calibrate_random_model


def wire_bytes(topk: int) -> list[list[object]]:
    a, c = SSD300.num_anchors, SSD300.num_classes
    raw_out = (4 + c) * a * 4
    contract_out = topk * (4 * 4 + 4 + 4)
    image_u8 = 300 * 300 * 3
    image_f32 = image_u8 * 4
    return [
        ["input, fp32 NCHW (raw network)", f"{image_f32:,}", ""],
        ["input, uint8 NHWC (contract)", f"{image_u8:,}", f"{image_f32 / image_u8:.0f}x smaller"],
        ["output, raw locs + logits", f"{raw_out:,}", ""],
        [
            f"output, top-{topk} candidates (contract)",
            f"{contract_out:,}",
            f"{raw_out / contract_out:.0f}x smaller",
        ],
    ]


def main(repeats: int = 5) -> None:
    torch.manual_seed(0)
    model = build_model()
    calibrate_random_model(model)
    model.eval()
    served = ServedSSD(model, topk=DEFAULT_TOPK).eval()
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        export(repo, ["onnx", "torchscript"], random_init=True, opts=ExportOptions(gpu=False))
        script = torch.jit.load(str(repo / "ssd300_torchscript" / "1" / "model.pt")).eval()
        session = ort.InferenceSession(
            str(repo / "ssd300_onnx" / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        rows = []
        rng = np.random.default_rng(0)
        for batch in (1, 8):
            images = rng.integers(0, 256, (batch, 300, 300, 3), dtype=np.uint8)
            tensor = torch.from_numpy(images)
            runners = {
                "PyTorch eager": lambda t=tensor: served(t),
                "TorchScript": lambda t=tensor: script(t),
                "ONNX Runtime": lambda i=images: session.run(None, {"images": i}),
            }
            with torch.inference_mode():
                times = {name: median_seconds(fn, repeats) for name, fn in runners.items()}
            base = times["PyTorch eager"]
            for name, s in times.items():
                rows.append(
                    [batch, name, f"{1e3 * s / batch:.0f}", f"{batch / s:.2f}", f"{base / s:.2f}x"]
                )
    print(
        f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"onnxruntime {ort.__version__}, medians of {repeats}"
    )
    print(table(["batch", "runtime", "ms/image", "images/s", "vs eager"], rows))
    print()
    print(table(["per image", "bytes", ""], wire_bytes(DEFAULT_TOPK)))


if __name__ == "__main__":
    main()
