"""Decoding untrusted bytes: formats, limits, modes, orientation."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from devtools.images import encode, photo, png_header_only, with_exif_orientation
from service.errors import ApiError
from service.imaging import ImageLimits, decode_image, sniff

LIMITS = ImageLimits()


def code_of(data: bytes, limits: ImageLimits = LIMITS) -> str:
    with pytest.raises(ApiError) as exc:
        decode_image(data, limits)
    return exc.value.code


def test_jpeg_png_webp_decode_to_model_input():
    arr = photo()
    for fmt in ("JPEG", "PNG", "WEBP"):
        out = decode_image(encode(arr, fmt), LIMITS)
        assert out.pixels.shape == (300, 300, 3) and out.pixels.dtype == np.uint8
        assert (out.width, out.height) == (640, 480)
        reference = np.asarray(Image.fromarray(arr).resize((300, 300), Image.Resampling.BILINEAR))
        assert np.abs(out.pixels.astype(int) - reference).mean() < 6


def test_300x300_png_is_passed_through_exactly():
    arr = photo(300, 300)
    assert np.array_equal(decode_image(encode(arr, "PNG"), LIMITS).pixels, arr)


def test_bad_bytes():
    assert code_of(b"") == "empty_file"
    assert code_of(np.random.default_rng(0).bytes(5000)) == "invalid_image"
    jpeg = encode(photo(), "JPEG")
    assert code_of(jpeg[: len(jpeg) // 2]) == "invalid_image"


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("GIF", {}),
        ("TIFF", {}),
        ("BMP", {}),
        ("PDF", {}),
        ("EPS", {}),
        ("JPEG2000", {}),
        ("ICO", {}),
    ],
)
def test_other_formats_are_refused(fmt, kw):
    img = Image.fromarray(photo(64, 48))
    data = encode(img, fmt, **kw)
    assert code_of(data) == "unsupported_format"


def test_svg_is_refused():
    assert (
        code_of(b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>')
        == "unsupported_format"
    )


def test_header_bomb_is_refused_fast_and_small():
    data = png_header_only(30000, 30000)
    t0 = time.perf_counter()
    assert code_of(data) == "image_too_large"
    assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize("size", [(1, 20000), (20000, 1)])
def test_extreme_aspect_is_refused(size):
    assert code_of(png_header_only(*size)) == "image_too_large"


def test_pillow_bomb_limits():
    over = int(Image.MAX_IMAGE_PIXELS**0.5) + 10  # just over Pillow's MAX_IMAGE_PIXELS
    big = ImageLimits(max_pixels=10**10, max_side=10**6)
    assert code_of(png_header_only(over, over), big) == "image_too_large"
    assert code_of(png_header_only(2 * over, 2 * over), big) == "image_too_large"


def test_cmyk_jpeg_colours():
    arr = photo()
    data = encode(Image.fromarray(arr).convert("CMYK"), "JPEG", quality=95)
    out = decode_image(data, LIMITS).pixels.astype(int)
    ref = np.asarray(Image.fromarray(arr).resize((300, 300), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(out - ref).mean() < 8


def test_16bit_png_uses_full_range():
    ramp = np.tile(np.linspace(0, 65535, 300).astype(np.uint16), (300, 1))
    data = encode(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, LIMITS).pixels
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out[0, :, 0].astype(int)) >= 0)
    assert abs(int(out[0, 150, 0]) - 128) <= 2  # scaled, not clipped


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P"])
def test_modes_become_rgb(mode):
    img = Image.fromarray(photo(300, 300)).convert(mode)
    kw = {}
    if mode == "P":
        kw["transparency"] = 0
    out = decode_image(encode(img, "PNG", **kw), LIMITS)
    assert out.pixels.shape == (300, 300, 3)


def test_transparent_pixels_get_the_fixed_background():
    rgba = np.zeros((300, 300, 4), np.uint8)  # fully transparent black
    out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), LIMITS).pixels
    assert np.all(out == 255)


@pytest.mark.parametrize(
    ("orientation", "size"), [(1, (640, 480)), (3, (640, 480)), (6, (480, 640)), (8, (480, 640))]
)
def test_exif_orientation(orientation, size):
    arr = photo(640, 480)
    arr[:50, :50] = 255  # a white mark in the stored top-left corner
    out = decode_image(with_exif_orientation(arr, orientation), LIMITS)
    assert (out.width, out.height) == size
    corners = {
        "tl": out.pixels[:15, :15],
        "tr": out.pixels[:15, -15:],
        "bl": out.pixels[-15:, :15],
        "br": out.pixels[-15:, -15:],
    }
    where = {1: "tl", 3: "br", 6: "tr", 8: "bl"}[orientation]
    assert corners[where].mean() > 240


def test_sniffing_ignores_claims():
    assert sniff(encode(photo(), "JPEG")) == "JPEG"
    assert sniff(encode(photo(), "PNG")) == "PNG"
    assert sniff(encode(photo(), "WEBP")) == "WEBP"


def test_draft_decoding_matches_full_decode_closely():
    arr = photo(4000, 3000, seed=3)
    data = encode(arr, "JPEG", quality=90)
    fast = decode_image(data, LIMITS).pixels.astype(int)
    full = np.asarray(
        Image.open(io.BytesIO(data)).convert("RGB").resize((300, 300), Image.Resampling.BILINEAR)
    ).astype(int)
    assert np.abs(fast - full).mean() < 3
