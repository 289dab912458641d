"""Box decoding and the detection postprocess shared by evaluation and serving (numpy only).

Shaped like torchvision's ``postprocess_detections``: decode -> per-class score threshold -> top-k
per class -> class-wise greedy NMS -> overall cap, with named parameters. It gives the same
detections as the reference's per-class Python loop (score > threshold strictly, top-k per class,
greedy NMS dropping boxes whose IoU with a kept box is >= the threshold, top-N overall) but runs all
classes at once: overlapping same-class pairs are found with a sweep along x, their exact IoUs are
computed in one vectorised step, and the greedy pass walks the score ranks for every class at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from ssdcore.spec import REFERENCE_POSTPROCESS, SSD300, Postprocess, SSD300Spec


@dataclass(frozen=True)
class Detections:
    """Detections of one image, sorted by descending score.

    boxes: (n, 4) float32 x1, y1, x2, y2 (normalised unless scaled); scores: (n,) float32;
    classes: (n,) int32 contiguous labels 1..N.
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
    with np.errstate(over="ignore"):  # huge offsets give infinite boxes, dropped before NMS
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
    # anchors with any class above the threshold first: cheap, and few for a trained model
    anchors = np.flatnonzero(fg.max(axis=1) > score_threshold)
    sub = fg[anchors]
    rows, class_idx = np.nonzero(sub > score_threshold)
    anchor_idx = anchors[rows]
    return boxes[anchor_idx], sub[rows, class_idx], (class_idx + 1).astype(np.int32)


def _iou_of_pairs(
    cols: tuple[np.ndarray, ...], area: np.ndarray, i: np.ndarray, j: np.ndarray
) -> np.ndarray:
    """IoU of box pairs (i[k], j[k]) from per-coordinate columns: (P,) float32.

    Same formula and float32 precision as the reference (negative overlaps clipped to 0).
    """
    x1, y1, x2, y2 = cols
    iw = np.minimum(x2[i], x2[j])
    iw -= np.maximum(x1[i], x1[j])
    ih = np.minimum(y2[i], y2[j])
    ih -= np.maximum(y1[i], y1[j])
    np.clip(iw, 0, None, out=iw)
    np.clip(ih, 0, None, out=ih)
    inter = np.multiply(iw, ih, out=iw)
    union = area[j] + area[i]
    union -= inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.divide(inter, union, out=inter)


def _candidate_pairs(
    x1: np.ndarray, x2: np.ndarray, group: np.ndarray, iou_threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs of boxes of the same group that can reach ``iou_threshold``.

    IoU >= t needs an x-overlap of at least t * width of each box, so a box q can only reach t
    with the box p starting before it if it starts before x2_p - t * w_p. Sweep along x: sort by
    (group, x1); the partners of p are then a contiguous run after it. The bound is relaxed a
    little so that float rounding can never drop a true pair; exact IoUs are computed for all.
    """
    x1 = x1.astype(np.float64)
    x2 = x2.astype(np.float64)
    lo = x1.min()
    span = 2.0 ** np.ceil(np.log2(max(x2.max(), x1.max()) - lo + 2.0))
    offset = group * span  # keeps groups apart on one sorted axis
    key_start = x1 - lo + offset
    by_x = np.argsort(key_start, kind="stable")
    sorted_start = key_start[by_x]
    reach = x2 - (iou_threshold * (1 - 1e-4)) * (x2 - x1)
    key_end = (reach - lo + offset)[by_x] + 1e-9 * span
    first = np.arange(1, by_x.size + 1)
    counts = np.maximum(np.searchsorted(sorted_start, key_end, side="left") - first, 0)
    p = np.repeat(np.arange(by_x.size), counts)
    q = np.arange(p.size) + np.repeat(first - (np.cumsum(counts) - counts), counts)
    return by_x[p], by_x[q]


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
    >= ``iou_threshold``. Candidates with non-finite or empty boxes are discarded up front.
    ``iou_threshold`` must be in (0, 1]: then only boxes that overlap can suppress each other,
    which is what lets the pair search skip disjoint boxes.
    """
    if not 0.0 < iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    proper = (
        np.isfinite(boxes).all(axis=1) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    )
    idx = np.flatnonzero(proper & np.isfinite(scores))
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    boxes, scores, classes = boxes[idx], scores[idx], classes[idx]
    n = scores.shape[0]
    # group by class, best first inside a group (stable: ties keep input order)
    order = np.lexsort((-scores, classes))
    cls_sorted = classes[order]
    starts = np.flatnonzero(np.r_[True, cls_sorted[1:] != cls_sorted[:-1]])
    counts = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, counts)
    group = np.repeat(np.arange(counts.size), counts)
    if topk_per_class is not None:
        within = rank < topk_per_class
        order, rank, group = order[within], rank[within], group[within]
    cols = tuple(np.ascontiguousarray(boxes[order, k]) for k in range(4))
    area = (cols[2] - cols[0]) * (cols[3] - cols[1])

    # suppression edges: (stronger, weaker) pairs of a class with IoU >= threshold
    i, j = _candidate_pairs(cols[0], cols[2], group, iou_threshold)
    hit = ~(_iou_of_pairs(cols, area, i, j) < np.float32(iou_threshold))
    i, j = i[hit], j[hit]
    strong = np.where(rank[i] < rank[j], i, j)
    weak = np.where(rank[i] < rank[j], j, i)

    # greedy pass in rank order, all classes at once: a box suppresses only if still alive
    alive = np.ones(order.size, dtype=bool)
    by_rank = np.argsort(rank[strong], kind="stable")
    strong, weak = strong[by_rank], weak[by_rank]
    edge_rank = rank[strong]
    bounds = np.flatnonzero(np.r_[True, edge_rank[1:] != edge_rank[:-1], True])
    for lo, hi in itertools.pairwise(bounds):
        s, w = strong[lo:hi], weak[lo:hi]
        alive[w[alive[s]]] = False
    kept = idx[order[alive]]
    return kept[np.argsort(-scores[order[alive]], kind="stable")]


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
    """The reference evaluation decode for one image: boxes (A, 4) ltrb, probs (A, C) softmaxed."""
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
