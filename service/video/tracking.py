"""Tracking and line counting: the only module that imports ``supervision`` (MIT).

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
