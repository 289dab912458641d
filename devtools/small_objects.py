"""A small-object set for tiled inference: the scene's people (red ellipses) and cars (blue
rectangles) at 12-40 pixels on 2000x1500 canvases, with ground truth; and a COCO-format training
set of crops of such canvases at the scale a tile shows them (the model the tiling tests train).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from devtools.videos import CAR, PERSON, background, draw

CANVAS = (2000, 1500)
SIDES = (12, 40)  # an object's longer side, pixels


@dataclass(frozen=True)
class Canvas:
    """A picture and its objects: boxes (n, 4) x1, y1, x2, y2 in pixels, COCO ids (n,)."""

    image: Image.Image
    boxes: np.ndarray
    category_ids: np.ndarray


def canvas(
    seed: int, size: tuple[int, int] = CANVAS, count: int = 40, sides: tuple = SIDES
) -> Canvas:
    """``count`` objects (people and cars, the longer side uniform in ``sides``) at random places,
    never overlapping one another, on the scene's kind of background."""
    rng = np.random.default_rng(seed)
    img = background(seed, size)
    boxes: list[tuple[float, float, float, float]] = []
    ids: list[int] = []
    tries = 0
    while len(boxes) < count and tries < count * 50:
        tries += 1
        kind = (PERSON, CAR)[int(rng.integers(0, 2))]
        w0, h0 = kind[3]
        s = rng.uniform(*sides) / max(w0, h0)
        w, h = round(w0 * s), round(h0 * s)
        x0 = float(rng.integers(0, size[0] - w))
        y0 = float(rng.integers(0, size[1] - h))
        box = (x0, y0, x0 + w, y0 + h)
        if any(
            box[0] < b[2] + 4 and b[0] < box[2] + 4 and box[1] < b[3] + 4 and b[1] < box[3] + 4
            for b in boxes
        ):
            continue
        draw(img, kind, box)
        boxes.append(box)
        ids.append(kind[0])
    return Canvas(img, np.array(boxes, np.float64).reshape(-1, 4), np.array(ids, np.int64))


def training_crops(
    root: Path, count: int = 48, crop: int = 400, seed: int = 1000, per_canvas: int = 8
) -> Path:
    """COCO 2017 layout: ``count`` crop x crop pieces of canvases (seeds from ``seed`` on,
    never the test's), each object kept where at least half of it is inside the crop (its box
    clipped to it); the validation split is the same."""
    from training.synthetic import categories

    rng = np.random.default_rng(seed)
    folder = root / "train2017"
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    c = None
    for i in range(count):
        if i % per_canvas == 0:
            c = canvas(seed + i // per_canvas)
        x0 = int(rng.integers(0, CANVAS[0] - crop))
        y0 = int(rng.integers(0, CANVAS[1] - crop))
        piece = c.image.crop((x0, y0, x0 + crop, y0 + crop))
        image_id = i + 1
        for box, cid in zip(c.boxes, c.category_ids):
            clipped = np.clip(box - [x0, y0, x0, y0], 0, crop)
            inside = (clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
            if inside < 0.5 * (box[2] - box[0]) * (box[3] - box[1]):
                continue
            bw, bh = float(clipped[2] - clipped[0]), float(clipped[3] - clipped[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(cid),
                    "bbox": [float(clipped[0]), float(clipped[1]), bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
        name = f"{image_id:012d}.jpg"
        piece.save(folder / name, quality=90)
        images.append({"id": image_id, "file_name": name, "width": crop, "height": crop})
    (root / "annotations").mkdir(exist_ok=True)
    doc = {"images": images, "annotations": annotations, "categories": categories()}
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(doc))
    if not (root / "val2017").exists():
        (root / "val2017").symlink_to("train2017")
    return root


def matched(
    truth: np.ndarray, truth_ids: np.ndarray, found: list[dict], iou: float = 0.5
) -> np.ndarray:
    """Which ground-truth objects a response's detections find: greedy by score, one detection
    per object, same class, IoU >= ``iou``. Returns a boolean per object."""
    hit = np.zeros(len(truth), dtype=bool)
    for det in sorted(found, key=lambda d: -d["score"]):
        b = det["box"]
        box = np.array([b["x1"], b["y1"], b["x2"], b["y2"]])
        iw = np.minimum(truth[:, 2], box[2]) - np.maximum(truth[:, 0], box[0])
        ih = np.minimum(truth[:, 3], box[3]) - np.maximum(truth[:, 1], box[1])
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        union = (
            (truth[:, 2] - truth[:, 0]) * (truth[:, 3] - truth[:, 1])
            + (box[2] - box[0]) * (box[3] - box[1])
            - inter
        )
        ious = np.where((truth_ids == det["category_id"]) & ~hit, inter / union, 0.0)
        best = int(np.argmax(ious)) if len(ious) else -1
        if best >= 0 and ious[best] >= iou:
            hit[best] = True
    return hit


def coco_ground_truth(canvases: list[Canvas], path: Path) -> Path:
    """The canvases' objects as a COCO annotation file (image ids 1..n in order)."""
    from training.synthetic import categories

    images, annotations = [], []
    for i, c in enumerate(canvases):
        images.append({"id": i + 1, "file_name": f"{i + 1}.jpg", "width": c.image.width,
                       "height": c.image.height})  # fmt: skip
        for box, cid in zip(c.boxes, c.category_ids):
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(cid),
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    doc = {"images": images, "annotations": annotations, "categories": categories()}
    path.write_text(json.dumps(doc))
    return path


def as_coco_results(image_id: int, detections: list[dict]) -> list[dict]:
    """A response's detections of one image as COCO results."""
    out = []
    for d in detections:
        b = d["box"]
        out.append(
            {
                "image_id": image_id,
                "category_id": d["category_id"],
                "bbox": [b["x1"], b["y1"], b["x2"] - b["x1"], b["y2"] - b["y1"]],
                "score": d["score"],
            }
        )
    return out


def jpeg_bytes(img: Image.Image, quality: int = 95) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


TILE = 400  # the training crops' side: the tile_size at which the model sees objects as trained


def train_model(root: Path, seed: int = 0, epochs: int = 15, bf16: bool = True) -> Path:
    """A ResNet-18 SSD trained on 48 crops of 400 px (``training_crops``), in bf16 autocast
    unless ``bf16`` is False (``--cpu-bf16``: 1.5 minutes on two cores of an AMX Xeon, 3 in
    fp32; AP50 0.87 and 0.86 on its crops), exported to ONNX; returns the repository. The
    test's margins hold in both (seeds 0-2 in bf16; docs/tiles.md's figures are fp32's)."""
    import os
    import subprocess
    import sys

    from training.export import ExportOptions, export

    data = training_crops(root / "data", crop=TILE)
    run = root / "run"
    last = epochs - 1
    args = [
        "--data", str(data), "--epochs", str(epochs), "--batch-size", "4",
        "--eval-batch-size", "8", "--data-backend", "torch", "--no-augment",
        "--evaluation", str(last), "--learning-rate", "0.05",
        "--multistep", str(int(epochs * 0.8)), "--save", str(run), "--backbone", "resnet18",
        "--backbone-weights", "none", "--num-workers", "0", "--warmup", "5",
        "--seed", str(seed), "--log-interval", "10", "--keep-checkpoints", "1",
        *(["--cpu-bf16"] if bf16 else []),
    ]  # fmt: skip
    top = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(top / "training" / "train.py"), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=top, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    repo = root / "repo"
    export(repo, ["onnx"], checkpoint=run / f"epoch_{last}.pt", opts=ExportOptions(gpu=False))
    return repo


def write_clip(path: Path, c: Canvas, frames: int = 4, fps: int = 10) -> Path:
    """An H.264 clip of a canvas standing still for ``frames`` frames (its objects where the
    canvas has them)."""
    from devtools.videos import still_clip

    return still_clip(path, c.image, frames, fps)
