"""The training augmentation recipe without DALI: its ranges, and the two steps torchvision does
differently from the reference's DALI pipeline, written out so that the fallback trains on the
same distribution.

- ``sample_crop`` is DALI's ``RandomBBoxCrop`` as the recipe configures it: a minimum IoU drawn
  from the thresholds, or no crop (equally likely); crop width and height drawn independently,
  relative to the image; the crop must overlap **every** box by that IoU; boxes whose centre falls
  outside the half-open window are dropped, and at least one must remain; a failed attempt draws
  a new threshold.
  (torchvision's ``RandomIoUCrop`` accepts a crop when **any** box overlaps enough and measures the
  aspect ratio in pixels.)
- ``colour_jitter`` is DALI's ``hsv`` followed by ``brightness_contrast``: hue rotation and
  saturation scaling of the chroma in YIQ space (luma kept), no clipping in between, then
  ``brightness * (128 + contrast * (x - 128))`` rounded to uint8. (torchvision's ``ColorJitter``
  applies its steps in random order and centres contrast on the image's mean grey.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Augment:
    """Augmentation ranges (defaults: the reference's DALI pipeline)."""

    crop_thresholds: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9)
    crop_scaling: tuple[float, float] = (0.3, 1.0)
    crop_aspect_ratio: tuple[float, float] = (0.5, 2.0)
    saturation: tuple[float, float] = (0.5, 1.5)
    contrast: tuple[float, float] = (0.5, 1.5)
    brightness: tuple[float, float] = (0.875, 1.125)
    hue_degrees: tuple[float, float] = (-0.5, 0.5)
    enabled: bool = True  # False: no crop, flip or colour change


RECIPE = Augment()
NO_AUGMENT = Augment(enabled=False)


def _uniform(lo: float, hi: float, generator: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=generator, dtype=torch.float64))


def box_iou_with(crop: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one ltrb box (4,) with each of ``boxes`` (n, 4), all in the same coordinates."""
    lt = torch.maximum(crop[:2], boxes[:, :2])
    rb = torch.minimum(crop[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area_crop = (crop[2:] - crop[:2]).prod()
    area_boxes = (boxes[:, 2:] - boxes[:, :2]).prod(dim=1)
    return inter / (area_crop + area_boxes - inter)


def sample_crop(
    boxes: torch.Tensor,
    augment: Augment = RECIPE,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Draw a crop window for ``boxes`` (n >= 1, relative ltrb in [0, 1]).

    Returns (window (4,) relative ltrb, or None for "no crop"; boolean mask of the boxes kept).
    """
    if len(boxes) == 0:
        raise ValueError("sample_crop needs at least one box (the recipe skips empty images)")
    options = len(augment.crop_thresholds) + 1  # the last one is "no crop"
    while True:
        option = int(torch.randint(options, (), generator=generator))
        if option == options - 1:
            return None, torch.ones(len(boxes), dtype=torch.bool)
        min_iou = augment.crop_thresholds[option]
        w = _uniform(*augment.crop_scaling, generator)
        h = _uniform(*augment.crop_scaling, generator)
        lo, hi = augment.crop_aspect_ratio
        if not lo <= w / h <= hi:
            continue
        x0 = _uniform(0.0, 1.0 - w, generator)
        y0 = _uniform(0.0, 1.0 - h, generator)
        window = torch.tensor([x0, y0, x0 + w, y0 + h], dtype=boxes.dtype)
        if not bool((box_iou_with(window, boxes) >= min_iou).all()):
            continue
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        keep = ((centre >= window[:2]) & (centre < window[2:])).all(dim=1)
        if keep.any():
            return window, keep


def crop_boxes(boxes: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Boxes (relative ltrb of the image) clipped to ``window`` and made relative to it."""
    size = window[2:] - window[:2]
    out = (boxes - window[:2].repeat(2)) / size.repeat(2)
    return out.clamp(0.0, 1.0)


# RGB <-> YIQ (NTSC); Y is the luma that a saturation change keeps
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]], dtype=torch.float64
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def colour_jitter(
    image: torch.Tensor, hue_degrees: float, saturation: float, brightness: float, contrast: float
) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> uint8 (3, H, W): the reference's hsv + brightness_contrast."""
    angle = math.radians(hue_degrees)
    c, s = math.cos(angle) * saturation, math.sin(angle) * saturation
    chroma = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]], dtype=torch.float64)
    matrix = (_YIQ_TO_RGB @ chroma @ _RGB_TO_YIQ).to(torch.float32)
    pixels = image.to(torch.float32).reshape(3, -1)
    shifted = matrix @ pixels  # no clipping before brightness/contrast
    out = brightness * (128.0 + contrast * (shifted - 128.0))
    return out.round().clamp(0, 255).to(torch.uint8).reshape(image.shape)


def draw_colour(augment: Augment, generator: torch.Generator | None = None) -> dict[str, float]:
    """One sample's colour parameters (independent uniform draws, as in the reference)."""
    return {
        "hue_degrees": _uniform(*augment.hue_degrees, generator),
        "saturation": _uniform(*augment.saturation, generator),
        "brightness": _uniform(*augment.brightness, generator),
        "contrast": _uniform(*augment.contrast, generator),
    }
