"""The DALI training pipeline on the CPU: shapes, ranges, and targets that decode to the truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ssdcore.anchors import default_boxes
from ssdcore.postprocess import decode_boxes
from ssdcore.spec import SSD300
from training.box_coding import BoxEncoder
from training.data import TorchTrainLoader, subset_files
from training.data.coco import load_index
from training.data.dali import NO_AUGMENT, READER, Augment, DaliTrainLoader, ssd_train_pipeline

ANCHORS = np.array(default_boxes())


def make_pipeline(root, batch_size: int = 4, seed: int = 5, **options):
    """The training pipeline on the CPU over ``root``'s train2017, one shard."""
    pipe = ssd_train_pipeline(
        batch_size=batch_size,
        num_threads=2,
        device_id=None,
        seed=seed,
        file_root=str(root / "train2017"),
        annotations_file=str(root / "annotations" / "instances_train2017.json"),
        shard_id=0,
        num_shards=1,
        gpu=False,
        fp16=False,
        **options,
    )
    pipe.build()
    return pipe


def run_pipeline(root, augment: Augment, batches: int = 3):
    pipe = make_pipeline(root, augment=augment, with_gt=True)
    out = []
    for _ in range(batches):
        images, boxes, labels, gt_boxes, gt_labels = pipe.run()
        out.append(
            (
                np.array(images.as_tensor()),
                np.array(boxes.as_tensor()),
                np.array(labels.as_tensor()).reshape(4, -1),
                [np.array(gt_boxes[i]) for i in range(4)],
                [np.array(gt_labels[i]).reshape(-1) for i in range(4)],
            )
        )
    return out


@pytest.mark.parametrize("augment", [Augment(), NO_AUGMENT], ids=["recipe", "no-augment"])
def test_outputs_and_targets(synthetic_coco, augment):
    mean = np.array(SSD300.mean).reshape(3, 1, 1)
    std = np.array(SSD300.std).reshape(3, 1, 1)
    for images, boxes, labels, gt_boxes, gt_labels in run_pipeline(synthetic_coco, augment):
        assert images.shape == (4, 3, 300, 300) and images.dtype == np.float32
        pixels = images * std + mean  # back to [0, 1]
        assert pixels.min() >= -1e-3 and pixels.max() <= 1 + 1e-3
        assert boxes.shape == (4, 8732, 4) and labels.shape == (4, 8732)
        for i in range(4):
            positive = labels[i] > 0
            assert positive.any()
            assert set(labels[i][positive]) <= set(gt_labels[i].tolist())
            # targets -> offsets the network should predict -> decoded boxes == ground truth
            offsets = BoxEncoder().offsets(torch.from_numpy(boxes[i]))
            decoded = decode_boxes(offsets.t().unsqueeze(0).numpy(), ANCHORS)[0][positive]
            gt = gt_boxes[i]
            dist = np.abs(decoded[:, None, :] - gt[None, :, :]).max(-1)
            assert dist.min(axis=1).max() < 1e-4
            # every ground-truth box is the target of at least one anchor
            assert (dist.min(axis=0) < 1e-4).all()
            # background anchors keep their own box: zero offsets
            assert np.abs(offsets[~torch.from_numpy(positive)].numpy()).max() < 1e-4


def test_targets_match_the_python_encoder(synthetic_coco):
    """Without augmentation DALI's box encoder agrees with ours (up to ties between anchors)."""
    ((_images, boxes, labels, gt_boxes, gt_labels),) = run_pipeline(synthetic_coco, NO_AUGMENT, 1)
    enc = BoxEncoder()
    for i in range(4):
        ours_boxes, ours_labels = enc.encode(
            torch.from_numpy(gt_boxes[i]), torch.from_numpy(gt_labels[i]).long()
        )
        agree = (ours_labels.numpy() == labels[i]).mean()
        assert agree > 0.999
        same = ours_labels.numpy() == labels[i]
        np.testing.assert_allclose(ours_boxes.numpy()[same], boxes[i][same], atol=1e-5)


def test_sharding_splits_the_data(synthetic_coco):
    def ids(rank):
        loader = DaliTrainLoader(
            synthetic_coco, 2, rank, 2, 1, 0, torch.device("cpu"), augment=NO_AUGMENT
        )
        return len(loader)

    assert ids(0) == ids(1) == 4  # 16 images, 2 shards, batch 2


def test_iterator_api(synthetic_coco):
    it = DALIGenericIterator(
        [make_pipeline(synthetic_coco, batch_size=2, seed=1)],
        ["images", "boxes", "labels"],
        reader_name=READER,
        last_batch_policy=LastBatchPolicy.DROP,
    )
    assert len(it) == 8


def test_max_images_reads_the_same_subset_as_the_torchvision_loader(synthetic_coco):
    """--max-train-images: both backends train on the first N annotated images by id."""
    torch_subset = TorchTrainLoader(synthetic_coco, 2, 0, 1, 0, 0, max_images=5).dataset.images
    assert len(torch_subset) == 5
    assert [im["id"] for im in torch_subset] == sorted(im["id"] for im in torch_subset)
    five = subset_files(synthetic_coco, 5)
    loader = DaliTrainLoader(synthetic_coco, 1, 0, 1, 1, 0, torch.device("cpu"), images=five)
    assert len(loader) == 5  # one epoch is those 5 images, not all 16

    # one epoch of 5 is exactly those images (in the reader's shuffled order)
    pipe = make_pipeline(
        synthetic_coco,
        batch_size=5,
        augment=NO_AUGMENT,
        with_gt=True,
        images=[im["file_name"] for im in torch_subset],
    )
    gt_boxes = pipe.run()[3]
    index = load_index(synthetic_coco / "annotations" / "instances_train2017.json", True)
    expected = [
        index.boxes[im["id"]] / np.array([im["width"], im["height"]] * 2, np.float32)
        for im in torch_subset
    ]

    def which(boxes):
        same = [
            j for j, e in enumerate(expected) if e.shape == boxes.shape and np.allclose(e, boxes)
        ]
        assert len(same) == 1
        return same[0]

    assert sorted(which(np.array(gt_boxes[i])) for i in range(5)) == [0, 1, 2, 3, 4]
