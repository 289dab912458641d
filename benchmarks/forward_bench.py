"""Eager CPU forward of SSD300 (ResNet-50, fp32): ms/image at batch 1 and 8, next to the FLOPs.

Run: .venv/bin/python benchmarks/forward_bench.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import machine, median_seconds, table
from training.model import build_model


def main(repeats: int = 5) -> None:
    model = build_model().eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 300, 300))
    gflops = counter.get_total_flops() / 1e9
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 300, 300)
        with torch.inference_mode():
            s = median_seconds(lambda x=x: model(x), repeats)
        ms = 1e3 * s / batch
        rows.append([batch, f"{ms:.0f}", f"{batch / s:.2f}", f"{gflops * batch / s:.0f}"])
    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"forward FLOPs per image: {gflops:.2f} GFLOPs")
    print(table(["batch", "ms/image", "images/s", "GFLOP/s"], rows))


if __name__ == "__main__":
    main()
