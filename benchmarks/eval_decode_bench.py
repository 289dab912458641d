"""Evaluation's decode on the CPU, per image, from the same network outputs, side by side:

- "top-K over all pairs": softmax, then a top-K over all 8732 x 80 (anchor, class) pairs, then the
  postprocess (what evaluation did before);
- "pairs above 0.05": softmax, then every pair scoring above the reference's 0.05 threshold,
  then the same postprocess (what evaluation does now);
- the reference's per-class loop (``devtools/reference_decode.py``), for scale.

The three give the same detections (checked here, and in tests/training/test_classes.py). Inputs:
a random model calibrated to unsaturated outputs (dense: many pairs above 0.05) and the same
model made "trained-like" (a dominant background: a few hundred pairs, as a trained model has).
Forward passes are excluded: the decode alone, with one thread.

Run: .venv/bin/python benchmarks/eval_decode_bench.py [--images 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import torch
from torch import nn

from benchmarks.common import machine, table
from devtools.images import photo
from devtools.reference_decode import reference_decode_single
from ssdcore.postprocess import postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS
from training.export.served import ServedSSD, candidates_above
from training.model import build_model, calibrate_random_model

ALL_PAIRS = 8732 * 80


class Fixed(nn.Module):
    """Stands in for the network: returns recorded (locs, logits), so only the decode is timed."""

    def __init__(self, spec, locs: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.spec, self.locs, self.logits = spec, locs, logits

    def forward(self, images):
        return self.locs, self.logits


def outputs(background_bias: float, n: int):
    torch.manual_seed(3)
    model = build_model()
    photos = torch.from_numpy(np.stack([photo(300, 300, seed=s) for s in range(n)]))
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    calibrate_random_model(model, (photos.permute(0, 3, 1, 2) / 255 - mean) / std)
    with torch.no_grad():
        for head, nd in zip(model.conf, model.spec.boxes_per_location):
            head.bias[:nd] += background_bias
        locs, logits = model.eval()(ServedSSD(model).preprocess(photos))
    return model.spec, locs, logits, photos


def time_per_image(fn, images: int, repeats: int) -> tuple[float, object]:
    result = fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) / images)
    return statistics.median(samples) * 1e3, result


def compare(name: str, background_bias: float, images: int, repeats: int) -> list[object]:
    pp = REFERENCE_POSTPROCESS
    spec, locs, logits, photos = outputs(background_bias, images)
    fixed = Fixed(spec, locs, logits)
    topk = ServedSSD(fixed, topk=ALL_PAIRS).eval()
    dense = ServedSSD(fixed).eval()

    @torch.no_grad()
    def old():
        b, s, c = topk(photos)
        return [postprocess(*(t.numpy() for t in x), pp) for x in zip(b, s, c)]

    @torch.no_grad()
    def new():
        boxes, probs = dense.decode(photos)
        return [
            postprocess(*(t.numpy() for t in candidates_above(b, q, pp.score_threshold)), pp)
            for b, q in zip(boxes, probs)
        ]

    @torch.no_grad()
    def loop():
        boxes, probs = dense.decode(photos)
        return [reference_decode_single(b, q.t()) for b, q in zip(boxes, probs)]

    old_ms, old_det = time_per_image(old, images, repeats)
    new_ms, new_det = time_per_image(new, images, repeats)
    ref_ms, ref_det = time_per_image(loop, images, max(1, repeats // 2))
    same = all(
        a.classes.tolist() == b.classes.tolist() == r[2].tolist()
        and np.array_equal(a.scores, b.scores)
        for a, b, r in zip(old_det, new_det, ref_det)
    )
    with torch.no_grad():
        _, probs = dense.decode(photos)
    above = int(statistics.median((probs[:, 1:] > pp.score_threshold).sum(dim=(1, 2)).tolist()))
    return [name, above, f"{old_ms:.1f}", f"{new_ms:.1f}", f"{ref_ms:.1f}",
            f"{old_ms / new_ms:.1f}x", "yes" if same else "NO"]  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = [
        compare(name, bias, args.images, args.repeats)
        for name, bias in (("random (dense)", 0.0), ("trained-like (sparse)", 12.0))
    ]
    print(f"machine: {machine()}, torch {torch.__version__}, 1 thread, {args.images} images")
    headers = ["outputs", "pairs > 0.05 (median)", "top-K over all pairs ms/image",
               "pairs above 0.05 ms/image", "reference loop ms/image", "speed-up", "same detections"]  # fmt: skip
    print(table(headers, rows))


if __name__ == "__main__":
    main()
