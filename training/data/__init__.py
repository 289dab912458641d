"""Training data loaders: DALI (default; ``training.data.dali.DaliTrainLoader``, imported only
when used) or the torchvision fallback here, one interface.

Both iterate (images (N,3,300,300) normalised, boxes (N,8732,4) xywh, labels (N,8732) int64) for
one epoch per ``for`` loop and can report/restore their position for exact resume.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from training.data.coco import CocoSplit, CocoTrainDataset


def ignore_sigterm(worker_id: int) -> None:
    """Workers leave SIGTERM to the main process, which checkpoints and then shuts them down
    (a preemption signals every process of the job at once)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class TorchTrainLoader:
    """The DALI-free pipeline; order fixed by (seed, epoch), augmentation by (seed, epoch, image)."""

    def __init__(
        self,
        data: Path,
        batch_size: int,
        rank: int,
        world_size: int,
        workers: int,
        seed: int,
        max_images: int | None = None,
        augment: bool = True,
    ) -> None:
        self.dataset = CocoTrainDataset(
            data, "train2017", max_images=max_images, augment=augment, seed=seed
        )
        self.sampler = DistributedSampler(
            self.dataset,
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=True,
        )
        self.batch_size = batch_size
        self.workers = workers
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches
        self.sampler.set_epoch(epoch)
        self.dataset.epoch = epoch  # the workers of this epoch get a copy with it

    def __iter__(self):
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.rank)) % 2**62)
        loader = DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=self.workers,
            drop_last=True,
            generator=g,
            worker_init_fn=ignore_sigterm,
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        for i, batch in enumerate(loader):
            if i < self.skip:
                continue
            yield batch
        self.skip = 0

    def state(self) -> str | None:
        return None  # position is (epoch, batch) in the checkpoint; the order is reproducible


def subset_files(data: Path, max_images: int) -> list[str]:
    """The files of ``--max-train-images``: the first annotated training images by id, the same
    subset as the torchvision loader's."""
    subset = CocoSplit(data, "train2017", skip_empty=True, max_images=max_images)
    return [im["file_name"] for im in subset.images]
