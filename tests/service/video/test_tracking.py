"""Tracking and line counting (service/video/tracking.py) against independent answers: objects on
known random paths keep their ids, and line counts equal the crossings counted by hand (the sign
of each centre's side of the line, frame to frame); points in zones as a drawing of the zone
says, entries and exits of scripted tracks."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw

from service.video.tracking import Line, LineCounter, Tracker, Zone, ZoneCounter, inside


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


def _inside_by_drawing(points: np.ndarray, polygon: list[tuple[float, float]]) -> np.ndarray:
    """The slow obvious answer: the polygon filled by PIL, read at each point's pixel."""
    mask = Image.new("1", (400, 400))
    ImageDraw.Draw(mask).polygon(polygon, fill=1)
    grid = np.asarray(mask)
    return np.array([bool(grid[int(y), int(x)]) for x, y in points])


@pytest.mark.parametrize(
    "polygon",
    [
        [(50, 50), (350, 50), (350, 350), (50, 350)],  # a square
        [(50, 50), (350, 50), (350, 150), (150, 150), (150, 350), (50, 350)],  # an L (concave)
        [(200, 20), (380, 380), (20, 380)],  # a triangle
        [(20, 20), (380, 20), (200, 200), (380, 380), (20, 380), (120, 200)],  # two notches
    ],
)
def test_points_in_a_zone_as_a_filled_drawing_of_it_says(polygon):
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 400, (3000, 2))
    # a pixel's filled or not near an edge is the rasteriser's choice: only points 2 px from any
    # edge are compared
    poly = np.asarray(polygon, dtype=float)
    a, b = poly, np.roll(poly, -1, axis=0)
    ab = b - a
    t = np.clip(((points[:, None] - a) * ab).sum(-1) / (ab * ab).sum(-1), 0, 1)
    dist = np.linalg.norm(points[:, None] - (a + t[..., None] * ab), axis=-1).min(axis=1)
    far = points[dist > 2]
    want = _inside_by_drawing(far, polygon)
    assert 0.1 < want.mean() < 0.95  # both sides are tested
    np.testing.assert_array_equal(inside(far, poly), want)


def test_zone_entries_exits_and_tracks_lost_inside():
    """A zone x 100..200 (a square): track 1 walks in and out, track 2 walks in and vanishes
    (exits as lost once gone for longer than a track is kept), track 3 (another class) stays
    outside; the bottom centre of a box decides, not its middle."""
    zone = Zone(((100, 100), (200, 100), (200, 200), (100, 200)))
    counter = ZoneCounter([zone])

    def box(cx: float, bottom: float) -> list[float]:
        return [cx - 10, bottom - 40, cx + 10, bottom]

    frames = [  # (time, [(track, label, cx, bottom)])
        # track 2's box (y 175..215) has its middle inside, its bottom below: outside
        (0.0, [(1, 1, 50, 150), (2, 1, 150, 215), (3, 2, 300, 150)]),
        (0.5, [(1, 1, 120, 150), (2, 1, 150, 130), (3, 2, 300, 150)]),  # 1 and 2 enter
        (1.0, [(1, 1, 150, 150), (2, 1, 150, 160), (3, 2, 250, 150)]),
        (1.5, [(1, 1, 250, 150), (3, 2, 210, 150)]),  # 1 exits; 2 not seen
        (3.0, [(3, 2, 210, 150)]),  # 2 unseen for 2.0 s: still kept
        (3.6, [(3, 2, 210, 150), (1, 1, 150, 120)]),  # 2 lost (2.6 s); 1 enters again
    ]
    events = []
    for now, dets in frames:
        boxes = np.array([box(cx, bottom) for _, _, cx, bottom in dets], dtype=float)
        labels = np.array([label for _, label, _, _ in dets])
        ids = np.array([track for track, _, _, _ in dets])
        events.append(counter.update(boxes, labels, ids, now))
    assert events == [
        [],
        [(0, 1, 1, "enter"), (0, 2, 1, "enter")],
        [],
        [(0, 1, 1, "exit")],
        [],
        [(0, 1, 1, "enter"), (0, 2, 1, "lost")],
    ]
    assert counter.entered == [{1: 3}] and counter.exited == [{1: 2}]
    assert counter.occupancy() == [{1: 1}]
    # a detection not tracked yet (-1) is nobody: it never enters
    assert counter.update(np.array([box(150, 150)]), np.array([2]), np.array([-1]), 4.0) == []


def test_a_point_on_a_zones_edge_is_inside():
    """A box clipped to the picture has its bottom on the picture's last row: a zone drawn to
    that edge must hold it (it used to exit and enter again as the object touched the edge)."""
    zone = np.array([[0, 240], [640, 240], [640, 480], [0, 480]], dtype=float)
    edge_points = np.array([[320, 480], [0, 300], [640, 300], [320, 240], [640, 480]], float)
    assert inside(edge_points, zone).all()
    assert not inside(np.array([[320, 480.5], [-0.5, 300], [320, 239.5]]), zone).any()
    counter = ZoneCounter([Zone(tuple(map(tuple, zone)))])
    moves = [
        counter.update(np.array([[300, bottom - 50, 340, bottom]]), np.array([1]), np.array([7]), t)
        for t, bottom in enumerate((400, 470, 480, 480, 470))
    ]
    assert moves == [[(0, 7, 1, "enter")], [], [], [], []]
