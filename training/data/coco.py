"""COCO-format data without DALI: the torchvision.transforms.v2 training fallback and the
evaluation dataset.

Training recipe (the DALI pipeline's, with the same crop and colour semantics; see
``training.data.augment``): random IoU crop (min IoU of every box one of 0/0.1/0.3/0.5/0.7/0.9, or
no crop; relative width/height 0.3-1, aspect 0.5-2), horizontal flip, squash-resize to 300x300
(antialiased bilinear), hue +-0.5 degrees and saturation 0.5-1.5 in YIQ, brightness 0.875-1.125
and contrast 0.5-1.5 around 128, ImageNet normalisation, box encoding with the shared default
boxes. Evaluation: squash-resize to 300x300 uint8 (bilinear, like the service); the model wrapper
normalises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from ssdcore.labels import ClassList
from ssdcore.spec import SSD300, SSD300Spec
from training.box_coding import BoxEncoder
from training.data.augment import (
    NO_AUGMENT,
    RECIPE,
    Augment,
    colour_jitter,
    crop_boxes,
    draw_colour,
    sample_crop,
)


class DataError(ValueError):
    """The data folder or its annotations are not usable."""


@dataclass(frozen=True)
class CocoIndex:
    """What we need of an instances JSON: images with their annotations and the classes."""

    images: list[dict]
    boxes: dict[int, np.ndarray]  # image id -> (n, 4) xyxy pixels
    labels: dict[int, np.ndarray]  # image id -> (n,) contiguous labels
    classes: ClassList  # contiguous label 1..N <-> category id and name, in file order


def load_index(annotation_file: Path, skip_empty: bool) -> CocoIndex:
    try:
        doc = json.loads(Path(annotation_file).read_text())
    except FileNotFoundError:
        raise DataError(f"annotation file {annotation_file} does not exist") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"annotation file {annotation_file} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not all(
        k in doc for k in ("images", "annotations", "categories")
    ):
        raise DataError(f"{annotation_file}: needs 'images', 'annotations' and 'categories'")
    try:
        classes = ClassList.from_categories(doc["categories"])
    except ValueError as exc:
        raise DataError(f"{annotation_file}: unusable 'categories': {exc}") from None
    label_map = classes.label_map()
    boxes: dict[int, list] = {}
    labels: dict[int, list] = {}
    try:
        for ann in doc["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0.1 or h <= 0.1:  # DALI's default size_threshold drops such boxes too
                continue
            if ann["category_id"] not in label_map:
                raise DataError(
                    f"{annotation_file}: annotation {ann.get('id')} has category_id "
                    f"{ann['category_id']!r}, which 'categories' does not declare"
                )
            boxes.setdefault(ann["image_id"], []).append([x, y, x + w, y + h])
            labels.setdefault(ann["image_id"], []).append(label_map[ann["category_id"]])
        images = [
            {
                "id": im["id"],
                "file_name": im["file_name"],
                "width": im["width"],
                "height": im["height"],
            }
            for im in doc["images"]
        ]
        images.sort(key=lambda im: im["id"])  # the order of DALI's COCO reader
    except DataError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{annotation_file}: malformed annotation ({exc!r})") from None
    if skip_empty:
        images = [im for im in images if im["id"] in boxes]
    return CocoIndex(
        images,
        {k: np.asarray(v, np.float32) for k, v in boxes.items()},
        {k: np.asarray(v, np.int64) for k, v in labels.items()},
        classes,
    )


def dataset_classes(data: Path, splits: tuple[str, ...]) -> ClassList:
    """The classes of a dataset: those of the first split's annotations (training's, when it is
    one of them), checked (as every annotation) in the others, which must declare the same
    categories (same ids and names, in any order)."""
    indices = [load_index(data / "annotations" / f"instances_{s}.json", False) for s in splits]
    classes = indices[0].classes
    for split, index in zip(splits[1:], indices[1:]):
        if not index.classes.same_categories(classes):
            raise DataError(
                f"instances_{split}.json declares other categories than "
                f"instances_{splits[0]}.json: {index.classes.summary()} vs {classes.summary()}; "
                "the model is trained and evaluated on one class list"
            )
    return classes


def check_data_folder(data: Path, splits: tuple[str, ...] = ("train2017", "val2017")) -> None:
    """Fail early, with a clear message, when the COCO layout is not there."""
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist")
    for split in splits:
        if not (data / split).is_dir():
            raise DataError(f"{data} has no {split}/ folder (expected the COCO 2017 layout)")
        ann = data / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            raise DataError(f"{data} has no annotations/instances_{split}.json")


class TrainTransform:
    """PIL image + pixel xyxy boxes -> (image (3,300,300) float normalised, relative ltrb boxes,
    labels): the reference's DALI recipe, step for step (see ``training.data.augment``).

    Random draws come from ``generator`` (torch's global one when None), in the order crop,
    flip, colour.
    """

    def __init__(self, spec: SSD300Spec = SSD300, augment: Augment = RECIPE) -> None:
        self.spec = spec
        self.augment = augment

    def __call__(
        self,
        img: Image.Image,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        generator: torch.Generator | None = None,
    ):
        w, h = img.size
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        rel = boxes / scale
        if self.augment.enabled:
            window, keep = sample_crop(rel, self.augment, generator)
            if window is not None:  # decode-then-crop here; DALI decodes only the window
                img = img.crop(tuple(int(v) for v in (window * scale).round().tolist()))
                rel, labels = crop_boxes(rel[keep], window), labels[keep]
        image = F.pil_to_tensor(img)
        if self.augment.enabled and bool(torch.rand((), generator=generator) < 0.5):
            image = F.horizontal_flip(image)
            rel = torch.stack([1 - rel[:, 2], rel[:, 1], 1 - rel[:, 0], rel[:, 3]], dim=1)
        size = self.spec.image_size
        image = F.resize(image, [size, size], antialias=True)
        if self.augment.enabled:
            image = colour_jitter(image, **draw_colour(self.augment, generator))
        image = F.normalize(
            F.to_dtype(image, torch.float32, scale=True), list(self.spec.mean), list(self.spec.std)
        )
        return image, rel.clamp(0, 1), labels


class CocoSplit(Dataset):
    """One split of a COCO-format folder: its index and the first ``max_images`` images by id."""

    def __init__(
        self, data: Path, split: str, skip_empty: bool, max_images: int | None = None
    ) -> None:
        self.root = data / split
        self.annotation_file = data / "annotations" / f"instances_{split}.json"
        self.index = load_index(self.annotation_file, skip_empty=skip_empty)
        self.images = self.index.images[:max_images] if max_images else self.index.images

    def __len__(self) -> int:
        return len(self.images)

    def open_rgb(self, i: int) -> tuple[dict, Image.Image]:
        info = self.images[i]
        return info, Image.open(self.root / info["file_name"]).convert("RGB")


class CocoTrainDataset(CocoSplit):
    """(image (3,300,300) float normalised, boxes (8732,4) xywh, labels (8732,) int64).

    The augmentation of image ``i`` is a function of (seed, epoch, i) alone: the same whatever
    the number of workers, the order of loading, or a resume in the middle of an epoch.
    """

    def __init__(
        self,
        data: Path,
        split: str = "train2017",
        spec: SSD300Spec = SSD300,
        max_images: int | None = None,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(data, split, skip_empty=True, max_images=max_images)
        self.seed = seed
        self.epoch = 0  # set by the loader before each epoch
        self.transform = TrainTransform(spec, RECIPE if augment else NO_AUGMENT)
        self.encoder = BoxEncoder(spec)

    def __getitem__(self, i: int):
        info, img = self.open_rgb(i)
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % 2**63)
        image, boxes, labels = self.transform(
            img,
            torch.from_numpy(self.index.boxes[info["id"]]),
            torch.from_numpy(self.index.labels[info["id"]]),
            generator,
        )
        enc_boxes, enc_labels = self.encoder.encode(boxes, labels)
        return image, enc_boxes, enc_labels


class CocoEvalDataset(CocoSplit):
    """(image (300,300,3) uint8, image id, original (height, width)) for every image."""

    def __init__(
        self,
        data: Path,
        split: str = "val2017",
        spec: SSD300Spec = SSD300,
        max_images: int | None = None,
    ) -> None:
        super().__init__(data, split, skip_empty=False, max_images=max_images)
        self.size = spec.image_size

    def __getitem__(self, i: int):
        info, img = self.open_rgb(i)
        w, h = img.size
        pixels = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR))
        return torch.from_numpy(pixels.copy()), info["id"], (h, w)


def eval_collate(batch):
    images, ids, sizes = zip(*batch)
    return torch.stack(images), list(ids), list(sizes)
