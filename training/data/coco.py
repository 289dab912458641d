"""COCO-format data without DALI: the torchvision.transforms.v2 training fallback and the
evaluation dataset.

Training recipe (same as the DALI pipeline, in torchvision terms): random IoU crop (min IoU one of
0/0.1/0.3/0.5/0.7/0.9 or no crop, scale 0.3-1, aspect 0.5-2), horizontal flip, squash-resize to
300x300, saturation/contrast 0.5-1.5, brightness 0.875-1.125, hue +-0.5 degrees, ImageNet
normalisation, box encoding with the shared default boxes. Evaluation: squash-resize to 300x300
uint8 (bilinear, like the service); the model wrapper normalises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

from ssdcore.labels import label_map_from_categories
from ssdcore.spec import SSD300, SSD300Spec
from training.box_coding import BoxEncoder


class DataError(ValueError):
    """The data folder or its annotations are not usable."""


@dataclass(frozen=True)
class CocoIndex:
    """What we need of an instances JSON: images with their annotations and the label map."""

    images: list[dict]
    boxes: dict[int, np.ndarray]  # image id -> (n, 4) xyxy pixels
    labels: dict[int, np.ndarray]  # image id -> (n,) contiguous labels
    label_map: dict[int, int]  # COCO category id -> contiguous 1..N


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
    label_map = label_map_from_categories(doc["categories"])
    boxes: dict[int, list] = {}
    labels: dict[int, list] = {}
    try:
        for ann in doc["annotations"]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0.1 or h <= 0.1:  # DALI's default size_threshold drops such boxes too
                continue
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
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{annotation_file}: malformed annotation ({exc!r})") from None
    if skip_empty:
        images = [im for im in images if im["id"] in boxes]
    return CocoIndex(
        images,
        {k: np.asarray(v, np.float32) for k, v in boxes.items()},
        {k: np.asarray(v, np.int64) for k, v in labels.items()},
        label_map,
    )


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


def train_transform(spec: SSD300Spec = SSD300, augment: bool = True) -> T.Compose:
    if not augment:
        return T.Compose(
            [
                T.Resize((spec.image_size, spec.image_size), antialias=True),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(mean=list(spec.mean), std=list(spec.std)),
            ]
        )
    return T.Compose(
        [
            T.RandomIoUCrop(
                min_scale=0.3,
                max_scale=1.0,
                min_aspect_ratio=0.5,
                max_aspect_ratio=2.0,
                sampler_options=[0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 2.0],
                trials=1,
            ),
            T.RandomHorizontalFlip(0.5),
            T.Resize((spec.image_size, spec.image_size), antialias=True),
            T.ColorJitter(
                brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=0.5 / 360
            ),
            T.SanitizeBoundingBoxes(min_size=1),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )


class CocoTrainDataset(Dataset):
    """(image (3,300,300) float normalised, boxes (8732,4) xywh, labels (8732,) int64)."""

    def __init__(
        self,
        data: Path,
        split: str = "train2017",
        spec: SSD300Spec = SSD300,
        max_images: int | None = None,
        augment: bool = True,
    ) -> None:
        self.root = data / split
        self.index = load_index(data / "annotations" / f"instances_{split}.json", skip_empty=True)
        self.images = self.index.images[:max_images] if max_images else self.index.images
        self.transform = train_transform(spec, augment)
        self.encoder = BoxEncoder(spec)
        self.size = spec.image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        info = self.images[i]
        img = Image.open(self.root / info["file_name"]).convert("RGB")
        w, h = img.size
        boxes = tv_tensors.BoundingBoxes(
            torch.from_numpy(self.index.boxes[info["id"]]), format="XYXY", canvas_size=(h, w)
        )
        image, target = self.transform(
            tv_tensors.Image(T.functional.pil_to_tensor(img)),
            {"boxes": boxes, "labels": torch.from_numpy(self.index.labels[info["id"]])},
        )
        ltrb = target["boxes"].as_subclass(torch.Tensor) / self.size
        enc_boxes, enc_labels = self.encoder.encode(ltrb.clamp(0, 1), target["labels"])
        return image.as_subclass(torch.Tensor), enc_boxes, enc_labels


class CocoEvalDataset(Dataset):
    """(image (300,300,3) uint8, image id, original (height, width)) for every image."""

    def __init__(
        self,
        data: Path,
        split: str = "val2017",
        spec: SSD300Spec = SSD300,
        max_images: int | None = None,
    ) -> None:
        self.root = data / split
        self.annotation_file = data / "annotations" / f"instances_{split}.json"
        self.index = load_index(self.annotation_file, skip_empty=False)
        self.images = self.index.images[:max_images] if max_images else self.index.images
        self.size = spec.image_size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        info = self.images[i]
        img = Image.open(self.root / info["file_name"]).convert("RGB")
        w, h = img.size
        pixels = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR))
        return torch.from_numpy(pixels.copy()), info["id"], (h, w)


def eval_collate(batch):
    images, ids, sizes = zip(*batch)
    return torch.stack(images), list(ids), list(sizes)
