"""The 8732 SSD300 default boxes, in the order the network's outputs use.

Order: level-major (38x38 first), then box size, then row, then column. This is the order the
reference heads produce with a plain ``reshape(N, 4, -1)`` of an NCHW conv output whose channels are
``coordinate * boxes_per_location + size`` (see docs/spec), so the anchors line up with NVIDIA's
published checkpoint.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from ssdcore.spec import SSD300, SSD300Spec


def box_sizes(spec: SSD300Spec, level: int) -> list[tuple[float, float]]:
    """(w, h) of the default boxes of one level, relative to the image, in anchor order."""
    s1 = spec.scales[level] / spec.image_size
    s2 = spec.scales[level + 1] / spec.image_size
    big = float(np.sqrt(s1 * s2))
    sizes = [(s1, s1), (big, big)]
    for ratio in spec.aspect_ratios[level]:
        r = float(np.sqrt(ratio))
        sizes += [(s1 * r, s1 / r), (s1 / r, s1 * r)]
    return sizes


@lru_cache(maxsize=8)
def _default_boxes_xywh(spec: SSD300Spec) -> np.ndarray:
    rows = []
    for level, (fmap, step) in enumerate(zip(spec.feature_maps, spec.steps)):
        cells_per_image = spec.image_size / step  # 37.5 for the first level: steps are not 300/f
        centres = (np.arange(fmap, dtype=np.float64) + 0.5) / cells_per_image
        cy, cx = np.meshgrid(centres, centres, indexing="ij")  # row-major: row i, column j
        for w, h in box_sizes(spec, level):
            level_boxes = np.stack(
                [cx.ravel(), cy.ravel(), np.full(cx.size, w), np.full(cx.size, h)], axis=1
            )
            rows.append(level_boxes)
    boxes = np.concatenate(rows).astype(np.float32)
    # The reference clamps the centre-size form to [0, 1] (centres and sizes, not corners).
    np.clip(boxes, 0.0, 1.0, out=boxes)
    boxes.setflags(write=False)
    return boxes


def default_boxes(spec: SSD300Spec = SSD300, order: Literal["xywh", "ltrb"] = "xywh") -> np.ndarray:
    """Default boxes as a read-only float32 array of shape (num_anchors, 4).

    ``xywh`` is (centre x, centre y, width, height), clamped to [0, 1]. ``ltrb`` is computed from
    the clamped xywh and is deliberately not clipped (it extends to about -0.335 .. 1.402).
    """
    xywh = _default_boxes_xywh(spec)
    if order == "xywh":
        return xywh
    if order == "ltrb":
        return xywh_to_ltrb(xywh)
    raise ValueError(f"order must be 'xywh' or 'ltrb', got {order!r}")


def xywh_to_ltrb(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) centre-size boxes to corner form, same dtype."""
    half = boxes[..., 2:] / 2
    return np.concatenate([boxes[..., :2] - half, boxes[..., :2] + half], axis=-1)


def ltrb_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """(..., 4) corner boxes to centre-size form, same dtype."""
    wh = boxes[..., 2:] - boxes[..., :2]
    return np.concatenate([boxes[..., :2] + wh / 2, wh], axis=-1)
