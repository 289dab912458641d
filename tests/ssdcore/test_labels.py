from __future__ import annotations

import json

import numpy as np
import pytest

from ssdcore.labels import COCO, COCO_IDS, ClassList


def test_coco_is_a_class_list_with_gapped_ids():
    assert len(COCO) == 80 and COCO.num_classes == 81
    assert COCO.category_ids(np.array([1, 80, 12])).tolist() == [1, 90, 13]  # 12 is unused
    assert set(range(1, 91)) - set(COCO_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    assert COCO.name(1) == "person" and COCO.name(80) == "toothbrush"
    assert COCO.labels_txt().splitlines()[:2] == ["background", "person"]
    assert len(COCO.labels_txt().splitlines()) == 81  # no trailing blank class


def test_labels_follow_file_order():
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}]
    classes = ClassList.from_categories(cats)
    assert classes.label_map() == {90: 1, 1: 2}
    assert classes.category_ids(np.array([2, 1])).tolist() == [1, 90]


def test_json_round_trip_keeps_order_accents_and_ids():
    own = ClassList((7, 3, 12), ("Zebra crossing", "Café table", "car"))
    doc = json.loads(json.dumps(own.to_json()))
    assert ClassList.from_json(doc) == own
    assert own.public() == [
        {"id": 7, "name": "Zebra crossing"},
        {"id": 3, "name": "Café table"},
        {"id": 12, "name": "car"},
    ]
    # labels must be 1..N in order: a shuffled file is refused, not silently re-ordered
    doc["classes"].reverse()
    with pytest.raises(ValueError, match="labels must be"):
        ClassList.from_json(doc)


@pytest.mark.parametrize(
    "ids, names, message",
    [
        ((1, 1), ("a", "b"), "two categories have the id 1"),
        ((1, 2), ("a", "a"), "two categories have the name 'a'"),
        ((1,), ("",), "has no name"),
        ((1,), ("a\nb",), "control characters"),
        (("1",), ("a",), "not an integer"),
        ((), (), "at least one class"),
        ((10**30,), ("a",), "outside 0..2147483647"),
        ((-1,), ("a",), "outside"),
        ((1,), ("ca\u202et",), "bidirectional controls"),
        (tuple(range(70_000)), tuple(map(str, range(70_000))), "at most 65536"),
    ],
)
def test_bad_lists_are_refused(ids, names, message):
    with pytest.raises(ValueError, match=message):
        ClassList(ids, names)


def test_class_filter_by_name_or_id():
    assert COCO.resolve_filter(["person", "90", " Dog "]) == {1, 80, 17}
    with pytest.raises(ValueError, match="unknown category id '12'"):
        COCO.resolve_filter(["12"])
    with pytest.raises(ValueError, match="unknown class name 'unicorn'"):
        COCO.resolve_filter(["unicorn"])
    own = ClassList((7, 3, 12), ("Zebra crossing", "Café table", "car"))
    assert own.resolve_filter(["CAFÉ TABLE", "7"]) == {2, 1}
    with pytest.raises(ValueError, match="unknown class name 'person'"):
        own.resolve_filter(["person"])  # COCO's names mean nothing to this model
    # a name made of digits is found by name when no category has that id
    digits = ClassList((5, 6), ("10", "2"))
    assert digits.resolve_filter(["10", "6"]) == {1, 2}


def test_case_only_duplicates_need_the_exact_name():
    two = ClassList((1, 2), ("Car", "car"))
    assert two.resolve_filter(["Car"]) == {1} and two.resolve_filter(["car"]) == {2}
    with pytest.raises(ValueError):
        two.resolve_filter(["CAR"])


def test_filter_edge_cases():
    with pytest.raises(ValueError, match="no class name or id given"):
        COCO.resolve_filter(["", " "])
    with pytest.raises(ValueError, match="unknown class name '²'"):  # a digit, but not ASCII
        COCO.resolve_filter(["²"])
