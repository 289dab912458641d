"""Train, evaluate or benchmark SSD300 on a COCO-format folder.

    torchrun --nproc_per_node=N training/train.py --data /coco [--save runs/ssd] [--amp] ...

``main`` reads top to bottom as the training flow; everything it calls is named for what it does.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `torchrun training/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--deterministic" in sys.argv[1:]:  # before any import: MKL reads it at its first call
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # = reproducibility.MKL_CBWR_ENV

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ssdcore.labels import ClassList
from training import distributed as D
from training.checkpoint import (
    CheckpointError,
    Position,
    TrainState,
    classes_of_checkpoint,
    extract_state_dict,
    is_ours,
    lock_folder,
    prune_checkpoints,
    read_checkpoint,
    remove_partial_writes,
    resolve_checkpoint,
    rng_state,
    start_epoch_of,
)
from training.config import TrainConfig, parse_config
from training.data.coco import DataError, check_data_folder, dataset_classes
from training.downloads import DownloadError
from training.engine import (
    NonFiniteLoss,
    StepStats,
    TrainStep,
    benchmark,
    check_nonfinite,
    evaluate,
    param_groups,
    set_warmup_lr,
)
from training.loss import MultiboxLoss
from training.metrics_log import MetricsLog, progress
from training.model import build_model, freeze_backbone
from training.pretrained import (
    NVIDIA,
    fetch_backbone,
    fetch_nvidia,
    load_pretrained,
    local_backbone,
    resolve_checkpoint_arg,
)
from training.reproducibility import make_deterministic, resume_threads, set_threads

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
    cuda = info.device.type == "cuda"
    amp = cfg.amp if cuda else cfg.cpu_bf16  # fp16 on CUDA, bf16 on CPU (training steps only)
    fp16 = amp and cuda  # GradScaler, DALI's fp16 output and evaluation: CUDA's AMP only
    configure_backends(cfg, info)

    model = build_model(cfg.backbone, start.backbone, classes.num_classes)
    if start.pretrained is not None:
        transfer_pretrained(model, start.pretrained, classes, cfg.backbone)
    freeze(model, cfg)
    model.to(info.device)
    loss_fn = MultiboxLoss().to(info.device)
    lr = cfg.learning_rate * info.world_size * cfg.batch_size / 32
    optimizer = torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=lr, momentum=cfg.momentum)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.multistep, gamma=0.1)
    scaler = torch.amp.GradScaler(info.device.type, enabled=fp16)
    state = TrainState(model, optimizer, scheduler, scaler, StepStats(), cfg.to_dict(), classes)
    at = Position(0, 0)
    if cfg.checkpoint:  # evaluation uses the checkpoint's label order, which may differ
        at = restore(cfg, info, state, start)
    classes, stats = state.classes, state.stats
    ddp = (
        DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if info.distributed
        else model
    )

    if cfg.mode == "evaluation":
        return run_evaluation(cfg, info, model, classes, fp16, epoch=at.epoch - 1)
    loader = build_loader(cfg, info, seed, fp16, at.data)
    channels_last = cfg.data_layout == "channels_last" and info.device.type == "cuda"
    train_step = TrainStep(ddp, loss_fn, optimizer, scaler, info.device, amp, channels_last, info)
    if cfg.mode.startswith("benchmark"):
        return benchmark(cfg, info, train_step, loader)

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
    skip = at.batch
    for epoch in range(at.epoch, cfg.epochs):
        loader.set_epoch(epoch, skip)
        bar = progress(info, len(loader), epoch, cfg.epochs, initial=skip)
        done = skip
        for batch in loader:
            set_warmup_lr(optimizer, scheduler, stats.iteration, cfg.warmup)
            t0 = time.perf_counter()
            step = train_step(batch)
            stats.skipped_steps += not step.stepped
            stats.iteration += 1
            done += 1
            check_nonfinite(stats, step, cfg.max_nan_steps)
            metrics.step(
                epoch,
                stats,
                step.loss,
                optimizer,
                cfg.batch_size * info.world_size,
                time.perf_counter() - t0,
                bar,
            )
            if D.any_rank(stop.requested, info):
                save(cfg, info, state, epoch, done, loader)
                log.info("SIGTERM: checkpoint written at epoch %d, batch %d; exiting", epoch, done)
                return 0
        bar.close()
        skip = 0
        set_warmup_lr(optimizer, scheduler, 0, 0)  # hand the scheduled lr back to the scheduler
        scheduler.step()
        if epoch in cfg.evaluation:
            run_evaluation(cfg, info, model, classes, fp16, epoch, metrics)
        save(cfg, info, state, epoch + 1, 0, loader)
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
    if cfg.keep_checkpoints < 0:
        raise SystemExit("error: --keep-checkpoints must be 0 (keep all) or more")
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
    """Threads (recorded in the config, so in every checkpoint), kernels, reproducibility."""
    cfg.threads = set_threads(cfg.threads)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    if cfg.deterministic:
        log.info(
            "--deterministic: %s, %d CPU threads", make_deterministic(info.device), cfg.threads
        )


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
    from training.data import TorchTrainLoader, subset_files

    data = Path(cfg.data)
    if cfg.data_backend == "dali":
        images = None
        if cfg.max_train_images:  # one parse of the annotations, on rank 0, for every rank
            images = D.from_main(lambda: subset_files(data, cfg.max_train_images), info)
        from training.data.dali import DaliTrainLoader

        return DaliTrainLoader(
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


def save(cfg, info, state: TrainState, epoch: int, batch: int, loader) -> None:
    """Collective: every rank contributes its RNG and data state; rank 0 writes atomically."""
    per_rank = D.all_gather_objects({"rng": rng_state(), "data": loader.state()}, info)
    if cfg.save and info.is_main:
        state.save(cfg.save, epoch, batch, per_rank)
        prune_checkpoints(cfg.save, cfg.keep_checkpoints)


def restore(cfg, info, state: TrainState, start: StartWeights) -> Position:
    """Load the weights (any checkpoint of these classes) and, from ours, the training state.

    Where to go on from; ``state.classes`` becomes the checkpoint's class list, whose order is
    that of the model's labels (the data's may list the same categories in another order,
    which evaluation accepts and training does not)."""
    classes = state.classes
    try:
        path, skipped = resolve_checkpoint(start.checkpoint or cfg.checkpoint)
        for warning in skipped:
            log.warning("%s", warning)
        obj = read_checkpoint(path)
        weights = extract_state_dict(obj)
        trained_on = classes_of_checkpoint(obj, weights) or classes
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
        state.model.load_state_dict(weights)
    except (CheckpointError, DownloadError, RuntimeError) as exc:
        raise SystemExit(f"error: cannot use checkpoint {cfg.checkpoint}: {exc}") from None
    state.classes = trained_on
    if not is_ours(obj) or cfg.mode == "evaluation":
        return Position(start_epoch_of(obj), 0)
    try:
        at = state.resume(obj, info.rank)
    except (ValueError, KeyError) as exc:
        raise SystemExit(
            f"error: cannot resume the optimizer of {path}: {exc} (was the run started with "
            "other --freeze-backbone / --trainable-backbone-layers? pass the same ones)"
        ) from None
    cfg.threads = resume_threads(obj.get("config", {}).get("threads"), cfg.deterministic)
    state.config = cfg.to_dict()
    log.info("resumed from %s at epoch %d, batch %d", path, at.epoch, at.batch)
    return at


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


def cli() -> int:
    """``main`` with its exits: 3 when the loss stayed non-finite, 130 on Ctrl-C."""
    try:
        return main()
    except NonFiniteLoss as exc:
        logging.getLogger("train").error("%s", exc)
        D.cleanup()
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(cli())
