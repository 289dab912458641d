"""A slow, obvious per-class implementation of the reference evaluation decode (test oracle).

Written from the specification, loop by loop: for each class 1..C-1 keep scores > 0.05 (strict),
the 200 best, then greedy NMS: take the best remaining box, drop every remaining box whose IoU
with it is not < 0.5, repeat. Concatenate all classes and keep the 200 best overall.
"""

from __future__ import annotations

import torch


def _iou_one_vs_many(box: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    lt = torch.max(others[:, :2], box[:2])
    rb = torch.min(others[:, 2:], box[2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    area_others = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / (area_others + area_box - inter)


def reference_decode_single(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    score_threshold: float = 0.05,
    iou_threshold: float = 0.5,
    topk_per_class: int = 200,
    max_detections: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """boxes (A, 4) ltrb float32, probs (A, C) -> boxes, scores, labels by descending score."""
    out_boxes, out_scores, out_labels = [], [], []
    for c in range(1, probs.shape[1]):
        scores = probs[:, c]
        keep = scores > score_threshold
        cls_boxes, cls_scores = boxes[keep], scores[keep]
        if cls_scores.numel() == 0:
            continue
        order = torch.argsort(cls_scores, descending=True, stable=True)[:topk_per_class]
        remaining = order.tolist()
        while remaining:
            best = remaining[0]
            out_boxes.append(cls_boxes[best])
            out_scores.append(cls_scores[best])
            out_labels.append(c)
            rest = remaining[1:]
            if not rest:
                break
            ious = _iou_one_vs_many(cls_boxes[best], cls_boxes[rest])
            remaining = [r for r, iou in zip(rest, ious.tolist()) if iou < iou_threshold]
    if not out_scores:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)
    b = torch.stack(out_boxes)
    s = torch.stack(out_scores)
    lab = torch.tensor(out_labels)
    top = torch.argsort(s, descending=True, stable=True)[:max_detections]
    return b[top], s[top], lab[top]
