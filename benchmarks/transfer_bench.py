"""Does fine-tuning transfer? mAP on a dataset's own classes after the same CPU steps, started
from a detection checkpoint vs from scratch, side by side in one run.

1. A synthetic set with COCO's categories (person, car, dog, chair drawn) trains a source model
   from scratch (ResNet-18, no ImageNet: these machines cannot download it).
2. A synthetic set with its own three categories (ids 40, 12, 7: "Zebra crossing", "car",
   "Café table"; "car" is drawn as the source's car, the two others as its person and dog)
   trains twice for the same steps and seed: ``--pretrained SOURCE`` (class heads re-initialised,
   car's rows copied by name) and from scratch.
Both runs go through ``torchrun training/train.py``; mAP is pycocotools' on the own set's
validation images, in its own category ids.

Run: .venv/bin/python benchmarks/transfer_bench.py [--source-epochs 20] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import goal, machine, table
from training.synthetic import generate

OWN = [(40, "Zebra crossing"), (12, "car"), (7, "Café table")]


def train(data: Path, save: Path, epochs: int, batch: int, extra: list[str]) -> dict:
    """One CPU job; returns its last evaluation, its step count, seconds and transfer log."""
    args = [
        "--data", str(data), "--save", str(save), "--epochs", str(epochs),
        "--batch-size", str(batch), "--eval-batch-size", "16", "--evaluation", str(epochs - 1),
        "--backbone", "resnet18", "--backbone-weights", "none", "--data-backend", "torch",
        "--no-augment", "--learning-rate", "0.2", "--warmup", "10",
        "--multistep", str(max(1, int(epochs * 0.8))), "--num-workers", "1", "--seed", "0",
        *extra,
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "training" / "train.py"), *args],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    end = next(r for r in records if r["event"] == "end")
    transfer = [
        re.sub(r"^.*\] ", "", line)
        for line in proc.stderr.splitlines()
        if "pretrained " in line or "class rows copied" in line or "re-initialised:" in line
    ]
    return {"eval": evals[-1], "steps": end["iteration"], "seconds": seconds, "log": transfer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=64, help="training images of each set")
    p.add_argument("--val", type=int, default=32)
    p.add_argument("--source-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs (both runs)")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        coco = generate(tmp / "coco", args.train, args.val, num_classes=4, seed=1)
        own = generate(tmp / "own", args.train, args.val, seed=2, categories=OWN)
        source = train(coco, tmp / "source", args.source_epochs, args.batch_size, [])
        ckpt = tmp / "source" / f"epoch_{args.source_epochs - 1}.pt"
        runs = {
            "fine-tuned from the source checkpoint": train(
                own, tmp / "ft", args.epochs, args.batch_size, ["--pretrained", str(ckpt)]
            ),
            "from scratch": train(own, tmp / "scratch", args.epochs, args.batch_size, []),
        }
    print(
        f"machine: {machine()}; ResNet-18 SSD300, fp32, CPU, no augmentation, batch {args.batch_size}"
    )
    print(
        f"\nsource: synthetic COCO-class set, {source['steps']} steps from scratch in "
        f"{source['seconds']:.0f} s: mAP {source['eval']['AP']:.3f}, mAP@0.5 {source['eval']['AP50']:.3f}"
    )
    rows = [
        [
            name,
            r["steps"],
            f"{r['eval']['AP']:.3f}",
            f"{r['eval']['AP50']:.3f}",
            f"{r['seconds']:.0f}",
        ]
        for name, r in runs.items()
    ]
    print(f"\nown 3-class set ({args.train} training / {args.val} validation images):")
    print(table(["start", "steps", "mAP", "mAP@0.5", "seconds"], rows))
    tuned, scratch = (runs[k]["eval"]["AP50"] for k in runs)
    print()
    print(goal("the fine-tuned run above the one from scratch (mAP@0.5)", tuned > scratch,
               f"{tuned:.3f} against {scratch:.3f}"))  # fmt: skip
    print("\ntransfer log:")
    for line in runs["fine-tuned from the source checkpoint"]["log"]:
        print(f"    {line}")


if __name__ == "__main__":
    main()
