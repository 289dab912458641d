"""Train, evaluate or benchmark SSD300 on a COCO-format folder.

    torchrun --nproc_per_node=N training/train.py --data /coco [--save runs/ssd] [--amp] ...

``main`` reads top to bottom as the training flow; everything it calls is named for what it does.
"""

from __future__ import annotations

import json
import logging
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `torchrun training/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ssdcore.labels import ClassList
from training import distributed as D
from training.checkpoint import (
    FORMAT,
    CheckpointError,
    atomic_save,
    extract_state_dict,
    lock_folder,
    read_checkpoint,
    record_checkpoint,
    remove_partial_writes,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from training.config import TrainConfig, parse_config
from training.data.coco import DataError, check_data_folder, dataset_classes
from training.downloads import DownloadError
from training.engine import (
    NonFiniteLoss,
    StepStats,
    check_nonfinite,
    evaluate,
    param_groups,
    set_warmup_lr,
    train_step,
)
from training.faults import fault_payload, with_faults
from training.loss import MultiboxLoss
from training.metrics_log import MetricsLog, progress
from training.model import build_model, freeze_backbone
from training.pretrained import (
    NVIDIA,
    classes_of_checkpoint,
    fetch_backbone,
    fetch_nvidia,
    load_pretrained,
    local_backbone,
    resolve_checkpoint_arg,
)

log = logging.getLogger("train")


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(argv)
    info = D.setup(cfg.device)
    logging.basicConfig(
        level=logging.INFO if info.is_main else logging.WARNING,
        format=f"%(asctime)s [rank {info.rank}] %(message)s",
    )
    classes = validate(cfg, info)  # clear errors before any work; the dataset's classes
    save_lock = claim_save_folder(cfg, info)  # noqa: F841 (held while the job runs)
    start = fetch_start_weights(cfg, info)  # downloads once per machine, before any work
    seed = cfg.seed if cfg.seed is not None else 0
    D.seed_everything(seed + info.rank)
    amp = cfg.amp and info.device.type == "cuda"
    configure_backends(cfg, info)

    model = build_model(cfg.backbone, start.backbone, classes.num_classes)
    if start.pretrained is not None:
        transfer_pretrained(model, start.pretrained, classes, cfg.backbone)
    freeze(model, cfg)
    model.to(info.device)
    loss_fn = with_faults(MultiboxLoss().to(info.device), info.rank)
    lr = cfg.learning_rate * info.world_size * cfg.batch_size / 32
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.multistep, gamma=0.1)
    scaler = torch.amp.GradScaler(info.device.type, enabled=amp)
    stats, start_epoch, skip, data_state = StepStats(), 0, 0, None
    if cfg.checkpoint:  # evaluation uses the checkpoint's label order, which may differ
        start_epoch, skip, data_state, classes = restore(
            cfg, info, model, optimizer, scheduler, scaler, stats, classes, start
        )
    ddp = (
        DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if info.distributed
        else model
    )

    if cfg.mode == "evaluation":
        return run_evaluation(cfg, info, model, classes, amp, epoch=start_epoch - 1)
    loader = build_loader(cfg, info, seed, amp, data_state)
    if cfg.mode.startswith("benchmark"):
        return run_benchmark(cfg, info, ddp, loss_fn, optimizer, scaler, loader, amp)

    metrics = MetricsLog(cfg, info)
    stop = install_sigterm_handler()
    metrics.event(
        "start",
        lr=lr,
        world_size=info.world_size,
        batches_per_epoch=len(loader),
        config=cfg.to_dict(),
        classes=classes.public(),
    )
    for epoch in range(start_epoch, cfg.epochs):
        loader.set_epoch(epoch, skip)
        bar = progress(info, len(loader), epoch, cfg.epochs, initial=skip)
        done = skip
        for batch in loader:
            set_warmup_lr(optimizer, scheduler, stats.iteration, cfg.warmup)
            t0 = time.perf_counter()
            loss, stepped = train_step(
                ddp,
                loss_fn,
                optimizer,
                scaler,
                batch,
                info.device,
                amp,
                cfg.data_layout == "channels_last" and info.device.type == "cuda",
                info,
            )
            stats.skipped_steps += not stepped
            stats.iteration += 1
            done += 1
            check_nonfinite(stats, loss, cfg.max_nan_steps, info)
            metrics.step(
                epoch,
                stats,
                loss,
                optimizer,
                cfg.batch_size * info.world_size,
                time.perf_counter() - t0,
                bar,
            )
            if D.any_rank(stop.requested, info):
                save(
                    cfg,
                    info,
                    model,
                    classes,
                    optimizer,
                    scheduler,
                    scaler,
                    stats,
                    epoch,
                    done,
                    loader,
                )
                log.info("SIGTERM: checkpoint written at epoch %d, batch %d; exiting", epoch, done)
                return 0
        bar.close()
        skip = 0
        set_warmup_lr(optimizer, scheduler, 0, 0)  # hand the scheduled lr back to the scheduler
        scheduler.step()
        if epoch in cfg.evaluation:
            run_evaluation(cfg, info, model, classes, amp, epoch, metrics)
        save(cfg, info, model, classes, optimizer, scheduler, scaler, stats, epoch + 1, 0, loader)
    checksums = D.all_gather_objects(
        sum(float(p.detach().double().sum()) for p in model.parameters()), info
    )
    metrics.event(
        "end",
        iteration=stats.iteration,
        skipped_steps=stats.skipped_steps,
        parameter_checksums=checksums,
    )
    D.cleanup()
    return 0


# ----------------------------------------------------------------------------- steps of main


def validate(cfg: TrainConfig, info: D.DistInfo) -> ClassList:
    """Stop every rank with a clear message when the job cannot run; return the dataset's
    classes (those of the training annotations; the validation set must declare the same)."""
    data = Path(cfg.data)
    splits = (
        ("val2017",)
        if cfg.mode in ("evaluation", "benchmark-inference")
        else ("train2017", "val2017")
    )
    error, classes = "", None
    try:
        check_data_folder(data, splits)
        if info.is_main:  # one full parse is enough (COCO's train JSON is ~450 MB per process)
            classes = dataset_classes(data, splits)
    except DataError as exc:
        error = f"error: {exc}"
    D.exit_together(error, info, "error: rank 0 found the data unusable (its message says why)")
    if cfg.mode in ("training", "benchmark-training") and cfg.batch_size < 2:
        raise SystemExit(
            "error: --batch-size must be at least 2 per process (BatchNorm on the "
            "1x1 feature map cannot train on one image)"
        )
    if cfg.mode == "evaluation" and not cfg.checkpoint:
        raise SystemExit("error: --mode evaluation needs --checkpoint")
    if cfg.checkpoint and cfg.pretrained:
        raise SystemExit(
            "error: --checkpoint resumes a run, --pretrained starts a new one from other "
            "weights: pass one of them"
        )
    if cfg.data_backend == "dali":
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            raise SystemExit("error: DALI is not installed; use --data-backend torch") from None
    classes = D.from_main(lambda: classes, info)
    if info.is_main:
        log.info("%d classes: %s", len(classes), classes.summary())
    return classes


@dataclass(frozen=True)
class StartWeights:
    backbone: Path | None = None  # torchvision ResNet state dict
    pretrained: Path | None = None  # detection checkpoint to transfer
    checkpoint: Path | None = None  # --checkpoint nvidia, fetched


def fetch_start_weights(cfg: TrainConfig, info: D.DistInfo) -> StartWeights:
    """The files the job starts from, downloaded by local rank 0 of each machine while the
    others wait (then they find them in the cache). Resuming and evaluating start from the
    checkpoint, benchmarks from random weights (they do not change the speed)."""
    if cfg.checkpoint:
        if cfg.checkpoint != NVIDIA:
            return StartWeights()
        fetch_here = lambda: StartWeights(checkpoint=fetch_nvidia(info.local_rank == 0))  # noqa: E731
    elif cfg.mode != "training":
        return StartWeights()
    elif cfg.pretrained:  # no ImageNet download: the checkpoint has a trained backbone
        fetch_here = lambda: StartWeights(  # noqa: E731
            pretrained=resolve_checkpoint_arg(cfg.pretrained, info.local_rank == 0)
        )
    elif cfg.backbone_path:  # checked as a download would be: the right ResNet, weights only
        fetch_here = lambda: StartWeights(  # noqa: E731
            backbone=local_backbone(Path(cfg.backbone_path), cfg.backbone)
        )
    elif cfg.backbone_weights == "none":
        log.warning("--backbone-weights none: the backbone starts from random weights")
        return StartWeights()
    else:
        fetch_here = lambda: StartWeights(  # noqa: E731
            backbone=fetch_backbone(cfg.backbone, cfg.backbone_weights, info.local_rank == 0)
        )
    error, start = "", StartWeights()
    if info.local_rank == 0:
        try:
            start = fetch_here()
        except DownloadError as exc:
            error = f"error: {exc}"
    D.exit_together(error, info, "error: a download failed on another rank (its message says why)")
    if info.local_rank != 0:  # from the cache (the same $TORCH_HOME on one machine), no network
        try:
            start = fetch_here()
        except DownloadError as exc:
            error = f"error: {exc}"
    D.exit_together(error, info, "error: another rank could not read the downloaded file")
    if start.backbone is not None:
        log.info("backbone: ImageNet weights %s from %s", cfg.backbone_weights, start.backbone)
    return start


def transfer_pretrained(model, path: Path, classes: ClassList, backbone: str) -> None:
    try:
        report = load_pretrained(model, path, classes, backbone)
    except CheckpointError as exc:
        raise SystemExit(f"error: cannot start from {path}: {exc}") from None
    for line in report.lines():
        log.info("%s", line)


def freeze(model, cfg: TrainConfig) -> None:
    frozen = freeze_backbone(model, cfg.trainable_layers())
    if frozen:
        count = sum(p.numel() for m in model.frozen_modules for p in m.parameters(recurse=True))
        log.info("frozen backbone stages: %s (%d parameters)", ", ".join(frozen), count)


def configure_backends(cfg: TrainConfig, info: D.DistInfo) -> None:
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32


def claim_save_folder(cfg: TrainConfig, info: D.DistInfo):
    """Rank 0 locks --save (one job per folder) and deletes what a crashed write left there;
    when it cannot, every rank stops with the same error (none is left waiting for it)."""
    if not (cfg.save and cfg.mode == "training"):
        return None
    lock, error = None, ""
    if info.is_main:
        try:
            lock = lock_folder(cfg.save)
        except CheckpointError as exc:  # FolderBusy or an unusable folder
            error = f"error: {exc}"
    D.exit_together(error, info, "error: rank 0 could not claim the save folder")
    if lock is not None:
        for partial in remove_partial_writes(cfg.save):
            log.warning("removed %s, left by a crash in the middle of a checkpoint write", partial)
    return lock


def build_loader(cfg: TrainConfig, info: D.DistInfo, seed: int, amp: bool, state):
    from training.data import DaliLoader, TorchTrainLoader, subset_files

    data = Path(cfg.data)
    if cfg.data_backend == "dali":
        images = None
        if cfg.max_train_images:  # one parse of the annotations, on rank 0, for every rank
            images = D.from_main(lambda: subset_files(data, cfg.max_train_images), info)
        return DaliLoader(
            data,
            cfg.batch_size,
            info.rank,
            info.world_size,
            cfg.num_workers,
            seed + info.rank,
            info.device,
            amp,
            state,
            cfg.augment,
            images,
        )
    return TorchTrainLoader(
        data,
        cfg.batch_size,
        info.rank,
        info.world_size,
        cfg.num_workers,
        seed,
        cfg.max_train_images,
        cfg.augment,
    )


class StopFlag:
    requested = False


def install_sigterm_handler() -> StopFlag:
    flag = StopFlag()

    def handler(signum, frame):
        flag.requested = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def save(
    cfg, info, model, classes, optimizer, scheduler, scaler, stats, epoch: int, batch: int, loader
) -> None:
    """Collective: every rank contributes its RNG and data state; rank 0 writes atomically."""
    per_rank = D.all_gather_objects({"rng": rng_state(), "data": loader.state()}, info)
    if not cfg.save or not info.is_main:
        return
    folder = Path(cfg.save)
    name = f"epoch_{epoch - 1}.pt" if batch == 0 else "interrupted.pt"
    atomic_save(
        {
            "format": FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,  # next epoch to run
            "batch": batch,  # batches of that epoch already done
            "iteration": stats.iteration,
            "skipped_steps": stats.skipped_steps,
            "config": cfg.to_dict(),
            "classes": classes.to_json(),
            "label_map": dict(enumerate(("background", *classes.names))),  # NVIDIA's key
            "rank_state": per_rank,
            **fault_payload(epoch, batch),
        },
        folder / name,
    )
    record_checkpoint(folder, name, epoch=epoch, batch=batch, iteration=stats.iteration)


def restore(
    cfg, info, model, optimizer, scheduler, scaler, stats, classes: ClassList, start: StartWeights
) -> tuple[int, int, str | None, ClassList]:
    """Load weights (any checkpoint of these classes) and, for ours, the full training state.

    Returns (epoch, batch, data state, classes): the checkpoint's class list, whose order is
    that of the model's labels (the data's may list the same categories in another order,
    which evaluation accepts and training does not)."""
    try:
        path, skipped = resolve_checkpoint(start.checkpoint or cfg.checkpoint)
        for warning in skipped:
            log.warning("%s", warning)
        obj = read_checkpoint(path)
        state = extract_state_dict(obj)
        trained_on = classes_of_checkpoint(obj, state) or classes
        if not trained_on.same_categories(classes):
            raise CheckpointError(
                f"it was trained on the classes {trained_on.summary()}; the data declares "
                f"{classes.summary()} (use --pretrained to start from it on other classes)"
            )
        if cfg.mode == "training" and trained_on != classes:
            raise CheckpointError(
                "the training annotations list its categories in another order than the run "
                "it resumes (labels are positions in that list): restore the order "
                f"{trained_on.summary()}"
            )
        model.load_state_dict(state)
    except (CheckpointError, DownloadError, RuntimeError) as exc:
        raise SystemExit(f"error: cannot use checkpoint {cfg.checkpoint}: {exc}") from None
    if obj.get("format") != FORMAT or cfg.mode == "evaluation":
        epoch = int(obj.get("epoch", 0)) if isinstance(obj.get("epoch"), int) else 0
        return epoch, 0, None, trained_on
    try:
        optimizer.load_state_dict(obj["optimizer"])
    except (ValueError, KeyError) as exc:
        raise SystemExit(
            f"error: cannot resume the optimizer of {path}: {exc} (was the run started with "
            "other --freeze-backbone / --trainable-backbone-layers? pass the same ones)"
        ) from None
    scheduler.load_state_dict(obj["scheduler"])
    scaler.load_state_dict(obj["scaler"])
    stats.iteration, stats.skipped_steps = obj["iteration"], obj["skipped_steps"]
    ranks = obj["rank_state"]
    mine = ranks[info.rank] if info.rank < len(ranks) else ranks[0]
    set_rng_state(mine["rng"])
    log.info("resumed from %s at epoch %d, batch %d", path, obj["epoch"], obj["batch"])
    return obj["epoch"], obj["batch"], mine["data"], trained_on


def run_evaluation(cfg, info, model, classes: ClassList, amp, epoch: int, metrics=None) -> int:
    stats, summary = evaluate(
        model,
        Path(cfg.data),
        classes,
        cfg.eval_batch_size,
        info,
        amp,
        workers=min(cfg.num_workers, 4),
    )
    if info.is_main:
        print(summary, end="", flush=True)
        log.info("epoch %d: mAP %.4f, mAP@0.5 %.4f", epoch, stats["AP"], stats["AP50"])
        if metrics is not None:
            metrics.event("eval", epoch=epoch, **stats)
    return 0


def run_benchmark(cfg, info, ddp, loss_fn, optimizer, scaler, loader, amp) -> int:
    """Median images/s over --benchmark-iterations after --benchmark-warmup, data wait excluded."""
    sync = torch.cuda.synchronize if info.device.type == "cuda" else (lambda: None)
    rates: list[float] = []
    total = cfg.benchmark_warmup + cfg.benchmark_iterations
    channels_last = cfg.data_layout == "channels_last" and info.device.type == "cuda"
    if cfg.mode == "benchmark-training":
        ddp.train()
        while len(rates) < total:
            for batch in loader:  # the time to fetch a batch is not counted
                sync()
                t0 = time.perf_counter()
                train_step(ddp, loss_fn, optimizer, scaler, batch, info.device, amp, channels_last)
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
        with torch.no_grad(), torch.autocast(info.device.type, dtype=torch.float16, enabled=amp):
            for _ in range(total):
                sync()
                t0 = time.perf_counter()
                ddp(images)
                sync()
                rates.append(images.shape[0] / (time.perf_counter() - t0))
    per_rank = statistics.median(rates[cfg.benchmark_warmup :])
    everyone = D.sum_over_ranks(per_rank, info)
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


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NonFiniteLoss as exc:
        logging.getLogger("train").error("%s", exc)
        D.cleanup()
        sys.exit(3)
    except KeyboardInterrupt:
        sys.exit(130)
