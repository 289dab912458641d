"""A backend that answers instantly with fixed candidates: isolates the gateway's own cost.

Used only by benchmarks/gateway_bench.py (a measurement fixture, not a test fake).
Run as a server: python benchmarks/zero_backend.py PORT DCT_SCALING(0|1)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import uvicorn

from service.app import create_app
from service.backends import Candidates, ModelInfo, Refresh, VersionsState
from service.settings import Settings


class ZeroCostBackend:
    """Returns the same realistic candidate set (K=2000, a few hundred above 0.05) for every image."""

    def __init__(self, topk: int = 2000, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        xy = rng.uniform(0, 0.9, (topk, 2))
        wh = rng.uniform(0.02, 0.3, (topk, 2))
        self.boxes = np.concatenate([xy, np.minimum(xy + wh, 1)], axis=1).astype(np.float32)
        scores = np.sort(rng.beta(0.3, 6, topk).astype(np.float32))[::-1]
        self.scores = np.ascontiguousarray(scores)
        self.classes = rng.integers(1, 81, topk).astype(np.int32)
        self.info = ModelInfo("zero", "1", "zero-cost", topk, None)
        self.versions = VersionsState(served="1", present=["1"])

    async def start(self) -> None:
        pass

    def pin(self) -> None:
        return None  # one version, never replaced

    def unpin(self, pin: None) -> None:
        return None

    async def infer(
        self, images: np.ndarray, timeout: float | None = None, pin: None = None
    ) -> Candidates:
        n = images.shape[0]
        return Candidates(
            np.broadcast_to(self.boxes, (n, *self.boxes.shape)),
            np.broadcast_to(self.scores, (n, *self.scores.shape)),
            np.broadcast_to(self.classes, (n, *self.classes.shape)),
            self.info.version,
        )

    def info_for(self, version: str) -> ModelInfo:
        return self.info

    async def refresh(self) -> Refresh:
        return Refresh()

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


if __name__ == "__main__":
    port, dct = int(sys.argv[1]), sys.argv[2] == "1"
    settings = Settings(port=port, jpeg_dct_scaling=dct, max_in_flight=1024)
    uvicorn.run(
        create_app(settings, ZeroCostBackend()), host="127.0.0.1", port=port, log_level="warning"
    )
