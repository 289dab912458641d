from __future__ import annotations

import pytest

from ssdcore.labels import (
    COCO_IDS,
    COCO_NAMES,
    CONTIGUOUS_TO_COCO,
    LABEL_NAMES,
    label_map_from_categories,
    resolve_class_filter,
)


def test_id_map():
    assert len(COCO_IDS) == 80
    assert CONTIGUOUS_TO_COCO[1] == 1 and CONTIGUOUS_TO_COCO[80] == 90
    assert CONTIGUOUS_TO_COCO[12] == 13  # stop sign: id 12 is unused in COCO
    assert set(range(1, 91)) - set(COCO_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert LABEL_NAMES[1] == "person" and LABEL_NAMES[80] == "toothbrush"
    assert COCO_NAMES[CONTIGUOUS_TO_COCO.tolist().index(90) - 1] == "toothbrush"


def test_label_map_follows_file_order():
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}]
    assert label_map_from_categories(cats) == {90: 1, 1: 2}


def test_class_filter():
    assert resolve_class_filter(["person", "90", " Dog "]) == {1, 80, 17}
    with pytest.raises(ValueError):
        resolve_class_filter(["12"])
    with pytest.raises(ValueError):
        resolve_class_filter(["unicorn"])
