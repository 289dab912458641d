"""Box decoding and the detection postprocess shared by evaluation and serving (numpy only).

Shaped like torchvision's ``postprocess_detections``: decode -> per-class score threshold -> top-k
per class -> class-wise greedy NMS -> overall cap, with named parameters. It gives the same
detections as the reference's per-class Python loop (score > threshold strictly, top-k per class,
greedy NMS dropping boxes whose IoU with a kept box is >= the threshold, top-N overall) but runs all
classes at once: candidates are grouped by class into a padded (G, M, 4) block, all pairwise IoUs are
computed in one go and the greedy pass walks M columns for every class simultaneously.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ssdcore.spec import REFERENCE_POSTPROCESS, SSD300, Postprocess, SSD300Spec


@dataclass(frozen=True)
class Detections:
    """Detections of one image, sorted by descending score.

    boxes: (n, 4) float32 x1, y1, x2, y2 (normalised unless scaled); scores: (n,) float32;
    classes: (n,) int32 contiguous labels 1..80.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def decode_boxes(
    locs: np.ndarray, anchors_xywh: np.ndarray, spec: SSD300Spec = SSD300
) -> np.ndarray:
    """Raw location offsets -> corner boxes.

    locs: (N, 4, A) network output (dx, dy, dw, dh); anchors_xywh: (A, 4).
    Returns (N, A, 4) float32 x1, y1, x2, y2 relative to the image, not clipped (like the reference).
    """
    locs = np.asarray(locs, dtype=np.float32).transpose(0, 2, 1)
    a_xy, a_wh = anchors_xywh[None, :, :2], anchors_xywh[None, :, 2:]
    xy = np.float32(spec.scale_xy) * locs[..., :2] * a_wh + a_xy
    wh = np.exp(np.float32(spec.scale_wh) * locs[..., 2:]) * a_wh
    half = wh / 2
    return np.concatenate([xy - half, xy + half], axis=-1)


def softmax(logits: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable softmax in float32."""
    z = np.asarray(logits, dtype=np.float32)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def dense_candidates(
    boxes: np.ndarray, probs: np.ndarray, score_threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (anchor, class) pairs above the threshold from dense per-anchor class probabilities.

    boxes: (A, 4); probs: (A, C) including the background column 0, which is never a candidate.
    Returns boxes (n, 4), scores (n,), classes (n,) int32 (1..C-1).
    """
    fg = probs[:, 1:]
    anchor_idx, class_idx = np.nonzero(fg > score_threshold)
    return boxes[anchor_idx], fg[anchor_idx, class_idx], (class_idx + 1).astype(np.int32)


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """IoU between all boxes of each group: (..., M, 4) -> (..., M, M), float32.

    Same formula and precision as the reference (float32, negative overlaps clipped to 0). Two
    zero-area boxes give NaN, which the NMS below treats as overlapping, like the reference.
    """
    lt = np.maximum(boxes[..., :, None, :2], boxes[..., None, :, :2])
    rb = np.minimum(boxes[..., :, None, 2:], boxes[..., None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area[..., :, None] + area[..., None, :] - inter)


def classwise_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    topk_per_class: int | None = None,
) -> np.ndarray:
    """Greedy NMS within each class; returns indices of kept candidates by descending score.

    Only the ``topk_per_class`` best candidates of each class enter NMS (None: all of them).
    A candidate is dropped when its IoU with a higher-scoring kept box of its class is
    >= ``iou_threshold`` (or not comparable, i.e. NaN).
    """
    n = scores.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # group by class, best first inside a group (stable: ties keep input order)
    order = np.lexsort((-scores, classes))
    cls_sorted = classes[order]
    starts = np.flatnonzero(np.r_[True, cls_sorted[1:] != cls_sorted[:-1]])
    counts = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, counts)
    if topk_per_class is not None:
        keep_rank = rank < topk_per_class
        order, rank = order[keep_rank], rank[keep_rank]
        counts = np.minimum(counts, topk_per_class)
    group = np.repeat(np.arange(counts.size), counts)
    width = int(counts.max())

    block = np.zeros((counts.size, width, 4), dtype=np.float32)
    block[group, rank] = boxes[order]
    valid = np.zeros((counts.size, width), dtype=bool)
    valid[group, rank] = True

    # suppresses[g, i, j]: candidate i, if kept, removes candidate j (j ranks below i)
    suppresses = ~(pairwise_iou(block) < np.float32(iou_threshold))
    suppresses &= np.triu(np.ones((width, width), dtype=bool), k=1)
    alive = valid.copy()
    for i in range(width - 1):
        hit = alive[:, i]
        if hit.any():
            alive[hit] &= ~suppresses[hit, i]
    kept = order[alive[group, rank]]
    return kept[np.argsort(-scores[kept], kind="stable")]


def postprocess(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    params: Postprocess = REFERENCE_POSTPROCESS,
    allowed_classes: set[int] | None = None,
) -> Detections:
    """Candidates of one image -> final detections.

    boxes (n, 4), scores (n,), classes (n,): e.g. the model's top-K output or ``dense_candidates``.
    Applies score > threshold, optional class filter, top-k per class, class-wise NMS and the cap.
    """
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    classes = np.asarray(classes).astype(np.int32, copy=False).reshape(-1)
    mask = scores > np.float32(params.score_threshold)
    if allowed_classes is not None:
        mask &= np.isin(classes, np.fromiter(allowed_classes, dtype=np.int32))
    boxes, scores, classes = boxes[mask], scores[mask], classes[mask]
    keep = classwise_nms(boxes, scores, classes, params.iou_threshold, params.topk_per_class)
    keep = keep[: params.max_detections]
    return Detections(boxes[keep], scores[keep], classes[keep])


def postprocess_dense(
    boxes: np.ndarray, probs: np.ndarray, params: Postprocess = REFERENCE_POSTPROCESS
) -> Detections:
    """The reference evaluation decode for one image: boxes (A, 4) ltrb, probs (A, 81) softmaxed."""
    cand = dense_candidates(boxes, probs, params.score_threshold)
    return postprocess(*cand, params=params)


def decode_raw_outputs(
    locs: np.ndarray,
    logits: np.ndarray,
    anchors_xywh: np.ndarray,
    params: Postprocess = REFERENCE_POSTPROCESS,
    spec: SSD300Spec = SSD300,
) -> list[Detections]:
    """Raw network outputs locs (N, 4, A), logits (N, C, A) -> detections per image."""
    boxes = decode_boxes(locs, anchors_xywh, spec)
    probs = softmax(np.asarray(logits).transpose(0, 2, 1), axis=-1)
    return [postprocess_dense(b, p, params) for b, p in zip(boxes, probs)]
