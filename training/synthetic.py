"""A synthetic COCO-format dataset: coloured shapes with exact boxes, as JPEGs + instances JSON.

    python -m training.synthetic DIR [--train 64] [--val 16] [--classes 4] [--seed 0]
    python -m training.synthetic DIR --category 7 "Red ellipse" --category 12 "Blue box" ...

writes the COCO 2017 layout (``train2017/``, ``val2017/``, ``annotations/instances_*2017.json``).
By default all 80 COCO categories are declared (so the label map is the standard one) and the
first ``--classes`` of a fixed list are drawn; with ``--category ID NAME`` (repeated, at most
six) the dataset declares exactly those categories, in that order, and draws one shape per
category: a dataset with its own classes. Each class is one shape in one colour, so the task is
learnable. Images have varied sizes and a smooth random background; boxes are the exact
extents of the drawn shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssdcore.labels import COCO

# (COCO id, shape, colour) per class, in order of use
CLASSES = (
    (1, "ellipse", (220, 40, 40)),  # person
    (3, "rectangle", (40, 80, 220)),  # car
    (18, "triangle", (40, 180, 60)),  # dog
    (62, "rectangle", (240, 200, 30)),  # chair
    (44, "ellipse", (150, 60, 200)),  # bottle
    (77, "triangle", (30, 200, 200)),  # cell phone
)
SIZES = ((640, 480), (480, 640), (512, 512), (800, 600), (400, 300))


def categories() -> list[dict]:
    return [{"id": i, "name": n, "supercategory": "object"} for i, n in zip(COCO.ids, COCO.names)]


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    coarse = rng.integers(60, 200, (4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def draw_image(
    rng: np.random.Generator,
    width: int,
    height: int,
    num_classes: int,
    max_objects: int,
    ids: tuple[int, ...] | None = None,
) -> tuple[Image.Image, list[tuple[int, list[float]]]]:
    """One image and its objects as (category id, [x, y, w, h]); ``ids``: the category id of
    each shape of ``CLASSES`` (default: their COCO ids)."""
    img = _background(rng, width, height)
    draw = ImageDraw.Draw(img)
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        k = int(rng.integers(0, num_classes))
        coco_id, shape, colour = CLASSES[k]
        if ids is not None:
            coco_id = ids[k]
        w = int(rng.uniform(0.15, 0.5) * width)
        h = int(rng.uniform(0.15, 0.5) * height)
        x0 = int(rng.integers(0, width - w))
        y0 = int(rng.integers(0, height - h))
        x1, y1 = x0 + w - 1, y0 + h - 1  # PIL draws inclusive coordinates
        if shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=colour)
        objects.append((coco_id, [float(x0), float(y0), float(w), float(h)]))
    return img, objects


def write_split(
    root: Path,
    split: str,
    count: int,
    rng: np.random.Generator,
    num_classes: int,
    max_objects: int,
    first_id: int,
    sizes: tuple[tuple[int, int], ...] = SIZES,
    own: list[tuple[int, str]] | None = None,
) -> int:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    ann_id = first_id
    for i in range(count):
        width, height = sizes[int(rng.integers(0, len(sizes)))]
        ids = tuple(cid for cid, _ in own) if own else None
        img, objects = draw_image(rng, width, height, num_classes, max_objects, ids)
        image_id = first_id + i
        name = f"{image_id:012d}.jpg"
        img.save(folder / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        for coco_id, (x, y, w, h) in objects:
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": coco_id,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
            ann_id += 1
    (root / "annotations").mkdir(exist_ok=True)
    doc = {
        "info": {"description": "synthetic shapes"},
        "images": images,
        "annotations": annotations,
        "categories": (
            [{"id": cid, "name": n, "supercategory": "object"} for cid, n in own]
            if own
            else categories()
        ),
        "licenses": [],
    }
    (root / "annotations" / f"instances_{split}2017.json").write_text(
        json.dumps(doc, ensure_ascii=False), encoding="utf-8"
    )
    return ann_id


def generate(
    root: Path,
    train: int = 64,
    val: int = 16,
    num_classes: int = 4,
    seed: int = 0,
    max_objects: int = 3,
    size: tuple[int, int] | None = None,
    categories: list[tuple[int, str]] | None = None,
) -> Path:
    """Write the dataset; ``size`` fixes every image to (width, height) instead of varied sizes;
    ``categories``: the dataset's own (id, name) list, one drawn shape each (``num_classes`` is
    then its length)."""
    if categories:
        num_classes = len(categories)
    if not 1 <= num_classes <= len(CLASSES):
        raise ValueError(f"the number of classes must be in 1..{len(CLASSES)}")
    rng = np.random.default_rng(seed)
    sizes = (size,) if size else SIZES
    own = list(categories) if categories else None
    next_id = write_split(root, "train", train, rng, num_classes, max_objects, 1, sizes, own)
    write_split(root, "val", val, rng, num_classes, max_objects, next_id + 100_000, sizes, own)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.synthetic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=64)
    p.add_argument("--val", type=int, default=16)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--max-objects", type=int, default=3)
    p.add_argument("--size", help="WIDTHxHEIGHT for every image (default: varied sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--category",
        nargs=2,
        action="append",
        metavar=("ID", "NAME"),
        help="a category of the dataset's own (repeat; replaces COCO's and --classes)",
    )
    args = p.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x")) if args.size else None
    own = [(int(i), n) for i, n in args.category] if args.category else None
    generate(args.root, args.train, args.val, args.classes, args.seed, args.max_objects, size, own)
    print(f"wrote {args.train} training and {args.val} validation images to {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
