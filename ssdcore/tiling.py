"""Sliced (tiled) inference for small objects in large images (numpy only).

A 300x300 model sees a 4000x3000 photo at a 13th of its size: a 40-pixel object becomes 3 pixels
and is never found. Tiling runs the model on overlapping crops (tiles) at a scale it has learnt,
maps each tile's boxes back to the image, and merges the boxes found twice where tiles overlap;
the whole image is run once more for the large objects.

- ``plan``: the tiles of an image, from a grid (``cols`` x ``rows``) or a tile side (``auto``), as
  pixel rectangles that cover the image, neighbours overlapping by the asked fraction.
- ``to_image``: a tile's normalised boxes -> the image's normalised boxes.
- ``large_enough``: which of the whole image's boxes to keep: those of objects at least half a
  tile's side, which tiles see cut (the whole image runs for them). Smaller ones are the tiles'
  to find, at a better scale; the whole image's guesses at them are blobs over groups of small
  objects, and a blob would swallow the tiles' boxes in the merge (measured: recall 0.74 with
  tiles alone, 0.68 with every box of the whole image, docs/benchmarks.md#tiles).
- ``merge``: the boxes of all tiles -> one box per object: ``"nmm"`` (greedy non-maximum
  merging: a box absorbs every lower-scoring box of its class that it mostly covers, by
  intersection over the smaller box, and becomes their union: an object cut by a tile border
  comes back whole) or ``"nms"`` (class-wise NMS by the same measure: the best box survives
  as it is, so a cut box can win). docs/benchmarks.md#tiles measures both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MERGE_METHODS = ("nmm", "nms")


@dataclass(frozen=True)
class Tile:
    """A rectangle of the image in pixels: x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


@dataclass(frozen=True)
class TilePlan:
    """The tiles of one image (row by row), the grid they form, and whether the whole image is
    run too. A plan of one tile that is the whole image runs nothing extra."""

    width: int
    height: int
    cols: int
    rows: int
    tiles: tuple[Tile, ...]
    whole: bool

    @property
    def runs(self) -> int:
        """Model runs for the image: its tiles, and the whole image once where asked."""
        return len(self.tiles) + (1 if self.whole and not self.trivial else 0)

    @property
    def trivial(self) -> bool:
        """One tile covering the image: the same as no tiling."""
        return len(self.tiles) == 1 and self.tiles[0] == Tile(0, 0, self.width, self.height)


@dataclass(frozen=True)
class TileSpec:
    """What a request asks for: a grid of ``grid`` = (columns, rows), or auto (None: tiles of
    side at most ``size`` pixels, as many as a budget of model runs allows); neighbours
    overlapping by ``overlap``; the whole image run too where ``whole``."""

    grid: tuple[int, int] | None
    size: int
    overlap: float
    whole: bool = True

    def runs_per_image(self) -> int | None:
        """Model runs per image of a grid (at most: a grid finer than the image's pixels
        shrinks); None for auto, which fits the budget."""
        if self.grid is None:
            return None
        return self.grid[0] * self.grid[1] + (1 if self.whole else 0)

    def plan(self, width: int, height: int, max_runs: int) -> TilePlan:
        """The tiles of a width x height image; auto within ``max_runs`` model runs."""
        if self.grid is None:
            return auto_plan(width, height, self.size, self.overlap, max_runs, self.whole)
        return grid_plan(width, height, *self.grid, self.overlap, self.whole)

    def cut(self, width: int, height: int, max_runs: int) -> TilePlan | None:
        """:meth:`plan`, or None where it is one tile covering the image (run it whole)."""
        plan = self.plan(width, height, max_runs)
        return None if plan.trivial else plan


def _spans(length: int, count: int, overlap: float) -> list[tuple[int, int]]:
    """``count`` intervals of one size covering [0, length), the first starting at 0 and the
    last ending at ``length``, neighbours overlapping by ``overlap`` of that size (to a pixel
    or two): size = length / (count - (count - 1) * overlap)."""
    if count == 1:
        return [(0, length)]
    size = min(length, math.ceil(length / (count - (count - 1) * overlap) - 1e-9))
    step = (length - size) / (count - 1)
    # a grid finer than the pixels (tiny images) would repeat a tile: each once
    return sorted({(round(i * step), round(i * step) + size) for i in range(count)})


def grid_plan(
    width: int, height: int, cols: int, rows: int, overlap: float, whole: bool = True
) -> TilePlan:
    """``cols`` x ``rows`` tiles over a width x height image, neighbours overlapping by
    ``overlap`` (0 <= overlap < 1) of a tile's side."""
    if not (cols >= 1 and rows >= 1):
        raise ValueError(f"a grid needs at least one column and row, got {cols}x{rows}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    xs = _spans(width, min(cols, width), overlap)  # never a tile without pixels
    ys = _spans(height, min(rows, height), overlap)
    tiles = tuple(Tile(x0, y0, x1, y1) for y0, y1 in ys for x0, x1 in xs)
    return TilePlan(width, height, len(xs), len(ys), tiles, whole)


def count_for(length: int, tile: float, overlap: float) -> int:
    """The fewest tiles of side at most ``tile`` overlapping by ``overlap`` that cover
    ``length``: n tiles of side t cover n * t - (n - 1) * overlap * t."""
    if length <= tile:
        return 1
    return math.ceil((length - overlap * tile) / (tile * (1 - overlap)) - 1e-9)


def auto_plan(
    width: int, height: int, tile: int, overlap: float, max_runs: int, whole: bool = True
) -> TilePlan:
    """Tiles of side at most ``tile`` pixels (the side at which objects look to the model as
    they did in training: about twice the input for a model trained on photos of ~600 px);
    where that needs more than ``max_runs`` model runs (the whole image included), the side
    grows until it does not. An image no larger than a tile is run whole, once."""
    if tile < 1:
        raise ValueError(f"the tile side must be positive, got {tile}")
    if max_runs < 1:
        raise ValueError(f"max_runs must be at least 1, got {max_runs}")
    budget = max_runs - 1 if whole else max_runs
    side = float(tile)
    while True:
        cols, rows = count_for(width, side, overlap), count_for(height, side, overlap)
        if cols * rows == 1 or cols * rows <= budget:
            break
        side *= 1.1
    return grid_plan(width, height, cols, rows, overlap, whole)


def to_image(boxes: np.ndarray, tile: Tile, width: int, height: int) -> np.ndarray:
    """Boxes normalised to a tile (n, 4) x1, y1, x2, y2 -> normalised to the whole
    width x height image (float32)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = np.array([tile.width / width, tile.height / height] * 2)
    shift = np.array([tile.x0 / width, tile.y0 / height] * 2)
    return (b * scale + shift).astype(np.float32)


def large_enough(boxes: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Which of the whole image's boxes (normalised, (n, 4)) are of objects at least half a
    tile's shorter side long (their longer side, in pixels): a boolean per box."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    side = np.maximum((b[:, 2] - b[:, 0]) * plan.width, (b[:, 3] - b[:, 1]) * plan.height)
    shortest = min(min(t.width, t.height) for t in plan.tiles)
    return side >= 0.5 * shortest


def _overlap_of_smaller(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Intersection over the smaller area of ``box`` (4,) with each of ``others`` (n, 4)."""
    iw = np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0])
    ih = np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    smaller = np.minimum(area, areas)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(smaller > 0, inter / smaller, 0.0)


def merge(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    threshold: float = 0.5,
    method: str = "nmm",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes of every tile of an image -> one box per object, by descending score.

    Greedy, by score, within each class: the best remaining box takes every remaining box of
    its class whose intersection over the smaller of the two is >= ``threshold``; ``nmm`` makes
    the kept box the union of those it took (its score stays the best), ``nms`` drops them.
    boxes (n, 4) float, scores (n,), classes (n,). Returns boxes, scores, classes.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"merge method must be one of {MERGE_METHODS}, got {method!r}")
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    classes = np.asarray(classes, dtype=np.int32).reshape(-1)
    out_boxes, out_scores, out_classes = [], [], []
    for cls in np.unique(classes):
        idx = np.flatnonzero(classes == cls)
        idx = idx[np.argsort(-scores[idx], kind="stable")]
        remaining = boxes[idx]
        rem_scores = scores[idx]
        while remaining.shape[0]:
            best = remaining[0]
            taken = _overlap_of_smaller(best, remaining) >= threshold
            taken[0] = True
            if method == "nmm":
                group = remaining[taken]
                best = np.concatenate([group[:, :2].min(axis=0), group[:, 2:].max(axis=0)])
            out_boxes.append(best)
            out_scores.append(rem_scores[0])
            out_classes.append(cls)
            remaining, rem_scores = remaining[~taken], rem_scores[~taken]
    if not out_scores:
        return (
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int32),
        )
    order = np.argsort(-np.asarray(out_scores), kind="stable")
    return (
        np.asarray(out_boxes, dtype=np.float32)[order],
        np.asarray(out_scores, dtype=np.float32)[order],
        np.asarray(out_classes, dtype=np.int32)[order],
    )
