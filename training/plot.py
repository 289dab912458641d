"""Plot loss, learning rate and mAP curves from a training metrics log (JSON lines) to a PNG.

python -m training.plot runs/ssd/metrics.jsonl --out runs/ssd/curves.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def load(path: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return (
        [r for r in records if r.get("event") == "step"],
        [r for r in records if r.get("event") == "eval"],
    )


def plot(log: Path, out: Path) -> Path:
    steps, evals = load(log)
    if not steps:
        raise SystemExit(f"{log} has no training steps")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    it = [r["iteration"] for r in steps]
    axes[0].plot(it, [r["loss"] for r in steps])
    axes[0].set(title="training loss", xlabel="iteration", yscale="log")
    axes[1].plot(it, [r["lr"] for r in steps])
    axes[1].set(title="learning rate", xlabel="iteration")
    if evals:
        epochs = [r["epoch"] + 1 for r in evals]
        axes[2].plot(epochs, [r["AP"] for r in evals], "o-", label="mAP@[.5:.95]")
        axes[2].plot(epochs, [r["AP50"] for r in evals], "s-", label="mAP@.5")
        axes[2].legend()
    axes[2].set(title="COCO mAP", xlabel="epoch")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("log", type=Path)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    out = plot(args.log, args.out or args.log.with_name("curves.png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
