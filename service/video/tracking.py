"""Tracking, line counting and zones: the only module that imports ``supervision`` (MIT).

Tracks come from supervision's ByteTrack, kept within a class (ByteTrack itself ignores the class:
a track could otherwise turn from a car into a person; see :class:`Tracker`).
Why supervision 0.30 and not Roboflow's ``trackers`` (Apache-2.0, where ByteTrack moves next):
``trackers`` needs numpy 2, and the Triton client stack the project tests with (``nvidia-
pytriton``) pins numpy below 2. supervision 0.30 is the last release that ships ByteTrack (it
warns that it moves); this module is the one place to change when the move is possible.

Line counts are supervision's ``LineZone`` on each box's centre: a track is counted once each
time its centre crosses the segment (not the infinite line) from one side to the other.
Directions, with the line given from its first point A to its second B, in the pixels of the
displayed image (y down): ``in`` is a crossing from the right of A->B to its left, ``out`` from
its left to its right (for A=(0,100), B=(200,100): moving up is ``in``, down is ``out``).

Zones are polygons; a track is in a zone while the bottom centre of its box (where an object
stands on the ground, in a camera's view) lies inside it (even-odd rule). A track enters when it
is first seen inside, exits when it is seen outside, or when it has not been seen at all for
``LOST_TRACK_S`` (it left the picture from inside the zone, or was lost there: ``lost``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

with warnings.catch_warnings():  # its optional OpenCV backend; the pure numpy one is used
    warnings.simplefilter("ignore")
    import supervision as sv

# a track lost for up to this many seconds (occluded, missed) keeps its id when it comes back
LOST_TRACK_S = 2.0
# a detection continues a track when 1 - IoU(its box, the track's predicted box) is below this:
# 0.9 (IoU > 0.1) rather than ByteTrack's 0.8, for videos sampled at a few frames a second where an
# object moves much of its width between two frames (the test scene at 10 fps: 3 person tracks for
# 2 people at 0.9, 4 at 0.8). A new track is still confirmed only at IoU > 0.3 with its first
# box (ByteTrack's rule): at 5 fps the scene's walking person (36 px a frame) is never tracked.
MATCH_COST = 0.9
CLASS_GRID = 32  # classes per row of cells in the tracker's plane (see Tracker.update)


@dataclass(frozen=True)
class Zone:
    points: tuple[tuple[float, float], ...]  # a polygon's corners in order, pixels


@dataclass(frozen=True)
class Line:
    x1: float
    y1: float
    x2: float
    y2: float


class Tracker:
    """Track ids for the detections of consecutive frames (of one video or stream)."""

    def __init__(self, frame_rate: float, activation_threshold: float, span: int = 4096) -> None:
        """``span``: the frame's longest side in pixels (boxes lie within it)."""
        self.frame_rate = max(1.0, frame_rate)
        self.cell = 2.0 * max(1, span)  # the classes' boxes a cell apart
        with warnings.catch_warnings():  # ByteTrack's "moves to trackers" notice
            warnings.simplefilter("ignore")
            self._tracker = sv.ByteTrack(
                track_activation_threshold=activation_threshold,
                lost_track_buffer=round(30 * LOST_TRACK_S),  # frames at 30 fps, scaled to ours
                minimum_matching_threshold=MATCH_COST,
                frame_rate=round(self.frame_rate),
                minimum_consecutive_frames=1,
            )
        self._label_of: dict[int, int] = {}  # track id -> its class
        self.tracks_per_class: dict[int, int] = {}  # label -> distinct tracks seen

    def update(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels`` (N,) of one frame -> the
        track id of each detection (N,), -1 where none (a new object's first frame is tracked
        from the next one, as ByteTrack confirms a track).

        One ByteTrack for every class: each class's boxes are moved to a cell of their own on a
        grid of CLASS_GRID columns (as batched NMS does), so boxes of two classes never overlap
        and a track never changes class, at the cost of one tracker update a frame (a tracker
        per class cost 8-30 % of a video's time with a model that finds many classes). The grid
        keeps coordinates small: ByteTrack computes in float32 (24-bit mantissa), and with the
        classes side by side on one line a 6-pixel object of class 80 lost its track."""
        labels = np.asarray(labels, dtype=np.int64)
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        shift = np.zeros_like(boxes)
        shift[:, [0, 2]] = (labels % CLASS_GRID)[:, None] * self.cell
        shift[:, [1, 3]] = (labels // CLASS_GRID)[:, None] * self.cell
        tracked = self._tracker.update_with_detections(
            sv.Detections(
                xyxy=boxes + shift,
                confidence=np.asarray(scores, dtype=np.float64),
                class_id=labels,
                data={"row": np.arange(len(labels))},
            )
        )
        ids = np.full(len(labels), -1, dtype=np.int64)
        if len(tracked) == 0:
            return ids
        for row, track_id in zip(tracked.data["row"], tracked.tracker_id):
            ids[int(row)] = int(track_id)
            if int(track_id) not in self._label_of:
                label = int(labels[int(row)])
                self._label_of[int(track_id)] = label
                self.tracks_per_class[label] = self.tracks_per_class.get(label, 0) + 1
        return ids


class LineCounter:
    """Per line, how many tracks of each class crossed it in each direction."""

    def __init__(self, lines: list[Line]) -> None:
        self.lines = lines
        self._zones = [
            sv.LineZone(
                sv.Point(line.x1, line.y1),
                sv.Point(line.x2, line.y2),
                triggering_anchors=[sv.Position.CENTER],
            )
            for line in lines
        ]

    def update(
        self, boxes: np.ndarray, labels: np.ndarray, track_ids: np.ndarray
    ) -> list[tuple[int, int, str]]:
        """The crossings of this frame: (line index, track id, ``in`` or ``out``)."""
        keep = track_ids >= 0
        if not keep.any():
            return []
        det = sv.Detections(
            xyxy=np.asarray(boxes, dtype=np.float32)[keep].reshape(-1, 4),
            class_id=np.asarray(labels)[keep],
            tracker_id=track_ids[keep],
        )
        events = []
        for index, zone in enumerate(self._zones):
            crossed_in, crossed_out = zone.trigger(det)
            for track, went_in, went_out in zip(det.tracker_id, crossed_in, crossed_out):
                if went_in:
                    events.append((index, int(track), "in"))
                if went_out:
                    events.append((index, int(track), "out"))
        return events

    def counts(self) -> list[dict[str, dict[int, int]]]:
        """Per line: ``{"in": {label: n}, "out": {label: n}}``."""
        return [
            {
                "in": {int(k): v for k, v in zone.in_count_per_class.items()},
                "out": {int(k): v for k, v in zone.out_count_per_class.items()},
            }
            for zone in self._zones
        ]


def inside(points: np.ndarray, polygon: np.ndarray, tolerance: float = 1e-6) -> np.ndarray:
    """Which of ``points`` (N, 2) lie inside ``polygon`` (M, 2) or on its edges: the even-odd
    rule (a ray from the point towards +x crosses the edges an odd number of times), and a point
    on an edge is inside (a box clipped to the picture has its bottom on the picture's edge, where
    a zone drawn to that edge ends)."""
    px, py = points[:, 0:1], points[:, 1:2]  # (N, 1) against the (M,) edges
    x0, y0 = polygon[:, 0], polygon[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    straddles = (y0 > py) != (y1 > py)  # the edge spans the point's height (one end above)
    with np.errstate(divide="ignore", invalid="ignore"):
        at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)  # where the edge is at that height
    odd = (straddles & (px < at)).sum(axis=1) % 2 == 1
    # on an edge: on its line (cross product ~ 0) and within its ends
    cross = (x1 - x0) * (py - y0) - (y1 - y0) * (px - x0)
    length = np.hypot(x1 - x0, y1 - y0)
    within = (
        (np.minimum(x0, x1) - tolerance <= px)
        & (px <= np.maximum(x0, x1) + tolerance)
        & (np.minimum(y0, y1) - tolerance <= py)
        & (py <= np.maximum(y0, y1) + tolerance)
    )
    on_edge = ((np.abs(cross) <= tolerance * np.maximum(length, 1.0)) & within).any(axis=1)
    return odd | on_edge


class ZoneCounter:
    """Per zone, the tracks inside it now, and how many of each class entered and exited."""

    def __init__(self, zones: list[Zone]) -> None:
        self.zones = zones
        self._polygons = [np.asarray(z.points, dtype=np.float64) for z in zones]
        # per zone: track id -> (label, when it was last seen)
        self._inside: list[dict[int, tuple[int, float]]] = [{} for _ in zones]
        self.entered: list[dict[int, int]] = [{} for _ in zones]
        self.exited: list[dict[int, int]] = [{} for _ in zones]

    def update(
        self, boxes: np.ndarray, labels: np.ndarray, track_ids: np.ndarray, now: float
    ) -> list[tuple[int, int, int, str]]:
        """This frame's zone events: (zone index, track id, label, ``enter``/``exit``/``lost``);
        ``now`` in seconds (any clock that only goes forward)."""
        keep = np.asarray(track_ids) >= 0
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)[keep]
        labels = np.asarray(labels, dtype=np.int64)[keep]
        ids = np.asarray(track_ids, dtype=np.int64)[keep]
        feet = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, boxes[:, 3]], axis=1)
        seen = set(ids.tolist())
        events = []
        for index, polygon in enumerate(self._polygons):
            here = self._inside[index]
            within = inside(feet, polygon) if len(feet) else np.zeros(0, dtype=bool)
            for track, label, is_in in zip(ids.tolist(), labels.tolist(), within.tolist()):
                if is_in:
                    if track not in here:
                        events.append((index, track, label, "enter"))
                        self._tally(self.entered[index], label)
                    here[track] = (label, now)
                elif track in here:
                    del here[track]
                    events.append((index, track, label, "exit"))
                    self._tally(self.exited[index], label)
            for track, (label, last) in list(here.items()):
                if track not in seen and now - last > LOST_TRACK_S:
                    del here[track]
                    events.append((index, track, label, "lost"))
                    self._tally(self.exited[index], label)
        return events

    @staticmethod
    def _tally(counts: dict[int, int], label: int) -> None:
        counts[label] = counts.get(label, 0) + 1

    def occupancy(self) -> list[dict[int, int]]:
        """Per zone: tracks inside it now, by class."""
        out = []
        for here in self._inside:
            by_label: dict[int, int] = {}
            for label, _ in here.values():
                self._tally(by_label, label)
            out.append(by_label)
        return out
