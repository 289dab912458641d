"""The multibox loss on small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.loss import MultiboxLoss

A = 8732
LOSS = MultiboxLoss()
ANCHORS = LOSS.anchors[0]  # (4, A) xywh


def smooth_l1(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    return np.where(ax < 1, 0.5 * x * x, ax - 0.5)


def background_image():
    gloc = ANCHORS.clone().unsqueeze(0)  # (1, 4, A): background anchors carry their own box
    glabel = torch.zeros(1, A, dtype=torch.int64)
    return gloc, glabel


def test_two_positives_uniform_logits():
    gloc, glabel = background_image()
    glabel[0, [10, 20]] = 3
    # ground truth of anchor 10: shifted by +0.01 in x and 1.2x wider
    gloc[0, :, 10] = ANCHORS[:, 10] + torch.tensor([0.01, 0.0, 0.0, 0.0])
    gloc[0, 2, 10] = ANCHORS[2, 10] * 1.2
    gloc[0, :, 20] = ANCHORS[:, 20]
    ploc = torch.zeros(1, 4, A)
    plogits = torch.zeros(1, 81, A)  # CE = log(81) everywhere
    a = ANCHORS[:, 10].numpy().astype(np.float64)
    targets = np.array([10 * 0.01 / a[2], 0.0, 5 * math.log(1.2), 0.0])
    loc = smooth_l1(targets).sum()  # anchor 20 has zero targets
    conf = (2 + 6) * math.log(81)  # two positives + 3*2 hard negatives (ties)
    expected = (loc + conf) / 2
    got = LOSS(ploc, plogits, gloc, glabel)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_hard_negative_cap_picks_the_worst_negatives():
    gloc, glabel = background_image()
    glabel[0, 0] = 1
    ploc = torch.zeros(1, 4, A)
    plogits = torch.zeros(1, 81, A)
    plogits[0, 0, :] = 10.0  # confident background everywhere
    plogits[0, 1, 0] = 10.0  # positive anchor 0: CE = log(2)
    # five negatives made wrong by different margins; only the 3 worst may count
    margins = {100: 12.0, 200: 14.0, 300: 16.0, 400: 18.0, 500: 20.0}
    for anchor, m in margins.items():
        plogits[0, 7, anchor] = m
    logits = plogits[0].double().numpy()
    lse = np.log(np.exp(logits).sum(axis=0))
    ce_background = lse - logits[0]  # CE of each anchor against the background label
    ce_positive = lse[0] - logits[1, 0]
    expected = (ce_positive + ce_background[[300, 400, 500]].sum()) / 1
    got = LOSS(ploc, plogits, gloc, glabel)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_image_without_positives_counts_zero_in_the_mean():
    gloc, glabel = background_image()
    glabel_pos = glabel.clone()
    glabel_pos[0, 5] = 2
    ploc = torch.zeros(2, 4, A)
    plogits = torch.zeros(2, 81, A)
    both = LOSS(ploc, plogits, torch.cat([gloc, gloc]), torch.cat([glabel_pos, glabel]))
    single = LOSS(ploc[:1], plogits[:1], gloc, glabel_pos)
    assert both.item() == pytest.approx(single.item() / 2, rel=1e-6)
    assert LOSS(ploc[:1], plogits[:1], gloc, glabel).item() == 0.0


def test_gradients_flow():
    gloc, glabel = background_image()
    glabel[0, 42] = 9
    ploc = torch.zeros(1, 4, A, requires_grad=True)
    plogits = torch.zeros(1, 81, A, requires_grad=True)
    LOSS(ploc, plogits, gloc, glabel).backward()
    assert plogits.grad[0, :, 42].abs().sum() > 0
    assert plogits.grad.ne(0).any(dim=1).sum() == 4  # 1 positive + 3 hard negatives
