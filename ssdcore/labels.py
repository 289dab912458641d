"""COCO 2017 class names and the contiguous (1..80) <-> COCO category id (1..90) map.

The network predicts contiguous labels: 0 is background, 1..80 follow the COCO categories sorted by
id (the order of ``instances_*2017.json``). COCO ids skip 12, 26, 29, 30, 45, 66, 68, 69, 71, 83.
"""

from __future__ import annotations

import numpy as np

COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

_MISSING_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
COCO_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _MISSING_IDS)

assert len(COCO_NAMES) == 80 and len(COCO_IDS) == 80

# contiguous label (1..80) -> COCO category id; index 0 (background) maps to 0
CONTIGUOUS_TO_COCO = np.array((0, *COCO_IDS), dtype=np.int32)
COCO_TO_CONTIGUOUS: dict[int, int] = {coco: i + 1 for i, coco in enumerate(COCO_IDS)}
# contiguous label -> name, with the background at 0 (the reference checkpoint's 'label_map')
LABEL_NAMES: tuple[str, ...] = ("background", *COCO_NAMES)


def label_map_from_categories(categories: list[dict]) -> dict[int, int]:
    """COCO category id -> contiguous label 1..N, in file order (what the reference and DALI do)."""
    return {int(c["id"]): i + 1 for i, c in enumerate(categories)}


def resolve_class_filter(items: list[str]) -> set[int]:
    """Names or COCO ids (as strings) -> a set of contiguous labels. Raises ValueError on unknowns."""
    by_name = {n: i + 1 for i, n in enumerate(COCO_NAMES)}
    out: set[int] = set()
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item.isdigit():
            coco_id = int(item)
            if coco_id not in COCO_TO_CONTIGUOUS:
                raise ValueError(f"unknown COCO category id {coco_id}")
            out.add(COCO_TO_CONTIGUOUS[coco_id])
        elif item.lower() in by_name:
            out.add(by_name[item.lower()])
        else:
            raise ValueError(f"unknown class name {item!r}")
    return out
