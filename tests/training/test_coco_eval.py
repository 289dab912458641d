"""Stock pycocotools evaluation: perfect detections give AP 1, none give 0."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.coco_eval import coco_evaluate


def gt_detections(root):
    doc = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    return doc, [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in doc["annotations"]
    ]


def test_perfect_detections(synthetic_coco):
    _, dets = gt_detections(synthetic_coco)
    stats, summary = coco_evaluate(synthetic_coco / "annotations" / "instances_val2017.json", dets)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert len([ln for ln in summary.splitlines() if "Average" in ln]) == 12


def test_no_detections(synthetic_coco):
    stats, _ = coco_evaluate(synthetic_coco / "annotations" / "instances_val2017.json", [])
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0


def test_shifted_and_wrong_class(synthetic_coco):
    doc, dets = gt_detections(synthetic_coco)
    ann = synthetic_coco / "annotations" / "instances_val2017.json"
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] * 0.6, *d["bbox"][1:]]} for d in dets]
    assert coco_evaluate(ann, shifted)[0]["AP50"] == pytest.approx(0.0)
    other = {c["id"] for c in doc["categories"]} - {d["category_id"] for d in dets}
    wrong = [{**d, "category_id": min(other)} for d in dets]
    assert coco_evaluate(ann, wrong)[0]["AP"] == pytest.approx(0.0)
    half = dets[: len(dets) // 2]
    assert 0.0 < coco_evaluate(ann, half)[0]["AR100"] < 1.0
    assert np.isfinite(coco_evaluate(ann, half)[0]["AP"])
