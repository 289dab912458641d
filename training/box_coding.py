"""Ground-truth box encoding for training (torch), the python twin of DALI's BoxEncoder.

encode(): every anchor gets the ground-truth box it matches best when IoU > 0.5 (strictly), and
each ground-truth box forces its own best anchor; other anchors are background and keep their own
anchor box as target. Targets are centre-size boxes (x, y, w, h); offsets are formed in the loss.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou

from ssdcore.anchors import default_boxes
from ssdcore.spec import SSD300, SSD300Spec


class BoxEncoder:
    def __init__(self, spec: SSD300Spec = SSD300) -> None:
        self.spec = spec
        self.anchors_ltrb = torch.from_numpy(np.array(default_boxes(spec, "ltrb")))
        self.anchors_xywh = torch.from_numpy(np.array(default_boxes(spec, "xywh")))

    def encode(
        self, gt_ltrb: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """gt_ltrb (G, 4) in [0, 1], labels (G,) -> boxes (A, 4) xywh float32, labels (A,) int64."""
        num_anchors = self.anchors_ltrb.shape[0]
        if gt_ltrb.numel() == 0:
            return self.anchors_xywh.clone(), torch.zeros(num_anchors, dtype=torch.int64)
        gt_ltrb = gt_ltrb.float()
        ious = box_iou(gt_ltrb, self.anchors_ltrb)  # (G, A)
        best_iou, best_gt = ious.max(dim=0)  # per anchor
        best_anchor = ious.argmax(dim=1)  # per ground truth (lowest index on ties)
        # Forced matches; a later ground truth wins when two pick the same anchor.
        for g in range(gt_ltrb.shape[0]):
            best_iou[best_anchor[g]] = 2.0
            best_gt[best_anchor[g]] = g
        positive = best_iou > self.spec.match_iou
        out_labels = torch.zeros(num_anchors, dtype=torch.int64)
        out_labels[positive] = labels.long()[best_gt[positive]]
        out_ltrb = self.anchors_ltrb.clone()
        out_ltrb[positive] = gt_ltrb[best_gt[positive]]
        return ltrb_to_xywh(out_ltrb), out_labels

    def offsets(self, boxes_xywh: torch.Tensor) -> torch.Tensor:
        """(..., A, 4) xywh boxes -> the regression targets the network predicts (same shape)."""
        a = self.anchors_xywh.to(boxes_xywh.device)
        xy = (boxes_xywh[..., :2] - a[:, :2]) / a[:, 2:] / self.spec.scale_xy
        wh = torch.log(boxes_xywh[..., 2:] / a[:, 2:]) / self.spec.scale_wh
        return torch.cat([xy, wh], dim=-1)


def ltrb_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    wh = boxes[..., 2:] - boxes[..., :2]
    return torch.cat([boxes[..., :2] + wh / 2, wh], dim=-1)
