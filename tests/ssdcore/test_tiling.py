"""Tiles cover the image and overlap as asked; boxes map back exactly; merging across tiles
against a slow obvious implementation, and an object cut by a tile border comes back whole."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ssdcore.tiling import Tile, auto_plan, count_for, grid_plan, large_enough, merge, to_image

SIZES = [(2000, 1500), (1001, 333), (640, 480), (7, 5), (300, 4000)]
GRIDS = [(1, 1), (2, 2), (4, 3), (5, 7)]
OVERLAPS = [0.0, 0.2, 0.5]


def covered(plan) -> np.ndarray:
    mask = np.zeros((plan.height, plan.width), dtype=np.int32)
    for t in plan.tiles:
        mask[t.y0 : t.y1, t.x0 : t.x1] += 1
    return mask


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("overlap", OVERLAPS)
def test_a_grid_covers_the_image_with_tiles_of_one_size_overlapping_as_asked(size, grid, overlap):
    width, height = size
    plan = grid_plan(width, height, *grid, overlap)
    assert (covered(plan) >= 1).all()
    assert len(plan.tiles) == plan.cols * plan.rows
    assert plan.cols <= min(grid[0], width) and plan.rows <= min(grid[1], height)
    if width >= 100 and height >= 100:  # no tile repeated but in a grid finer than the pixels
        assert (plan.cols, plan.rows) == grid
    for t in plan.tiles:
        assert 0 <= t.x0 < t.x1 <= width and 0 <= t.y0 < t.y1 <= height
    # one row's tiles, left to right; one column's, top to bottom
    row = plan.tiles[: plan.cols]
    col = plan.tiles[:: plan.cols]
    for line, lo, hi in ((row, "x0", "x1"), (col, "y0", "y1")):
        sides = [getattr(t, hi) - getattr(t, lo) for t in line]
        assert max(sides) == min(sides)  # one size
        for a, b in itertools.pairwise(line):
            shared = getattr(a, hi) - getattr(b, lo)
            assert abs(shared - overlap * sides[0]) <= 2.0, (shared, overlap, sides[0])
            assert getattr(b, lo) > getattr(a, lo)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("tile", [64, 300, 600])
@pytest.mark.parametrize("overlap", OVERLAPS)
@pytest.mark.parametrize("max_runs", [1, 5, 13, 64])
def test_auto_keeps_tiles_within_their_side_and_the_runs_within_the_budget(
    size, tile, overlap, max_runs
):
    width, height = size
    plan = auto_plan(width, height, tile, overlap, max_runs)
    assert (covered(plan) >= 1).all()
    if plan.trivial:
        assert plan.runs == 1
    else:
        assert plan.runs <= max_runs
    fewest = count_for(width, tile, overlap) * count_for(height, tile, overlap)
    if fewest + 1 <= max_runs:  # the asked side fits the budget: tiles no larger than it
        assert all(t.width <= tile + 1 and t.height <= tile + 1 for t in plan.tiles)
        assert plan.cols * plan.rows == fewest or fewest == 1
    if width <= tile and height <= tile:
        assert plan.trivial and plan.runs == 1


def test_count_for_is_the_fewest_tiles_that_cover():
    for length in (1, 299, 600, 601, 2000, 4000):
        for tile in (100, 600):
            for overlap in OVERLAPS:
                n = count_for(length, tile, overlap)
                assert n * tile - (n - 1) * overlap * tile >= length - 1e-6
                if n > 1:
                    m = n - 1
                    assert m * tile - (m - 1) * overlap * tile < length


def test_boxes_map_back_to_the_image_exactly():
    # a tile 300 px wide from x=100 and 300 px high from y=50 of a 1000x500 image
    tile = Tile(100, 50, 400, 350)
    boxes = np.array([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.1, 0.2]])
    got = to_image(boxes, tile, 1000, 500)
    # pixels: (250, 200, 400, 350) and (100, 50, 130, 110)
    want = np.array([[250, 200, 400, 350], [100, 50, 130, 110]]) / [1000, 500, 1000, 500]
    np.testing.assert_allclose(got, want, atol=1e-7)
    # random tiles and boxes against the same computation in pixels, one box at a time
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = int(rng.integers(1, 5000)), int(rng.integers(1, 5000))
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        t = Tile(x0, y0, int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1)))
        b = rng.uniform(-0.1, 1.1, 4)
        px = (t.x0 + b[0] * t.width, t.y0 + b[1] * t.height)
        px2 = (t.x0 + b[2] * t.width, t.y0 + b[3] * t.height)
        got = to_image(b[None], t, w, h)[0]
        np.testing.assert_allclose(
            got, [px[0] / w, px[1] / h, px2[0] / w, px2[1] / h], rtol=1e-6, atol=1e-6
        )


def slow_merge(boxes, scores, classes, threshold, method):
    """Greedy by score over plain Python lists: the obvious version."""
    items = sorted(
        ((float(s), int(c), [float(v) for v in b]) for b, s, c in zip(boxes, scores, classes)),
        key=lambda x: -x[0],
    )
    out = []
    taken = [False] * len(items)
    for i, (s, c, b) in enumerate(items):
        if taken[i]:
            continue
        taken[i] = True
        group = [b]
        for j in range(i + 1, len(items)):
            _s2, c2, b2 = items[j]
            if taken[j] or c2 != c:
                continue
            iw = min(b[2], b2[2]) - max(b[0], b2[0])
            ih = min(b[3], b2[3]) - max(b[1], b2[1])
            inter = max(iw, 0) * max(ih, 0)
            smaller = min((b[2] - b[0]) * (b[3] - b[1]), (b2[2] - b2[0]) * (b2[3] - b2[1]))
            if smaller > 0 and inter / smaller >= threshold:
                taken[j] = True
                group.append(b2)
        if method == "nmm":
            b = [
                min(g[0] for g in group),
                min(g[1] for g in group),
                max(g[2] for g in group),
                max(g[3] for g in group),
            ]
        out.append((s, c, b))
    out.sort(key=lambda x: -x[0])
    return out


@pytest.mark.parametrize("method", ["nmm", "nms"])
@pytest.mark.parametrize("seed", range(20))
def test_merge_agrees_with_a_slow_obvious_version(method, seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(0, 60))
    xy = rng.uniform(0, 1, (n, 2))
    wh = rng.uniform(0.01, 0.3, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    scores = rng.permutation(n).astype(np.float32) / max(n, 1) + 0.01  # distinct
    classes = rng.integers(1, 4, n)
    got_boxes, got_scores, got_classes = merge(boxes, scores, classes, 0.5, method)
    want = slow_merge(boxes, scores, classes, 0.5, method)
    assert len(got_scores) == len(want)
    for b, s, c, (ws, wc, wb) in zip(got_boxes, got_scores, got_classes, want):
        assert s == pytest.approx(ws) and c == wc
        np.testing.assert_allclose(b, wb, atol=1e-6)


def test_an_object_cut_by_a_tile_border_comes_back_as_one_whole_box():
    """The left tile sees the object cut at its right border, the right tile sees it whole: the
    merge returns one box, the whole object (nmm), or the higher score's box (nms)."""
    cut = [0.40, 0.40, 0.50, 0.48]  # the left tile ends at x = 0.5
    whole = [0.40, 0.40, 0.56, 0.48]
    boxes = np.array([cut, whole])
    scores = np.array([0.9, 0.8])
    classes = np.array([1, 1])
    b, s, c = merge(boxes, scores, classes, 0.5, "nmm")
    assert len(s) == 1 and c[0] == 1
    np.testing.assert_allclose(b[0], whole, atol=1e-6)
    assert s[0] == pytest.approx(0.9)
    b, s, c = merge(boxes, scores, classes, 0.5, "nms")
    assert len(s) == 1
    np.testing.assert_allclose(b[0], cut, atol=1e-6)  # the cut one wins: why nmm is the default
    # another class at the same place is another object
    b, s, c = merge(boxes, scores, np.array([1, 2]), 0.5, "nmm")
    assert len(s) == 2 and sorted(c.tolist()) == [1, 2]
    # neighbours that do not overlap stay apart
    b, s, _c = merge(np.array([[0, 0, 0.1, 0.1], [0.1, 0, 0.2, 0.1]]), scores, classes, 0.5)
    assert len(s) == 2


def test_bad_plans_are_refused():
    with pytest.raises(ValueError):
        grid_plan(100, 100, 0, 2, 0.2)
    with pytest.raises(ValueError):
        grid_plan(100, 100, 2, 2, 1.0)
    with pytest.raises(ValueError):
        auto_plan(100, 100, 0, 0.2, 10)
    with pytest.raises(ValueError):
        merge(np.zeros((1, 4)), np.ones(1), np.ones(1), 0.5, "union")


def test_the_whole_image_keeps_only_boxes_of_objects_half_a_tile_long():
    plan = grid_plan(2000, 1000, 4, 2, 0.2)  # tiles 588 x 556: half the shorter side is 278
    assert (plan.tiles[0].width, plan.tiles[0].height) == (589, 556)
    px = np.array([[0, 0, 277, 100], [0, 0, 100, 278], [10, 10, 2000, 1000], [5, 5, 40, 40]])
    keep = large_enough(px / [2000, 1000, 2000, 1000], plan)
    assert keep.tolist() == [False, True, True, False]
