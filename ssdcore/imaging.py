"""The pixels the model sees: one definition for the gateway's decoder and INT8 calibration.

An opened image -> EXIF orientation applied (the oriented size reported), every mode made RGB
deterministically (alpha over white, 16-bit and float scaled), JPEGs decoded with DCT scaling
(``draft``) to the smallest size that still covers the input, then a bilinear resize to
size x size uint8. Untrusted-input checks (formats, sizes, bombs) are the caller's
(``service.imaging``). Needs Pillow, which both the gateway and training have.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageOps

from ssdcore.tiling import TilePlan

BACKGROUND = (255, 255, 255)  # where transparent pixels are composited
_ORIENTATION_TAG = 0x0112


def sniffed_format(data: bytes) -> str | None:
    """``JPEG``, ``PNG`` or ``WEBP`` from the magic bytes (never a name or a declared type),
    else None. Pillow names a JPEG holding several pictures (a phone's MPO) ``MPO``: it is a
    JPEG here, opened as one (``Image.open(..., formats=[...])``) and decoded as one."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def model_input(
    img: Image.Image, jpeg: bool, size: int, dct_scaling: bool = True
) -> tuple[np.ndarray, int, int]:
    """An opened (not yet loaded) image -> (pixels (size, size, 3) uint8 RGB, width, height of
    the displayed, EXIF-oriented image). Decoding errors propagate (OSError, ValueError, ...)."""
    rgb, width, height = _oriented_rgb(img, (size, size) if jpeg and dct_scaling else None)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8)), width, height


def tiled_inputs(
    img: Image.Image,
    jpeg: bool,
    size: int,
    plan_for: Callable[[int, int], TilePlan],
    dct_scaling: bool = True,
) -> tuple[list[np.ndarray], int, int, TilePlan]:
    """An opened (not yet loaded) image -> the model's input for each tile of
    ``plan_for(width, height)`` (made on the displayed image's size), then the whole image's
    where the plan asks for it; with the displayed width, height and the plan. A JPEG is
    decoded at the smallest DCT scale that keeps every tile at least ``size`` pixels."""
    stored_w, stored_h = img.size
    turned = img.getexif().get(_ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    width, height = (stored_h, stored_w) if turned else (stored_w, stored_h)
    plan = plan_for(width, height)
    if plan.trivial:
        pixels, width, height = model_input(img, jpeg, size, dct_scaling)
        return [pixels], width, height, plan
    smallest = min(min(t.width, t.height) for t in plan.tiles)
    factor = min(1.0, size / smallest)
    draft = None
    if jpeg and dct_scaling and factor < 1.0:
        draft = (math.ceil(stored_w * factor), math.ceil(stored_h * factor))
    rgb, width, height = _oriented_rgb(img, draft)
    if (width, height) != (plan.width, plan.height):  # an EXIF block that could not be applied
        plan = plan_for(width, height)
    return list(tile_inputs(rgb, plan, size)), width, height, plan


def tile_inputs(rgb: Image.Image, plan: TilePlan, size: int) -> np.ndarray:
    """An RGB picture of the planned image (at its size or scaled down) -> (runs, size, size, 3)
    uint8: each tile resized (bilinear) to the model's input, then the whole picture where the
    plan runs it."""
    sx, sy = rgb.width / plan.width, rgb.height / plan.height  # the decoded picture's scale
    out = [
        rgb.resize(
            (size, size),
            Image.Resampling.BILINEAR,
            box=(t.x0 * sx, t.y0 * sy, t.x1 * sx, t.y1 * sy),
        )
        for t in plan.tiles
    ]
    if plan.whole:
        out.append(rgb.resize((size, size), Image.Resampling.BILINEAR))
    return np.stack([np.asarray(tile, dtype=np.uint8) for tile in out])


def _oriented_rgb(img: Image.Image, draft: tuple[int, int] | None) -> tuple[Image.Image, int, int]:
    """Loads an opened image (a JPEG at the DCT scale that still covers ``draft``, where
    given), EXIF orientation applied, as RGB; with the displayed width and height (of the
    full-size image, whatever the DCT scale)."""
    width, height = img.size
    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    if draft is not None:
        img.draft("RGB", draft)  # DCT scaling: decode at 1/2, 1/4 or 1/8
    img.load()
    if orientation in (2, 3, 4, 5, 6, 7, 8):  # else exif_transpose only copies (~1.3 ms)
        try:
            img = ImageOps.exif_transpose(img)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
        except (OSError, ValueError, TypeError, KeyError):
            pass  # a broken EXIF block: keep the stored orientation
    return to_rgb(img), int(width), int(height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, deterministically (alpha over a fixed background, 16-bit scaled)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(img, dtype=np.uint32) if mode != "I" else np.asarray(img)
        grey = (np.clip(values, 0, 65535).astype(np.uint32) * 255 + 32767) // 65535
        return Image.fromarray(grey.astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float32))
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(values)
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
