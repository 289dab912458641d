"""The SSD multibox loss: Smooth L1 on positives + cross-entropy with 3:1 hard-negative mining.

Per image: (loc loss + conf loss) / number of positives, zero for an image without positives; the
batch loss is the mean over all images (images without positives count in the denominator).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssdcore.anchors import default_boxes
from ssdcore.spec import SSD300, SSD300Spec


class MultiboxLoss(nn.Module):
    def __init__(self, spec: SSD300Spec = SSD300) -> None:
        super().__init__()
        self.spec = spec
        anchors = torch.from_numpy(np.array(default_boxes(spec, "xywh"))).t().unsqueeze(0)
        self.register_buffer("anchors", anchors, persistent=False)  # (1, 4, A) xywh

    def target_offsets(self, gloc: torch.Tensor) -> torch.Tensor:
        """gloc (N, 4, A) xywh ground truth per anchor -> regression targets (N, 4, A)."""
        a = self.anchors
        gxy = (gloc[:, :2] - a[:, :2]) / a[:, 2:] / self.spec.scale_xy
        gwh = torch.log(gloc[:, 2:] / a[:, 2:]) / self.spec.scale_wh
        return torch.cat([gxy, gwh], dim=1)

    def forward(
        self,
        ploc: torch.Tensor,
        plogits: torch.Tensor,
        gloc: torch.Tensor,
        glabel: torch.Tensor,
    ) -> torch.Tensor:
        """ploc (N, 4, A), plogits (N, C, A), gloc (N, 4, A) xywh, glabel (N, A) int64 -> scalar."""
        ploc, plogits, gloc = ploc.float(), plogits.float(), gloc.float()
        positive = glabel > 0
        num_pos = positive.sum(dim=1)

        loc = F.smooth_l1_loss(ploc, self.target_offsets(gloc), reduction="none").sum(dim=1)
        loc = (loc * positive).sum(dim=1)

        ce = F.cross_entropy(plogits, glabel, reduction="none")  # (N, A)
        # Hard negatives: the 3 * num_pos background anchors with the highest loss.
        neg_ce = ce.detach().masked_fill(positive, 0.0)
        rank = neg_ce.argsort(dim=1, descending=True).argsort(dim=1)
        num_neg = torch.clamp(self.spec.neg_pos_ratio * num_pos, max=ce.shape[1]).unsqueeze(1)
        hard_negative = rank < num_neg
        conf = (ce * (positive | hard_negative)).sum(dim=1)

        has_pos = (num_pos > 0).float()
        per_image = (loc + conf) * has_pos / num_pos.float().clamp(min=1e-6)
        return per_image.mean()
