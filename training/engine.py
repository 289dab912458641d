"""Training and evaluation steps: explicit AMP, explicit DDP, the service's postprocess for eval."""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ssdcore.labels import ClassList
from ssdcore.postprocess import postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS
from training.coco_eval import coco_evaluate
from training.data import ignore_sigterm
from training.data.coco import CocoEvalDataset, eval_collate
from training.distributed import DistInfo, all_gather_objects, any_rank, sum_over_ranks
from training.export.served import ServedSSD, candidates_above


def autocast(device: torch.device, amp: bool) -> torch.autocast:
    """Mixed precision where ``amp``: fp16 on CUDA (with GradScaler), bf16 on CPU
    (``--cpu-bf16``: no scaler, bf16 has fp32's exponent range)."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=amp)


@dataclass
class StepStats:
    """Counters of one run, restored on resume."""

    iteration: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for inf/NaN gradients
    nonfinite_streak: int = 0
    losses: list[float] = field(default_factory=list)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on BatchNorm parameters and biases (1-d tensors); frozen ones left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def set_warmup_lr(optimizer, scheduler, iteration: int, warmup: int) -> None:
    """Linear warmup on top of the epoch schedule: lr = scheduled lr x iteration / warmup."""
    factor = 1.0 if warmup <= 0 or iteration >= warmup else iteration / warmup
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr * factor


class NonFiniteLoss(RuntimeError):
    pass


class Step(NamedTuple):
    loss: float  # this rank's
    stepped: bool  # the optimizer stepped (not skipped for a non-finite loss or an overflow)
    nonfinite: bool  # the loss was not finite on some rank (every rank skipped the step)


@dataclass(frozen=True)
class TrainStep:
    """One optimizer step, called with a batch; holds what every step of a run shares.

    A non-finite loss on any rank makes every rank skip the step together (parameters stay
    identical across ranks; one all-reduce of a flag decides it, and ``Step.nonfinite`` carries
    it to :func:`check_nonfinite`); with AMP, GradScaler also skips steps whose gradients
    overflowed.
    """

    model: nn.Module  # DDP-wrapped when distributed
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool = False
    channels_last: bool = False
    info: DistInfo | None = None  # None: this process decides alone

    def __call__(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> Step:
        optimizer, scaler = self.optimizer, self.scaler
        images, boxes, labels = (t.to(self.device, non_blocking=True) for t in batch)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            locs, logits = self.model(images)
        loss = self.loss_fn(locs.float(), logits.float(), boxes.transpose(1, 2).float(), labels)
        value = float(loss.detach())
        bad = not math.isfinite(value)
        if self.info is not None:
            bad = any_rank(bad, self.info)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            # keep DDP's collectives in step: every rank runs backward on something finite
            (loss.nan_to_num(0.0, 0.0, 0.0) * 0.0).backward()
            optimizer.zero_grad(set_to_none=True)
            return Step(value, False, True)
        scale_before = scaler.get_scale() if scaler.is_enabled() else None
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        stepped = scale_before is None or scaler.get_scale() >= scale_before
        return Step(value, stepped, False)


def check_nonfinite(stats: StepStats, step: Step, max_streak: int) -> None:
    """Count consecutive steps whose loss was not finite on some rank (``TrainStep`` agreed on
    it across ranks already); every rank stops together when it persists."""
    bad = step.nonfinite
    stats.nonfinite_streak = stats.nonfinite_streak + 1 if bad else 0
    if stats.nonfinite_streak > max_streak:
        raise NonFiniteLoss(
            f"the loss was not finite for {stats.nonfinite_streak} consecutive steps; stopping"
        )


def make_eval_loader(
    data: Path, batch_size: int, info: DistInfo, workers: int, max_images: int | None = None
) -> tuple[CocoEvalDataset, DataLoader]:
    """Each rank takes every world_size-th image: every image exactly once, no padding."""
    dataset = CocoEvalDataset(data, "val2017", max_images=max_images)
    indices = list(range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(
        torch.utils.data.Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=ignore_sigterm,
        collate_fn=eval_collate,
    )
    return dataset, loader


@torch.no_grad()
def predict(
    model: nn.Module, loader: Iterable, classes: ClassList, device: torch.device, amp: bool
) -> list[dict]:
    """COCO-format detections in the dataset's category ids: the reference decode (per class
    score > 0.05, top 200, NMS 0.5, top 200) with the serving postprocess, on every candidate
    above the threshold (``candidates_above``)."""
    served = ServedSSD(model).to(device).eval()
    pp = REFERENCE_POSTPROCESS
    results: list[dict] = []
    for images, ids, sizes in loader:
        with autocast(device, amp):
            boxes, probs = served.decode(images.to(device))
        boxes, probs = boxes.float(), probs.float()
        for b, p, image_id, (h, w) in zip(boxes, probs, ids, sizes):
            cand = (t.cpu().numpy() for t in candidates_above(b, p, pp.score_threshold))
            det = postprocess(*cand, pp)
            xyxy = det.boxes.astype(np.float64) * np.array([w, h, w, h])
            for (x1, y1, x2, y2), score, cid in zip(
                xyxy, det.scores, classes.category_ids(det.classes)
            ):
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(cid),
                        "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        "score": round(float(score), 5),
                    }
                )
    return results


def evaluate(
    model: nn.Module,
    data: Path,
    classes: ClassList,
    batch_size: int,
    info: DistInfo,
    amp: bool,
    workers: int = 2,
    max_images: int | None = None,
) -> tuple[dict[str, float], str]:
    """COCO mAP on val2017; every rank predicts its share, rank 0 runs COCOeval."""
    was_training = model.training
    model.eval()
    dataset, loader = make_eval_loader(data, batch_size, info, workers, max_images)
    t0 = time.perf_counter()
    mine = predict(model, loader, classes, info.device, amp)
    gathered = all_gather_objects(mine, info)
    model.train(was_training)
    if not info.is_main:
        return {}, ""
    detections = [d for part in gathered for d in part]
    ids = [im["id"] for im in dataset.images] if max_images else None
    stats, summary = coco_evaluate(dataset.annotation_file, detections, ids)
    summary += (
        f"({len(dataset)} images, {len(detections)} detections, {time.perf_counter() - t0:.1f} s)\n"
    )
    return stats, summary


def benchmark(cfg, info: DistInfo, train_step: TrainStep, loader) -> int:
    """The benchmark modes of the training job: median images/s over --benchmark-iterations
    after --benchmark-warmup (the training job's own steps, or forward passes on one batch),
    the wait for data excluded; the sum over ranks printed as one JSON line by rank 0."""
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    rates: list[float] = []
    total = cfg.benchmark_warmup + cfg.benchmark_iterations
    ddp, amp, channels_last = train_step.model, train_step.amp, train_step.channels_last
    if cfg.mode == "benchmark-training":
        ddp.train()
        while len(rates) < total:
            for batch in loader:  # the time to fetch a batch is not counted
                sync()
                t0 = time.perf_counter()
                train_step(batch)
                sync()
                rates.append(batch[0].shape[0] / (time.perf_counter() - t0))
                if len(rates) >= total:
                    break
    else:  # forward only, on one real batch already on the device (no data loading, no NMS)
        ddp.eval()
        images = next(iter(loader))[0].to(info.device)
        reps = -(-cfg.eval_batch_size // images.shape[0])
        images = images.repeat(reps, 1, 1, 1)[: cfg.eval_batch_size]
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad(), autocast(info.device, amp):
            for _ in range(total):
                sync()
                t0 = time.perf_counter()
                ddp(images)
                sync()
                rates.append(images.shape[0] / (time.perf_counter() - t0))
    per_rank = statistics.median(rates[cfg.benchmark_warmup :])
    everyone = sum_over_ranks(per_rank, info)
    if info.is_main:
        batch = cfg.batch_size if cfg.mode == "benchmark-training" else cfg.eval_batch_size
        result = {
            "mode": cfg.mode,
            "median_images_per_s_total": everyone,
            "median_images_per_s_per_process": everyone / info.world_size,
            "world_size": info.world_size,
            "batch_size": batch,
            "amp": amp,
            "device": str(info.device),
            "iterations": cfg.benchmark_iterations,
        }
        print(json.dumps(result), flush=True)
    return 0
