"""Tracking and line counting (service/video/tracking.py) against independent answers: objects on
known random paths keep their ids, and line counts equal the crossings counted by hand (the sign
of each centre's side of the line, frame to frame)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.video.tracking import Line, LineCounter, Tracker


def paths(rng: np.random.Generator, n: int, frames: int) -> np.ndarray:
    """(frames, n, 2) centres of ``n`` objects moving in straight lines at 2-8 px a frame,
    starting apart on a grid so that they never overlap much."""
    starts = np.stack(
        [rng.uniform(60, 580, n), np.linspace(40, 320, n) + rng.uniform(-5, 5, n)], axis=1
    )
    velocity = rng.uniform(2, 8, (n, 1)) * np.stack(
        [rng.choice([-1, 1], n), rng.uniform(-0.1, 0.1, n)], axis=1
    )
    t = np.arange(frames)[:, None, None]
    return starts[None] + velocity[None] * t


@pytest.mark.parametrize("seed", range(5))
def test_objects_apart_keep_one_id_each(seed):
    rng = np.random.default_rng(seed)
    n, frames = 5, 60
    centres = paths(rng, n, frames)
    labels = rng.choice([1, 3], n)
    tracker = Tracker(frame_rate=25, activation_threshold=0.3)
    seen = [set() for _ in range(n)]
    for f in range(frames):
        boxes = np.concatenate([centres[f] - 15, centres[f] + 15], axis=1)
        boxes += rng.normal(0, 1.0, boxes.shape)  # a detector's jitter
        scores = rng.uniform(0.5, 0.95, n)
        order = rng.permutation(n)  # detections come in any order
        ids = tracker.update(boxes[order], scores[order], labels[order])
        for k, obj in enumerate(order):
            if f > 0:  # a new track is confirmed on its second frame
                assert ids[k] >= 0, (f, obj)
                seen[obj].add(int(ids[k]))
    assert all(len(s) == 1 for s in seen), seen
    assert len(set.union(*seen)) == n, "two objects shared an id"
    assert sum(tracker.tracks_per_class.values()) == n


def crossings_by_hand(centres: np.ndarray, line: Line) -> dict[tuple[int, str], int]:
    """(object, direction) -> crossings: the side of the line (the sign of the cross product of
    A->B with A->centre, y down) changes between two frames; from positive (right of A->B as
    displayed) to negative is ``in``."""
    a = np.array([line.x1, line.y1])
    b = np.array([line.x2, line.y2])
    side = np.sign(np.cross(b - a, centres - a))  # (frames, n)
    out: dict[tuple[int, str], int] = {}
    for obj in range(centres.shape[1]):
        s = side[:, obj]
        for before, after in itertools.pairwise(s):
            if before > 0 and after < 0:
                out[(obj, "in")] = out.get((obj, "in"), 0) + 1
            elif before < 0 and after > 0:
                out[(obj, "out")] = out.get((obj, "out"), 0) + 1
    return out


@pytest.mark.parametrize("seed", range(8))
def test_line_counts_equal_the_crossings_counted_by_hand(seed):
    """Random paths (some turning back) across lines that span the frame: every crossing counted
    once, in its direction, by class."""
    rng = np.random.default_rng(100 + seed)
    n, frames = 6, 80
    centres = paths(rng, n, frames)
    turn = int(rng.integers(30, 50))  # half of the objects turn back here
    back = rng.random(n) < 0.5
    centres[turn:, back] = 2 * centres[turn - 1, back] - centres[turn:, back]
    labels = rng.choice([1, 3], n)
    lines = [Line(320.0, -1000.0, 320.0, 1400.0), Line(-1000.0, 200.0, 1640.0, 200.0)]
    counter = LineCounter(lines)
    ids = np.arange(1, n + 1)
    for f in range(frames):
        boxes = np.concatenate([centres[f] - 10, centres[f] + 10], axis=1)
        counter.update(boxes, labels, ids)
    assert crossings_by_hand(centres, lines[0]), "no object crossed: the test would test nothing"
    for line, counts in zip(lines, counter.counts()):
        expected = {"in": {}, "out": {}}
        for (obj, direction), k in crossings_by_hand(centres, line).items():
            label = int(labels[obj])
            expected[direction][label] = expected[direction].get(label, 0) + k
        assert counts == expected, (line, counts, expected)


def test_direction_names():
    """For A=(0,100), B=(200,100) (y down): moving up is ``in``, down is ``out``."""
    counter = LineCounter([Line(0, 100, 200, 100)])
    ids = np.array([1, 2])
    labels = np.array([1, 3])
    for y in (80, 90, 110, 120):
        boxes = np.array([[45, y - 5, 55, y + 5], [145, 200 - y - 5, 155, 200 - y + 5]], float)
        counter.update(boxes, labels, ids)
    assert counter.counts() == [{"in": {3: 1}, "out": {1: 1}}]


@pytest.mark.parametrize("label", [1, 37, 80, 1000])
def test_a_small_object_of_any_class_keeps_one_id(label):
    """The classes' boxes are moved apart in the tracker's plane: a few pixels must survive it
    (ByteTrack computes in float32; a 6-pixel object of class 80 once lost its track)."""
    tracker = Tracker(frame_rate=25, activation_threshold=0.3, span=1920)
    rng = np.random.default_rng(label)
    ids = set()
    for f in range(40):
        x, y = 900 + 1.5 * f, 500 + rng.normal(0, 0.2)
        box = np.array([[x, y, x + 6, y + 6]])
        (track,) = tracker.update(box, np.array([0.9]), np.array([label]))
        if f > 0:
            assert track >= 0, f
            ids.add(int(track))
    assert len(ids) == 1, ids
