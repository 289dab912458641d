"""Uploads the API must refuse with a 4xx JSON error: (name, files, status, code). Used by the
API's tests and by the reliability tests, which send them while the service is under load."""

from __future__ import annotations

import numpy as np

from devtools.images import encode, photo, png_header_only

JPEG = encode(photo(), "JPEG")

BAD_INPUTS = [
    ("empty", {"image": ("x.jpg", b"")}, 400, "empty_file"),
    ("random", {"image": ("x.jpg", np.random.default_rng(1).bytes(4000))}, 400, "invalid_image"),
    ("truncated", {"image": ("x.jpg", JPEG[: len(JPEG) // 2])}, 400, "invalid_image"),
    ("png bomb", {"image": ("x.png", png_header_only(30000, 30000))}, 400, "image_too_large"),
    ("1x20000", {"image": ("x.png", png_header_only(1, 20000))}, 400, "image_too_large"),
    ("20000x1", {"image": ("x.png", png_header_only(20000, 1))}, 400, "image_too_large"),
    ("gif", {"image": ("x.gif", encode(photo(64, 48), "GIF"))}, 400, "unsupported_format"),
    ("tiff", {"image": ("x.tif", encode(photo(64, 48), "TIFF"))}, 400, "unsupported_format"),
    ("bmp", {"image": ("x.bmp", encode(photo(64, 48), "BMP"))}, 400, "unsupported_format"),
    ("pdf", {"image": ("x.pdf", encode(photo(64, 48), "PDF"))}, 400, "unsupported_format"),
    ("two images", [("image", ("a.jpg", JPEG)), ("image", ("b.jpg", JPEG))], 400, "too_many_files"),
    ("no file", {"other": ("a.jpg", JPEG)}, 400, "missing_file"),
]
