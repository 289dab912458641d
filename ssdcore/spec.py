"""The SSD300 v1.1 specification: one source of truth for geometry and preprocessing.

Everything that must agree between training, export and serving lives here: the input size, the
normalisation, the default-box recipe, the box-coding scales, the class count and the names of the
tensors in the exported model. numpy-only so the gateway can import it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SSD300Spec:
    """Geometry of SSD300 with a ResNet backbone (the NVIDIA v1.1 recipe).

    Default boxes per level: two squares (scale k and sqrt(scale k * scale k+1)) plus two boxes per
    aspect ratio (wide, tall). All sizes are relative to the 300x300 input.
    """

    image_size: int = 300
    feature_maps: tuple[int, ...] = (38, 19, 10, 5, 3, 1)
    steps: tuple[int, ...] = (8, 16, 32, 64, 100, 300)
    scales: tuple[int, ...] = (21, 45, 99, 153, 207, 261, 315)
    aspect_ratios: tuple[tuple[int, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    scale_xy: float = 0.1
    scale_wh: float = 0.2
    num_classes: int = (
        81  # outputs per anchor: 0 is background, 1..N a dataset's classes (COCO: 80)
    )
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet, RGB, on [0, 1] pixels
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    match_iou: float = 0.5  # an anchor is positive when its IoU with a ground-truth box is > this
    neg_pos_ratio: int = 3  # hard-negative mining keeps 3 negatives per positive

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Anchors per feature-map cell: 2 squares + 2 per aspect ratio -> (4, 6, 6, 6, 4, 4)."""
        return tuple(2 + 2 * len(r) for r in self.aspect_ratios)

    @property
    def num_anchors(self) -> int:
        """8732 for the default spec."""
        return sum(f * f * n for f, n in zip(self.feature_maps, self.boxes_per_location))


@dataclass(frozen=True)
class Postprocess:
    """The reference evaluation decode: per class score > 0.05, top 200, NMS 0.5, then top 200."""

    score_threshold: float = 0.05
    iou_threshold: float = 0.5
    topk_per_class: int = 200
    max_detections: int = 200


@dataclass(frozen=True)
class TensorNames:
    """Names of the tensors of the served model (the training/serving contract)."""

    images: str = "images"  # UINT8 [N, 300, 300, 3] RGB
    boxes: str = "boxes"  # FP32 [N, K, 4] normalised x1, y1, x2, y2
    scores: str = "scores"  # FP32 [N, K]
    classes: str = "classes"  # INT32 [N, K], contiguous labels 1..N
    raw_locs: str = "locs"  # FP32 [N, 4, 8732] (raw export only)
    raw_logits: str = "logits"  # FP32 [N, N_classes + 1, 8732] (raw export only)


SSD300 = SSD300Spec()


def spec_for(num_classes: int) -> SSD300Spec:
    """The SSD300 spec with ``num_classes`` outputs per anchor (classes + background)."""
    if num_classes < 2:
        raise ValueError(
            f"a detector needs at least one class besides the background, got {num_classes}"
        )
    return SSD300 if num_classes == SSD300.num_classes else replace(SSD300, num_classes=num_classes)


REFERENCE_POSTPROCESS = Postprocess()
TENSOR_NAMES = TensorNames()
