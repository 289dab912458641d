"""The torchvision fallback's crop and colour steps against DALI's operators, which define the
recipe: same crop distribution, same colour arithmetic."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from PIL import Image

from ssdcore.spec import SSD300
from training.data.augment import (
    NO_AUGMENT,
    RECIPE,
    colour_jitter,
    crop_boxes,
    sample_crop,
)
from training.data.coco import CocoTrainDataset, TrainTransform
from training.data.dali import random_crop

BOX_SETS = {
    "one central box": [[0.35, 0.35, 0.65, 0.65]],
    "two apart": [[0.05, 0.1, 0.35, 0.5], [0.6, 0.5, 0.95, 0.9]],
    "three mixed": [[0.1, 0.1, 0.3, 0.4], [0.4, 0.2, 0.9, 0.9], [0.7, 0.05, 0.8, 0.2]],
}
DRAWS, BATCH = 4096, 512


def dali_crop_stats(boxes: list[list[float]]) -> np.ndarray:
    """(no crop?, window area, boxes kept) per draw of the training pipeline's DALI crop."""
    b = np.array(boxes, np.float32)
    labels = np.arange(1, len(b) + 1, dtype=np.int32)

    @pipeline_def
    def crops():
        bb = fn.external_source(source=lambda: [b] * BATCH, batch=True)
        ll = fn.external_source(source=lambda: [labels] * BATCH, batch=True)
        _anchor, shape, _boxes, kept = random_crop(bb, ll, RECIPE)
        return shape, kept

    pipe = crops(batch_size=BATCH, num_threads=2, device_id=None, seed=7)
    pipe.build()
    rows = []
    for _ in range(DRAWS // BATCH):
        shapes, kept = pipe.run()
        for i in range(BATCH):
            s = np.array(shapes[i])
            rows.append((float(np.all(s == 1)), s[0] * s[1], np.array(kept[i]).size))
    return np.array(rows)


def our_crop_stats(boxes: list[list[float]]) -> np.ndarray:
    g = torch.Generator().manual_seed(11)
    b = torch.tensor(boxes)
    rows = []
    for _ in range(DRAWS):
        window, keep = sample_crop(b, RECIPE, g)
        if window is None:
            rows.append((1.0, 1.0, len(b)))
        else:
            area = float((window[2] - window[0]) * (window[3] - window[1]))
            rows.append((0.0, area, int(keep.sum())))
    return np.array(rows)


@pytest.mark.parametrize("name", list(BOX_SETS))
def test_crop_distribution_matches_dali(name):
    """Share of uncropped images, mean window area and mean boxes kept agree within 4 standard
    errors. torchvision's RandomIoUCrop ("any box overlaps") fails this for the multi-box sets."""
    dali, ours = dali_crop_stats(BOX_SETS[name]), our_crop_stats(BOX_SETS[name])
    se = np.sqrt(dali.var(0) / DRAWS + ours.var(0) / DRAWS) + 1e-9
    z = np.abs(dali.mean(0) - ours.mean(0)) / se
    assert (z < 4).all(), (dali.mean(0), ours.mean(0), z)


def test_every_crop_obeys_the_recipe():
    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor(BOX_SETS["three mixed"])
    lo, hi = RECIPE.crop_scaling
    for _ in range(500):
        window, keep = sample_crop(boxes, RECIPE, g)
        if window is None:
            assert keep.all()
            continue
        w, h = float(window[2] - window[0]), float(window[3] - window[1])
        assert lo <= w <= hi and lo <= h <= hi and 0.5 <= w / h <= 2.0
        assert window.min() >= 0 and window.max() <= 1 + 1e-6
        centre = (boxes[:, :2] + boxes[:, 2:]) / 2
        inside = ((centre >= window[:2]) & (centre < window[2:])).all(1)
        assert torch.equal(keep, inside) and keep.any()
        kept = crop_boxes(boxes[keep], window)
        assert kept.min() >= 0 and kept.max() <= 1


def test_a_crop_must_overlap_every_box_by_the_threshold():
    """With two boxes far apart no window overlaps both by IoU 0.3: only "no crop" remains
    (torchvision's RandomIoUCrop would crop around one of them)."""
    g = torch.Generator().manual_seed(0)
    strict = dataclasses.replace(RECIPE, crop_thresholds=(0.3,))
    boxes = torch.tensor(BOX_SETS["two apart"])
    assert all(sample_crop(boxes, strict, g)[0] is None for _ in range(300))
    single = torch.tensor(BOX_SETS["one central box"])
    assert any(sample_crop(single, strict, g)[0] is not None for _ in range(300))


def test_crop_boxes_is_relative_to_the_window():
    window = torch.tensor([0.2, 0.4, 0.6, 0.8])
    boxes = torch.tensor([[0.3, 0.5, 0.5, 0.7], [0.1, 0.5, 0.4, 0.9]])
    expected = torch.tensor([[0.25, 0.25, 0.75, 0.75], [0.0, 0.25, 0.5, 1.0]])
    torch.testing.assert_close(crop_boxes(boxes, window), expected)


@pytest.mark.parametrize(
    "hue, saturation, brightness, contrast",
    [(0.0, 1.0, 1.0, 1.0), (0.4, 1.4, 1.1, 0.6), (-0.5, 0.5, 0.875, 1.5), (30.0, 1.2, 1.0, 1.0)],
)
def test_colour_matches_dali_hsv_and_brightness_contrast(hue, saturation, brightness, contrast):
    image = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)

    @pipeline_def
    def colour():
        x = fn.external_source(source=lambda: [image], batch=True, layout="HWC")
        x = fn.hsv(x, hue=hue, saturation=saturation, dtype=types.FLOAT)
        return fn.brightness_contrast(
            x, brightness=brightness, contrast=contrast, contrast_center=128, dtype=types.UINT8
        )

    pipe = colour(batch_size=1, num_threads=1, device_id=None)
    pipe.build()
    dali = np.array(pipe.run()[0][0]).astype(int)
    ours = colour_jitter(
        torch.from_numpy(image).permute(2, 0, 1), hue, saturation, brightness, contrast
    )
    diff = np.abs(dali - ours.permute(1, 2, 0).numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding at .5 only


def test_train_transform_outputs():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8))
    boxes = torch.tensor([[32.0, 24.0, 160.0, 120.0], [200.0, 100.0, 300.0, 230.0]])
    labels = torch.tensor([3, 7])

    plain, rel, same_labels = TrainTransform(augment=NO_AUGMENT)(img, boxes, labels)
    torch.testing.assert_close(rel, boxes / torch.tensor([320.0, 240.0, 320.0, 240.0]))
    assert torch.equal(same_labels, labels)
    mean = torch.tensor(SSD300.mean).view(3, 1, 1)
    std = torch.tensor(SSD300.std).view(3, 1, 1)
    assert plain.shape == (3, 300, 300)
    pixels = plain * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5

    torch.manual_seed(0)
    first = [TrainTransform()(img, boxes, labels) for _ in range(20)]
    torch.manual_seed(0)
    again = [TrainTransform()(img, boxes, labels) for _ in range(20)]
    for (a, ra, la), (b, rb, lb) in zip(first, again, strict=True):
        assert torch.equal(a, b) and torch.equal(ra, rb) and torch.equal(la, lb)
        assert a.shape == (3, 300, 300) and len(ra) == len(la) >= 1
        assert ra.min() >= 0 and ra.max() <= 1 and (ra[:, 2:] >= ra[:, :2]).all()
        assert set(la.tolist()) <= {3, 7}
    assert len({float(a.sum()) for a, _, _ in first}) > 10  # the draws differ between calls


def test_an_images_augmentation_depends_only_on_seed_epoch_and_index(synthetic_coco):
    """Whatever the workers, the loading order or the global generator (exact mid-epoch resume)."""
    dataset = CocoTrainDataset(synthetic_coco, seed=3)
    torch.manual_seed(0)
    first = dataset[3]
    dataset[5]
    torch.manual_seed(123)
    again = dataset[3]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    dataset.epoch = 1
    assert not torch.equal(dataset[3][0], first[0])  # a new epoch draws anew
    other_seed = CocoTrainDataset(synthetic_coco, seed=4)
    assert not torch.equal(other_seed[3][0], first[0])
