"""The vectorised postprocess against the slow reference loop and torchvision's batched_nms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import batched_nms

from devtools.network_outputs import random_outputs
from devtools.reference_decode import reference_decode_single
from ssdcore.anchors import default_boxes
from ssdcore.postprocess import (
    classwise_nms,
    decode_boxes,
    postprocess,
    postprocess_dense,
    softmax,
)
from ssdcore.spec import Postprocess

ANCHORS = np.array(default_boxes())


def as_sorted_rows(boxes, scores, labels):
    rows = np.concatenate(
        [
            np.asarray(scores, np.float64)[:, None],
            np.asarray(labels, np.float64)[:, None],
            np.asarray(boxes, np.float64),
        ],
        axis=1,
    )
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("kind", ["random", "peaky", "sparse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_postprocess_equals_reference_loop(kind, seed):
    rng = np.random.default_rng(seed)
    locs, logits = random_outputs(rng, kind)
    boxes = decode_boxes(locs, ANCHORS)[0]
    probs = softmax(logits.transpose(0, 2, 1), axis=-1)[0]
    ours = postprocess_dense(boxes, probs)
    ref_boxes, ref_scores, ref_labels = reference_decode_single(
        torch.from_numpy(boxes), torch.from_numpy(probs)
    )
    assert len(ours) == ref_scores.numel() > 0
    assert np.all(np.diff(ours.scores) <= 0), "sorted by descending score"
    np.testing.assert_array_equal(
        as_sorted_rows(ours.boxes, ours.scores, ours.classes),
        as_sorted_rows(ref_boxes.numpy(), ref_scores.numpy(), ref_labels.numpy()),
    )


@pytest.mark.parametrize(
    "params", [Postprocess(0.3, 0.45, 10, 20), Postprocess(0.01, 0.7, 50, 1000)]
)
def test_other_parameters_equal_reference_loop(params):
    rng = np.random.default_rng(7)
    locs, logits = random_outputs(rng, "peaky")
    boxes = decode_boxes(locs, ANCHORS)[0]
    probs = softmax(logits.transpose(0, 2, 1), axis=-1)[0]
    ours = postprocess_dense(boxes, probs, params)
    ref = reference_decode_single(
        torch.from_numpy(boxes),
        torch.from_numpy(probs),
        params.score_threshold,
        params.iou_threshold,
        params.topk_per_class,
        params.max_detections,
    )
    np.testing.assert_array_equal(
        as_sorted_rows(ours.boxes, ours.scores, ours.classes),
        as_sorted_rows(ref[0].numpy(), ref[1].numpy(), ref[2].numpy()),
    )


def test_decode_matches_formula():
    rng = np.random.default_rng(3)
    locs = rng.normal(0, 1, (2, 4, 8732)).astype(np.float32)
    out = decode_boxes(locs, ANCHORS)
    i = 1234
    a = ANCHORS[i]
    cx = 0.1 * locs[1, 0, i] * a[2] + a[0]
    w = np.exp(0.2 * locs[1, 2, i]) * a[2]
    assert out.shape == (2, 8732, 4)
    np.testing.assert_allclose(out[1, i, [0, 2]], [cx - w / 2, cx + w / 2], rtol=1e-5)


def test_empty_and_filters():
    empty = postprocess(np.zeros((0, 4)), np.zeros(0), np.zeros(0))
    assert len(empty) == 0 and empty.boxes.shape == (0, 4)
    boxes = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [0.5, 0.5, 0.6, 0.6]], np.float32)
    scores = np.array([0.9, 0.8, 0.04], np.float32)
    classes = np.array([1, 2, 1], np.int32)
    det = postprocess(boxes, scores, classes)
    assert det.classes.tolist() == [1, 2]  # same box, other class: not suppressed; 0.04 dropped
    det = postprocess(boxes, scores, classes, allowed_classes={2})
    assert det.classes.tolist() == [2]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    num_classes=st.integers(1, 6),
    thr=st.floats(0.1, 0.9),
    seed=st.integers(0, 2**31 - 1),
)
def test_classwise_nms_agrees_with_torchvision(n, num_classes, thr, seed):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1, (n, 2))
    wh = rng.uniform(0.01, 0.5, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    scores = rng.permutation(n).astype(np.float32) / n + 0.001  # distinct scores
    classes = rng.integers(1, num_classes + 1, n).astype(np.int32)
    ours = classwise_nms(boxes, scores, classes, thr)
    theirs = batched_nms(
        torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(classes), thr
    ).numpy()
    np.testing.assert_array_equal(ours, theirs)
