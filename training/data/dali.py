"""The training input pipeline in NVIDIA DALI: the reference recipe, one ``fn`` call per step.

COCO reader (sharded, empty images skipped) -> random IoU crop -> decode only the crop ->
horizontal flip with boxes -> resize 300x300 -> HSV (hue in degrees, U[-0.5, 0.5] like the
reference, i.e. practically none) -> brightness/contrast -> normalise (ImageNet mean/std from the
spec) -> box encoder with the shared default boxes.

Runs on the CPU when there is no GPU (``device_id=None``); on a GPU JPEG decoding is ``mixed``
and the colour operations run on the device. The only module that imports DALI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ssdcore.anchors import default_boxes
from ssdcore.spec import SSD300, SSD300Spec
from training.data.augment import NO_AUGMENT, RECIPE, Augment

READER = "coco_reader"


@pipeline_def(enable_conditionals=False)
def ssd_train_pipeline(
    file_root: str,
    annotations_file: str,
    shard_id: int,
    num_shards: int,
    gpu: bool,
    fp16: bool,
    spec: SSD300Spec = SSD300,
    augment: Augment = RECIPE,
    with_gt: bool = False,
    images: list[str] | None = None,
):
    jpegs, boxes, labels = fn.readers.coco(
        name=READER,
        file_root=file_root,
        annotations_file=annotations_file,
        images=images,
        ltrb=True,
        ratio=True,
        skip_empty=True,
        shard_id=shard_id,
        num_shards=num_shards,
        shuffle_after_epoch=True,
    )
    if not augment.enabled:
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size)
        return _finish(images, boxes, labels, gpu, fp16, spec, with_gt)
    crop_begin, crop_size, boxes, labels = random_crop(boxes, labels, augment)
    images = fn.decoders.image_slice(
        jpegs, crop_begin, crop_size, device="mixed" if gpu else "cpu", output_type=types.RGB
    )
    flip = fn.random.coin_flip(probability=0.5)
    boxes = fn.bb_flip(boxes, ltrb=True, horizontal=flip)
    images = fn.flip(images, horizontal=flip)
    images = fn.resize(images, resize_x=spec.image_size, resize_y=spec.image_size)
    images = fn.hsv(
        images,
        hue=fn.random.uniform(range=list(augment.hue_degrees)),
        saturation=fn.random.uniform(range=list(augment.saturation)),
        dtype=types.FLOAT,
    )
    images = fn.brightness_contrast(
        images,
        brightness=fn.random.uniform(range=list(augment.brightness)),
        contrast=fn.random.uniform(range=list(augment.contrast)),
        contrast_center=128,
        dtype=types.UINT8,
    )
    return _finish(images, boxes, labels, gpu, fp16, spec, with_gt)


def random_crop(boxes, labels, augment: Augment = RECIPE):
    """The recipe's IoU crop: (relative anchor, relative shape, boxes, labels) of the window."""
    return fn.random_bbox_crop(
        boxes,
        labels,
        thresholds=list(augment.crop_thresholds),
        scaling=list(augment.crop_scaling),
        aspect_ratio=list(augment.crop_aspect_ratio),
        bbox_layout="xyXY",
        allow_no_crop=True,
        num_attempts=1,
    )


def _finish(images, boxes, labels, gpu: bool, fp16: bool, spec: SSD300Spec, with_gt: bool):
    """Normalise, encode the boxes on the default boxes, move to the GPU when there is one."""
    images = fn.crop_mirror_normalize(
        images,
        mean=[m * 255 for m in spec.mean],
        std=[s * 255 for s in spec.std],
        dtype=types.FLOAT16 if fp16 else types.FLOAT,
        output_layout="CHW",
    )
    anchors = np.asarray(default_boxes(spec, "ltrb")).reshape(-1).tolist()
    enc_boxes, enc_labels = fn.box_encoder(boxes, labels, criteria=spec.match_iou, anchors=anchors)
    if gpu:
        enc_boxes, enc_labels = enc_boxes.gpu(), enc_labels.gpu()
    if with_gt:  # the augmented ground truth too (tests)
        return images, enc_boxes, enc_labels, boxes, labels
    return images, enc_boxes, enc_labels


class DaliTrainLoader:
    """Iterates (images (N,3,300,300), boxes (N,8732,4) xywh, labels (N,8732) int64) per epoch,
    with the interface of ``training.data.TorchTrainLoader``; its state (reader position, random
    generators) is saved with the checkpoint for exact resume.

    Each rank reads its own shard; ``len()`` is the number of full batches of the shard.
    """

    def __init__(
        self,
        data: Path,
        batch_size: int,
        rank: int,
        world_size: int,
        num_threads: int,
        seed: int,
        device: torch.device,
        fp16: bool = False,
        state: str | None = None,
        augment: bool | Augment = True,
        images: list[str] | None = None,
        split: str = "train2017",
    ) -> None:
        """``state``: a ``state()`` of an earlier run to continue from; ``augment``: the recipe's
        augmentation (True), resize and normalise only (False), or an ``Augment``; ``images``:
        read only these files (relative to the split folder; ``subset_files``)."""
        if isinstance(augment, bool):
            augment = RECIPE if augment else NO_AUGMENT
        gpu = device.type == "cuda"
        self.pipe = ssd_train_pipeline(
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device.index if gpu else None,
            seed=seed,
            file_root=str(data / split),
            annotations_file=str(data / "annotations" / f"instances_{split}.json"),
            shard_id=rank,
            num_shards=world_size,
            gpu=gpu,
            fp16=fp16,
            augment=augment,
            images=images,
            prefetch_queue_depth=2,
            enable_checkpointing=True,
            checkpoint=state,
        )
        self.pipe.build()
        self.iterator = DALIGenericIterator(
            [self.pipe],
            ["images", "boxes", "labels"],
            reader_name=READER,
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=True,
        )
        self.batch_size = batch_size

    def __len__(self) -> int:
        return len(self.iterator)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        pass  # the pipeline's own state already holds the position

    def __iter__(self):
        for (batch,) in self.iterator:
            yield batch["images"], batch["boxes"], batch["labels"].long().squeeze(-1)

    def state(self) -> str:
        """The pipeline's serialised state (reader position, random generators)."""
        return self.iterator.checkpoints()[0]
