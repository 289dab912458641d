"""Image decoding: the hot path and the attack surface (reliability spec §1).

Bytes are sniffed (never the file name or the part's Content-Type); only JPEG, PNG and WebP are
opened; the size in the header is checked against the caps before any pixel is decoded; Pillow's
decompression-bomb warning is an error; ``load()`` runs inside the same guard (``open`` is lazy);
EXIF orientation is applied and the oriented size reported; every mode becomes RGB
deterministically. JPEGs are decoded with DCT scaling (``draft``) straight to the smallest size
that still covers the 300x300 input, which is most of the cost saving on large photos.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from service.errors import ApiError
from ssdcore.spec import SSD300

# Pillow registers plugins lazily; ours are these three, nothing else is ever opened.
ALLOWED = ("JPEG", "PNG", "WEBP")
BACKGROUND = (255, 255, 255)  # where transparent pixels are composited
_ORIENTATION_TAG = 0x0112

# Recognised but refused formats, for a clear message (checked after the allowed ones).
_REFUSED_MAGIC: tuple[tuple[bytes, int, str], ...] = (
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"BM", 0, "BMP"),
    (b"%PDF", 0, "PDF"),
    (b"%!PS", 0, "EPS"),
    (b"\xc5\xd0\xd3\xc6", 0, "EPS"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 50_000_000
    max_side: int = 16_384


@dataclass(frozen=True)
class DecodedImage:
    """pixels: (300, 300, 3) uint8 RGB; width/height: of the displayed (EXIF-oriented) image."""

    pixels: np.ndarray
    width: int
    height: int


def sniff(data: bytes) -> str:
    """The format of ``data`` from its magic bytes; raises ApiError for anything not allowed."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, offset, name in _REFUSED_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            raise ApiError(
                400,
                "unsupported_format",
                f"{name} images are not supported; send JPEG, PNG or WebP",
            )
    head = data[:256].lstrip().lower()
    if head.startswith((b"<?xml", b"<svg")) or b"<svg" in head:
        raise ApiError(
            400, "unsupported_format", "SVG images are not supported; send JPEG, PNG or WebP"
        )
    raise ApiError(400, "invalid_image", "the data is not a JPEG, PNG or WebP image")


def _too_large(message: str) -> ApiError:
    return ApiError(400, "image_too_large", message)


def _check_size(width: int, height: int, limits: ImageLimits) -> None:
    if width <= 0 or height <= 0:
        raise ApiError(400, "invalid_image", "the image has no pixels")
    if max(width, height) > limits.max_side:
        raise _too_large(
            f"image is {width}x{height}; the longest side may be at most {limits.max_side}"
        )
    if width * height > limits.max_pixels:
        raise _too_large(
            f"image is {width}x{height}; at most {limits.max_pixels} pixels are accepted"
        )


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


def decode_image(
    data: bytes, limits: ImageLimits, size: int = SSD300.image_size, dct_scaling: bool = True
) -> DecodedImage:
    """Untrusted bytes -> the model's input (size x size RGB uint8) and the displayed size.

    ``dct_scaling``: decode JPEGs at a reduced scale (1/2 .. 1/8) that still covers ``size``.
    """
    if not data:
        raise ApiError(400, "empty_file", "the image is empty")
    fmt = sniff(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            _check_size(width, height, limits)
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            if fmt == "JPEG" and dct_scaling:
                img.draft("RGB", (size, size))  # DCT scaling: decode at 1/2, 1/4 or 1/8
            img.load()
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(f"image rejected as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as exc:
            raise ApiError(
                400, "invalid_image", f"the {fmt} image could not be decoded: {exc}"
            ) from None
        if orientation in (2, 3, 4, 5, 6, 7, 8):  # else exif_transpose only copies (~1.3 ms)
            try:
                img = ImageOps.exif_transpose(img)
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
            except (OSError, ValueError, TypeError, KeyError):
                pass  # a broken EXIF block: keep the stored orientation
        rgb = to_rgb(img)
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.uint8)
    return DecodedImage(np.ascontiguousarray(pixels), int(width), int(height))
