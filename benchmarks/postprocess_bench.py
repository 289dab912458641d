"""Postprocess cost per image: the vectorised ssdcore path vs the slow per-class reference loop.

Same decoded inputs for both. Two regimes: random logits (tens of thousands of candidates above
0.05, the worst case) and peaky logits (a few hundred candidates, a trained model's usual output).
Run: .venv/bin/python benchmarks/postprocess_bench.py   (one thread, medians)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from benchmarks.common import goal, machine, median_seconds, table
from devtools.network_outputs import random_outputs
from devtools.reference_decode import reference_decode_single
from ssdcore.anchors import default_boxes
from ssdcore.postprocess import decode_boxes, postprocess_dense, softmax


def main() -> None:
    torch.set_num_threads(1)
    anchors = np.array(default_boxes())
    rows, speedup, ms = [], {}, {}
    for kind, images, ref_repeats in (("random", 3, 1), ("peaky", 5, 3), ("sparse", 5, 5)):
        rng = np.random.default_rng(0)
        ours_ms, ref_ms, cands = [], [], []
        for _ in range(images):
            locs, logits = random_outputs(rng, kind)
            boxes = decode_boxes(locs, anchors)[0]
            probs = softmax(logits.transpose(0, 2, 1), axis=-1)[0]
            cands.append(int((probs[:, 1:] > 0.05).sum()))
            ours_ms.append(
                1e3 * median_seconds(lambda b=boxes, p=probs: postprocess_dense(b, p), 15)
            )
            tb, tp = torch.from_numpy(boxes), torch.from_numpy(probs)
            ref_ms.append(
                1e3
                * median_seconds(lambda b=tb, p=tp: reference_decode_single(b, p), ref_repeats, 0)
            )
        o, r = float(np.median(ours_ms)), float(np.median(ref_ms))
        speedup[kind], ms[kind] = r / o, o
        rows.append([kind, int(np.median(cands)), f"{o:.2f}", f"{r:.1f}", f"{r / o:.0f}x"])
    print(f"machine: {machine()}, 1 thread")
    print(
        table(
            [
                "inputs",
                "candidates > 0.05 (median)",
                "ssdcore ms/image",
                "per-class loop ms/image",
                "speed-up",
            ],
            rows,
        )
    )
    fast = speedup["random"]
    print()
    print(goal("at least 100x the loop at 20k+ candidates", fast >= 100, f"{fast:.0f}x"))
    print(
        goal("under 2 ms for a few hundred candidates", ms["sparse"] < 2, f"{ms['sparse']:.2f} ms")
    )


if __name__ == "__main__":
    main()
