"""Image decoding: the hot path and the attack surface (reliability spec §1).

Bytes are sniffed (never the file name or the part's Content-Type); only JPEG, PNG and WebP are
opened; the size in the header is checked against the caps before any pixel is decoded; Pillow's
decompression-bomb warning is an error; ``load()`` runs inside the same guard (``open`` is lazy);
then ``ssdcore.imaging.model_input`` (the pixels the model sees, shared with INT8 calibration):
EXIF orientation applied and the oriented size reported, every mode made RGB deterministically,
JPEGs decoded with DCT scaling (``draft``) straight to the smallest size that still covers the
300x300 input (most of the cost saving on large photos), the bilinear resize.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image

from service.errors import ApiError
from ssdcore.imaging import model_input, sniffed_format, tiled_inputs
from ssdcore.spec import SSD300
from ssdcore.tiling import TilePlan

T = TypeVar("T")

# Pillow registers plugins lazily; ours are these three, nothing else is ever opened.
ALLOWED = ("JPEG", "PNG", "WEBP")

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
    fmt = sniffed_format(data)
    if fmt is not None:
        return fmt
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


def decode_image(
    data: bytes, limits: ImageLimits, size: int = SSD300.image_size, dct_scaling: bool = True
) -> DecodedImage:
    """Untrusted bytes -> the model's input (size x size RGB uint8) and the displayed size.

    ``dct_scaling``: decode JPEGs at a reduced scale (1/2 .. 1/8) that still covers ``size``.
    """

    def convert(img: Image.Image, fmt: str) -> DecodedImage:
        return DecodedImage(*model_input(img, fmt == "JPEG", size, dct_scaling))

    return _guarded(data, limits, convert)


@dataclass(frozen=True)
class TiledImage:
    """pixels: the model's input for each tile of ``plan`` (row by row), then the whole image
    where the plan runs it; width/height: of the displayed (EXIF-oriented) image."""

    pixels: list[np.ndarray]
    width: int
    height: int
    plan: TilePlan


def decode_tiled(
    data: bytes,
    limits: ImageLimits,
    plan_for: Callable[[int, int], TilePlan],
    size: int = SSD300.image_size,
    dct_scaling: bool = True,
) -> TiledImage:
    """Untrusted bytes -> the model's inputs for the tiles ``plan_for(width, height)`` makes
    of the displayed image (ssdcore.imaging.tiled_inputs), with the same checks as
    ``decode_image``."""

    def convert(img: Image.Image, fmt: str) -> TiledImage:
        return TiledImage(*tiled_inputs(img, fmt == "JPEG", size, plan_for, dct_scaling))

    return _guarded(data, limits, convert)


def image_size(data: bytes, limits: ImageLimits) -> tuple[int, int]:
    """The stored size of untrusted image bytes from their header alone, checked against the
    limits (nothing decoded); the same 400/413 ApiErrors as ``decode_image``."""
    return _guarded(data, limits, lambda img, fmt: img.size)


def _guarded(data: bytes, limits: ImageLimits, convert: Callable[[Image.Image, str], T]) -> T:
    """Sniffs, opens and size-checks untrusted bytes, then ``convert(image, format)``; every
    failure a 400 ApiError."""
    if not data:
        raise ApiError(400, "empty_file", "the image is empty")
    fmt = sniff(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=[fmt])
            width, height = img.size
            _check_size(width, height, limits)
            return convert(img, fmt)
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _too_large(f"image rejected as a decompression bomb: {exc}") from None
        except (OSError, SyntaxError, ValueError, EOFError, TypeError, IndexError) as exc:
            raise ApiError(
                400, "invalid_image", f"the {fmt} image could not be decoded: {exc}"
            ) from None
