"""Typed training configuration: the defaults are the recipe; saved in every checkpoint.

The command line of ``training/train.py`` is generated from this dataclass, with the reference's
flag names (and their short aliases), so there is one place that lists every option.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Mode = Literal["training", "evaluation", "benchmark-training", "benchmark-inference"]


@dataclass
class TrainConfig:
    data: str = (
        ""  # COCO 2017 layout: train2017/, val2017/, annotations/instances_{train,val}2017.json
    )
    epochs: int = 65
    batch_size: int = 32  # per process
    eval_batch_size: int = 32
    seed: int | None = None
    checkpoint: str | None = None  # resume from / evaluate this file
    save: str | None = None  # folder for epoch checkpoints
    mode: Mode = "training"
    evaluation: list[int] = field(default_factory=lambda: [21, 31, 37, 42, 48, 53, 59, 64])
    multistep: list[int] = field(default_factory=lambda: [43, 54])
    learning_rate: float = 2.6e-3  # per 32 images per process; scaled by world size x batch/32
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: int = 300  # iterations (the reference's CLI default of no warmup is a trap)
    benchmark_iterations: int = 20
    benchmark_warmup: int = 20
    backbone: str = "resnet50"
    # ImageNet start of the backbone (torchvision's weights API and cache; downloaded once)
    backbone_weights: Literal["IMAGENET1K_V2", "IMAGENET1K_V1", "none"] = "IMAGENET1K_V2"
    backbone_path: str | None = None  # a local torchvision ResNet state dict; wins over the above
    pretrained: str | None = (
        None  # a detection checkpoint (ours, NVIDIA's, or 'nvidia') to start from
    )
    freeze_backbone: bool = False  # = --trainable-backbone-layers 0
    trainable_backbone_layers: int | None = None  # 0..4 from layer3 back to conv1; default: all
    num_workers: int = 8
    amp: bool = True  # fp16 autocast + GradScaler on CUDA; ignored on CPU
    # bf16 autocast on CPU (oneDNN's AMX / AVX-512 BF16 kernels; no GradScaler, bf16 has
    # fp32's range): ResNet-18 training 2.3x faster on an AMX Xeon; evaluation stays fp32
    cpu_bf16: bool = False
    # the newest N epoch checkpoints stay (older ones are dropped from the manifest, then
    # deleted; N >= 2 keeps a fallback for a corrupted newest); 0 keeps every one
    keep_checkpoints: int = 0
    allow_tf32: bool = True
    data_layout: Literal["channels_first", "channels_last"] = "channels_last"
    log_interval: int = 20
    json_summary: str | None = None
    device: Literal["auto", "cuda", "cpu"] = "auto"
    data_backend: Literal["dali", "torch"] = "dali"
    augment: bool = True  # --no-augment: resize + normalise only (overfitting checks)
    max_train_images: int | None = None  # only the first N annotated images by id (both backends)
    max_nan_steps: int = 10  # consecutive non-finite losses before all ranks stop
    tensorboard: str | None = None
    # CPU threads of each process (torch's intra-op pool; default: torch's own choice, which
    # OMP_NUM_THREADS sets); recorded in checkpoints
    threads: int | None = None
    # bitwise reproducible steps: deterministic algorithms, MKL's reproducible mode, the thread
    # count of the checkpoint it resumes (docs/training.md#reproducible-runs says what it costs)
    deterministic: bool = False

    def trainable_layers(self) -> int:
        """Backbone stages that train (``training.model.freeze_backbone``): 4 is all of them."""
        if self.freeze_backbone:
            return 0
        return 4 if self.trainable_backbone_layers is None else self.trainable_backbone_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# reference short aliases
_ALIASES = {
    "data": ["-d"],
    "epochs": ["-e"],
    "batch_size": ["--bs"],
    "eval_batch_size": ["--ebs"],
    "seed": ["-s"],
    "learning_rate": ["--lr"],
    "momentum": ["-m"],
    "weight_decay": ["--wd"],
}
_CHOICES = {
    "mode": ["training", "evaluation", "benchmark-training", "benchmark-inference"],
    "backbone": ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"],
    "data_layout": ["channels_first", "channels_last"],
    "device": ["auto", "cuda", "cpu"],
    "data_backend": ["dali", "torch"],
    "backbone_weights": ["IMAGENET1K_V2", "IMAGENET1K_V1", "none"],
    "trainable_backbone_layers": [0, 1, 2, 3, 4],
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N training/train.py",
        description="Train, evaluate or benchmark SSD300 on a COCO-format folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [flag, *_ALIASES.get(f.name, [])]
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
            continue
        kwargs: dict[str, Any] = {"default": default, "dest": f.name}
        if f.name in _CHOICES:
            kwargs["choices"] = _CHOICES[f.name]
        if isinstance(default, list):
            kwargs.update(nargs="*", type=int)
        elif f.name in (
            "seed",
            "max_train_images",
            "trainable_backbone_layers",
            "threads",
        ) or isinstance(default, int):
            kwargs["type"] = int
        elif isinstance(default, float):
            kwargs["type"] = float
        if f.name == "data":
            kwargs["required"] = True
        p.add_argument(*names, **kwargs)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    cfg.data = str(Path(cfg.data))
    if cfg.freeze_backbone and cfg.trainable_backbone_layers not in (None, 0):
        build_parser().error("--freeze-backbone means --trainable-backbone-layers 0")
    return cfg
