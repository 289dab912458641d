"""Synthetic SSD300 network outputs for the postprocess tests and benchmarks."""

from __future__ import annotations

import numpy as np


def random_outputs(rng: np.random.Generator, kind: str, n: int = 1):
    """Network-like outputs: 'random' logits (tens of thousands of candidates above 0.05), or
    'peaky' / 'sparse' ones where background dominates and a few objects are each claimed by a
    cluster of anchors (about 1.5k / a few hundred candidates: a trained model's usual output)."""
    locs = rng.normal(0, 1, (n, 4, 8732)).astype(np.float32)
    logits = rng.normal(0, 1, (n, 81, 8732)).astype(np.float32)
    if kind != "random":
        background, objects = {"peaky": (6.0, 8), "sparse": (7.5, 5)}[kind]
        logits[:, 0] += background
        for i in range(n):
            for _ in range(objects):
                cls = rng.integers(1, 81)
                centre = rng.integers(0, 8732)
                cluster = np.clip(centre + rng.integers(-40, 40, size=60), 0, 8731)
                logits[i, cls, cluster] += rng.uniform(6, 12, size=cluster.size)
    return locs, logits
