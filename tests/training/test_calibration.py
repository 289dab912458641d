"""INT8 calibration images: decoded exactly as the gateway decodes uploads, taken from the
training images of a COCO layout (its validation images measure the INT8 model)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from devtools.images import photo
from ssdcore.imaging import model_input
from training.export.int8 import calibration_folder, calibration_images


def mpo_bytes() -> bytes:
    """A JPEG holding two pictures, as phones write them; Pillow calls it MPO."""
    first = Image.fromarray(photo(1200, 900, seed=5))
    second = Image.fromarray(photo(1200, 900, seed=6))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second], quality=90)
    return out.getvalue()


def test_a_multi_picture_jpeg_is_calibrated_on_what_the_gateway_sees(tmp_path):
    data = mpo_bytes()
    (tmp_path / "phone.jpg").write_bytes(data)
    assert Image.open(tmp_path / "phone.jpg").format == "MPO"  # what fooled the old check
    # the gateway: sniffed as JPEG from its bytes, opened and decoded as one (DCT scaling)
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
        gateway, _, _ = model_input(img, True, 300)
    (calibrated,) = calibration_images(tmp_path, 1)
    np.testing.assert_array_equal(calibrated, gateway)
    with Image.open(tmp_path / "phone.jpg") as img:  # decoded as "not a JPEG": other pixels
        other, _, _ = model_input(img, img.format == "JPEG", 300)
    assert (other != gateway).mean() > 0.05


def test_a_coco_layout_is_calibrated_on_its_training_images(tmp_path):
    for split in ("train2017", "val2017"):
        (tmp_path / split).mkdir()
        Image.fromarray(photo(64, 48, seed=1)).save(tmp_path / split / "a.jpg")
    assert calibration_folder(tmp_path) == tmp_path / "train2017"
    (tmp_path / "train2017" / "a.jpg").unlink()
    (tmp_path / "train2017").rmdir()
    assert calibration_folder(tmp_path) == tmp_path / "val2017"  # only when it has nothing else
    assert calibration_folder(tmp_path / "val2017") == tmp_path / "val2017"
