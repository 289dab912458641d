"""COCO evaluation with stock pycocotools (the only module importing it)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STAT_NAMES = (
    "AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip


def coco_evaluate(
    annotation_file: Path, detections: list[dict], image_ids: list[int] | None = None
) -> tuple[dict[str, float], str]:
    """Run COCOeval (bbox) on detections ``{image_id, category_id, bbox [x,y,w,h], score}``.

    ``image_ids``: evaluate these images only (default: every image of the annotation file).
    Returns the 12 summary statistics by name and the printed 12-line summary. No detections at
    all gives zeros (pycocotools cannot load an empty result list).
    """
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    if not detections:
        return {n: 0.0 for n in STAT_NAMES}, "no detections: every statistic is 0\n"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        ev.summarize()
    stats = {n: float(v) for n, v in zip(STAT_NAMES, np.asarray(ev.stats))}
    return stats, summary.getvalue()
