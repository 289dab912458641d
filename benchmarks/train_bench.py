"""Training throughput on the CPU and input-pipeline throughput, side by side in one run.

1. Training images/s at batch 8 (ResNet-50, fp32): our ``engine.TrainStep`` (the job's step:
   loss in fp32, GradScaler, non-finite check, channels handling) vs a plain eager loop of the same
   model, loss and optimizer, on the same batches, interleaved.
2. Input pipeline images/s on 640x480 JPEGs with 2 threads: DALI on the CPU vs the torchvision
   fallback (DataLoader with 2 workers), full recipe (crop, flip, resize, colour, encode).
Run: .venv/bin/python benchmarks/train_bench.py [--steps 3] [--pipeline-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import goal, machine, table
from training.data import TorchTrainLoader
from training.data.dali import DaliTrainLoader
from training.engine import TrainStep, param_groups
from training.loss import MultiboxLoss
from training.model import build_model
from training.synthetic import generate


def training_rate(data: Path, steps: int, batch: int = 8) -> list[list[object]]:
    loader = TorchTrainLoader(data, batch, 0, 1, 2, 0, augment=True)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == 2:
            break
    model = build_model()
    loss_fn = MultiboxLoss()
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")

    ours = TrainStep(model, loss_fn, opt, scaler, cpu)

    def plain(b):
        images, boxes, labels = b
        locs, logits = model(images)
        loss = loss_fn(locs, logits, boxes.transpose(1, 2), labels)
        loss.backward()
        opt.step()
        opt.zero_grad()

    times: dict[str, list[float]] = {"TrainStep (ours)": [], "plain eager loop": []}
    runners = {"TrainStep (ours)": ours, "plain eager loop": plain}
    ours(batches[0])  # warm-up
    plain(batches[0])
    for i in range(steps):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn(batches[i % 2])
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["plain eager loop"])
    rows = []
    for name, samples in times.items():
        s = statistics.median(samples)
        rows.append([name, batch, f"{s:.2f}", f"{batch / s:.2f}", f"{base / s:.2f}"])
    return rows


def pipeline_rate(data: Path, epochs: int = 2) -> list[list[object]]:
    rows = []
    loaders = {
        "DALI (CPU)": DaliTrainLoader(data, 8, 0, 1, 2, 0, torch.device("cpu")),
        "torchvision v2 (DataLoader, 2 workers)": TorchTrainLoader(data, 8, 0, 1, 2, 0),
    }
    for name, loader in loaders.items():
        for _ in loader:  # warm-up epoch
            pass
        t0 = time.perf_counter()
        n = 0
        for epoch in range(epochs):
            loader.set_epoch(epoch + 1)
            for images, _, _ in loader:
                n += images.shape[0]
        elapsed = time.perf_counter() - t0
        rows.append([name, n, f"{n / elapsed:.1f}"])
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pipeline-only", action="store_true", help="skip the training-step table")
    args = p.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = generate(Path(tmp), train=64, val=0, num_classes=4, seed=0, size=(640, 480))
        print(
            f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
        )
        if not args.pipeline_only:
            print("\nTraining step, ResNet-50 SSD300, fp32, CPU (medians, seconds per step):")
            rows = training_rate(data, args.steps)
            print(table(["loop", "batch", "s/step", "images/s", "vs plain"], rows))
            ours = float(rows[0][-1])
            print()
            print(
                goal("no slower than a plain eager loop (within 5 %)", ours >= 0.95, f"{ours:.2f}")
            )
        print("\nInput pipeline, 640x480 JPEGs, full augmentation + box encoding, 2 threads:")
        print(table(["pipeline", "images", "images/s"], pipeline_rate(data)))


if __name__ == "__main__":
    main()
