"""Encoding ground truth onto anchors and decoding it back."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from ssdcore.postprocess import decode_boxes
from training.box_coding import BoxEncoder

ENC = BoxEncoder()


def boxes_strategy():
    coord = st.floats(0.0, 1.0, allow_nan=False)
    return st.lists(st.tuples(coord, coord, coord, coord), min_size=1, max_size=6).map(
        lambda rows: torch.tensor(
            [[min(a, c), min(b, d), max(a, c) + 0.02, max(b, d) + 0.02] for a, b, c, d in rows]
        ).clamp(0, 1)
    )


@settings(max_examples=40, deadline=None)
@given(gt=boxes_strategy())
def test_encode_decode_round_trip(gt):
    labels = torch.arange(1, gt.shape[0] + 1)
    boxes, out_labels = ENC.encode(gt, labels)
    assert boxes.shape == (8732, 4) and out_labels.shape == (8732,)
    positive = out_labels > 0
    # every ground-truth box forces at least one anchor (unless a later box stole it)
    assert positive.any()
    offsets = ENC.offsets(boxes)  # (A, 4) what the network should predict
    decoded = decode_boxes(offsets.t().unsqueeze(0).numpy(), ENC.anchors_xywh.numpy())[0]
    matched_gt = gt[out_labels[positive] - 1]
    np.testing.assert_allclose(decoded[positive.numpy()], matched_gt.numpy(), atol=2e-5)
    # background anchors keep their own anchor box: zero offsets
    assert torch.allclose(offsets[~positive], torch.zeros(1), atol=1e-5)


def test_positive_rule_is_strict_and_forced():
    anchors = ENC.anchors_ltrb
    # a ground-truth box equal to anchor 100 -> anchor 100 matched with IoU 1
    gt = anchors[100:101].clamp(0, 1)
    _, labels = ENC.encode(gt, torch.tensor([5]))
    ious = box_iou(gt, anchors)[0]
    assert labels[100] == 5
    np.testing.assert_array_equal(
        (labels > 0).numpy(), ((ious > 0.5) | (torch.arange(8732) == ious.argmax())).numpy()
    )


def test_tiny_box_gets_forced_match():
    gt = torch.tensor([[0.500, 0.500, 0.505, 0.505]])  # IoU far below 0.5 with every anchor
    _, labels = ENC.encode(gt, torch.tensor([3]))
    assert int((labels > 0).sum()) == 1


def test_no_ground_truth():
    boxes, labels = ENC.encode(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64))
    assert labels.sum() == 0
    assert torch.equal(boxes, ENC.anchors_xywh)
