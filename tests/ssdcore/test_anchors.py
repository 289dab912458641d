"""Golden default boxes, computed by hand from the recipe (scales/300, centres (i+0.5)/(300/step))."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ssdcore.anchors import default_boxes, ltrb_to_xywh, xywh_to_ltrb
from ssdcore.spec import SSD300

# start index of each level: 38^2*4, 19^2*6, 10^2*6, 5^2*6, 3^2*4, 1*4
LEVEL_START = [0, 5776, 7942, 8542, 8692, 8728, 8732]


def test_count_and_layout():
    boxes = default_boxes()
    assert boxes.shape == (8732, 4)
    assert boxes.dtype == np.float32
    assert SSD300.num_anchors == 8732
    assert SSD300.boxes_per_location == (4, 6, 6, 6, 4, 4)
    assert not boxes.flags.writeable


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        # level 0 (38x38, step 8): first box = small square at the first cell
        (0, (0.5 / 37.5, 0.5 / 37.5, 21 / 300, 21 / 300)),
        # level 0, second cell of the first row (column-fastest order)
        (1, (1.5 / 37.5, 0.5 / 37.5, 21 / 300, 21 / 300)),
        # level 0, first cell of the second size (large square sqrt(21*45)/300)
        (1444, (0.5 / 37.5, 0.5 / 37.5, math.sqrt(21 * 45) / 300, math.sqrt(21 * 45) / 300)),
        # level 0 last box: 1:2 tall box at the last cell, centre exactly on the edge (37.5/37.5)
        (5775, (1.0, 1.0, 0.07 / math.sqrt(2), 0.07 * math.sqrt(2))),
        # level 1 first: small square 45/300 at (0.5/18.75)
        (5776, (0.5 / 18.75, 0.5 / 18.75, 0.15, 0.15)),
        # level 1 last: 1:3 tall box of scale 0.15 at the last cell
        (7941, (18.5 / 18.75, 18.5 / 18.75, 0.15 / math.sqrt(3), 0.15 * math.sqrt(3))),
        # level 2 last: centre 9.5/9.375 = 1.0133 clamped to 1.0
        (8541, (1.0, 1.0, 0.33 / math.sqrt(3), 0.33 * math.sqrt(3))),
        # level 3 first and last
        (8542, (0.5 / 4.6875, 0.5 / 4.6875, 0.51, 0.51)),
        (8691, (4.5 / 4.6875, 4.5 / 4.6875, 0.51 / math.sqrt(3), 0.51 * math.sqrt(3))),
        # level 4 first / last
        (8692, (1 / 6, 1 / 6, 0.69, 0.69)),
        (8727, (5 / 6, 5 / 6, 0.69 / math.sqrt(2), 0.69 * math.sqrt(2))),
        # level 5: big square sqrt(261*315)/300, and 2:1 / 1:2 boxes whose long side 1.2304 -> 1.0
        (8728, (0.5, 0.5, 0.87, 0.87)),
        (8729, (0.5, 0.5, math.sqrt(261 * 315) / 300, math.sqrt(261 * 315) / 300)),
        (8730, (0.5, 0.5, 1.0, 0.87 / math.sqrt(2))),
        (8731, (0.5, 0.5, 0.87 / math.sqrt(2), 1.0)),
    ],
)
def test_golden_xywh(index, expected):
    np.testing.assert_allclose(default_boxes()[index], expected, rtol=0, atol=1e-6)


def test_clamping_counts():
    boxes = default_boxes()
    level2 = boxes[LEVEL_START[2] : LEVEL_START[3]]
    # 10x10 grid, 6 sizes: last row or last column centre clamped -> 19 cells x 6 sizes x ... as
    # the spec says: 120 values of 1.0 (cx of column 9 and cy of row 9: 10 each per size, 6 sizes)
    assert int((level2[:, :2] == 1.0).sum()) == 120
    assert boxes.max() == 1.0 and boxes.min() > 0


def test_ltrb_range_is_not_clipped():
    ltrb = default_boxes(order="ltrb")
    assert ltrb.min() == pytest.approx(-0.335, abs=1e-3)
    assert ltrb.max() == pytest.approx(1.402, abs=1e-3)
    np.testing.assert_allclose(ltrb_to_xywh(ltrb), default_boxes(), atol=1e-6)
    np.testing.assert_allclose(xywh_to_ltrb(default_boxes()), ltrb)


def test_bad_order():
    with pytest.raises(ValueError):
        default_boxes(order="cxcy")
