"""The served graph: uint8 images in, top-K (box, score, class) candidates out.

Everything that turns pixels into candidates happens inside the exported graph (docs/design.md), so the
wire carries 300*300*3 bytes in and K*24 bytes out per image instead of 3 MB of raw outputs:

    images uint8 [N, 300, 300, 3] RGB -> /255, ImageNet mean/std -> SSD300 -> box decoding with the
    default boxes -> softmax -> background dropped -> top-K over (anchor, class) pairs
    -> boxes fp32 [N, K, 4] (normalised x1, y1, x2, y2), scores fp32 [N, K], classes int32 [N, K]

The gateway applies score threshold, top-k per class, class-wise NMS and the cap with
``ssdcore.postprocess.postprocess`` on these candidates.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ssdcore.anchors import default_boxes
from training.model import SSD300


class ServedSSD(nn.Module):
    """Wraps a trained SSD300 with preprocessing, decoding and top-K (or raw outputs)."""

    def __init__(self, model: SSD300, topk: int = 2000, raw: bool = False) -> None:
        super().__init__()
        spec = model.spec
        self.model = model
        self.topk = topk
        self.raw = raw
        self.num_fg = spec.num_classes - 1
        self.scale_xy = spec.scale_xy
        self.scale_wh = spec.scale_wh
        anchors = torch.from_numpy(np.array(default_boxes(spec, "xywh")))
        self.register_buffer("anchors", anchors.unsqueeze(0), persistent=False)  # (1, A, 4)
        mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W)."""
        x = images.permute(0, 3, 1, 2).float()
        return (x - self.mean) / self.std

    def decode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images -> boxes (N, A, 4) normalised xyxy and class probabilities (N, C, A)."""
        locs, logits = self.model(self.preprocess(images))
        locs = locs.permute(0, 2, 1)  # (N, A, 4)
        a_xy, a_wh = self.anchors[..., :2], self.anchors[..., 2:]
        xy = self.scale_xy * locs[..., :2] * a_wh + a_xy
        wh = torch.exp(self.scale_wh * locs[..., 2:]) * a_wh
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=-1)  # (N, A, 4)
        return boxes, torch.softmax(logits, dim=1)

    def forward(self, images: torch.Tensor):
        if self.raw:
            return self.model(self.preprocess(images))
        boxes, probs = self.decode(images)
        probs = probs[:, 1:, :]  # (N, C-1, A), background dropped
        flat = probs.permute(0, 2, 1).reshape(probs.shape[0], -1)  # (N, A*(C-1)), anchor-major
        scores, index = torch.topk(flat, self.topk, dim=1)
        anchor = torch.div(index, self.num_fg, rounding_mode="floor")
        classes = (index - anchor * self.num_fg + 1).to(torch.int32)
        picked = torch.gather(boxes, 1, anchor.unsqueeze(-1).expand(-1, -1, 4))
        return picked, scores, classes


def candidates_above(
    boxes: torch.Tensor, probs: torch.Tensor, score_threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every (anchor, class) pair of one image scoring above the threshold, anchor-major.

    boxes (A, 4), probs (C, A) with the background at 0 -> boxes (n, 4), scores (n,), classes
    (n,) 1..C-1. The reference decode looks at exactly these pairs (per class, scores above the
    threshold), so the postprocess on them gives its detections; a trained model has a few
    hundred of them, where a top-K over all A x (C-1) pairs sorts 700,000 values.
    """
    fg = probs[1:].t()  # (A, C-1)
    anchor, cls = torch.nonzero(fg > score_threshold, as_tuple=True)
    return boxes[anchor], fg[anchor, cls], (cls + 1).to(torch.int32)
