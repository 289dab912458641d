"""Where a model's first weights come from: torchvision's ImageNet backbones, NVIDIA's published
COCO checkpoint, or any detection checkpoint transferred onto a dataset's own classes.

- ``--backbone-weights IMAGENET1K_V2`` (the default, as NVIDIA's current code): the torchvision
  file of the weights API, in torch's hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded
  once. ``SSD_BACKBONE_WEIGHTS_URL`` replaces its URL (mirrors, tests).
- ``nvidia``: ``nvidia_ssdpyt_amp_200703.pt`` from NGC (``SSD_NVIDIA_CHECKPOINT_URL`` replaces
  the URL), in the same cache. Its classes are COCO's. Its file name carries no hash: the download
  logs the file's SHA-256, the export records it, and ``SSD_NVIDIA_CHECKPOINT_SHA256`` pins it
  (the download and the cached file are both checked against it).
- :func:`transfer`: every tensor whose name and shape match is kept; the class heads are
  re-initialised when the class lists differ, and the rows of classes with the same name (and
  the background's) are copied over.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision

from ssdcore.labels import ClassList, fold_name
from training.checkpoint import (
    CheckpointError,
    backbone_of,
    classes_of_checkpoint,
    extract_state_dict,
    read_checkpoint,
)
from training.downloads import DownloadError, fetch
from training.model import SSD300

log = logging.getLogger("pretrained")

BACKBONE_WEIGHTS = ("IMAGENET1K_V2", "IMAGENET1K_V1", "none")
NVIDIA_CHECKPOINT_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/ssd_pyt_ckpt_amp/versions/20.06.0/files/"
    "nvidia_ssdpyt_amp_200703.pt"
)
NVIDIA = "nvidia"  # the value of --pretrained / --checkpoint that means NVIDIA's checkpoint


# ----------------------------------------------------------------------------- ImageNet backbone


def backbone_weights_url(arch: str, choice: str) -> str:
    """The URL of torchvision's ``arch`` weights ``choice`` (from its weights API).

    ResNet-18 and -34 have no IMAGENET1K_V2: they get IMAGENET1K_V1, with a warning.
    """
    override = os.environ.get("SSD_BACKBONE_WEIGHTS_URL")
    if override:
        return override
    enum = torchvision.models.get_model_weights(arch)
    if choice not in enum.__members__:
        fallback = "IMAGENET1K_V1"
        log.warning("%s has no %s weights in torchvision; using %s", arch, choice, fallback)
        choice = fallback
    return enum[choice].url


def check_backbone_file(path: Path, arch: str) -> None:
    """The file is a state dict that torchvision's ``arch`` loads strictly."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError("not a state dict")
    try:
        getattr(torchvision.models, arch)(weights=None).load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"not the weights of a torchvision {arch}: {str(exc)[:300]}") from None


def local_backbone(path: Path, arch: str) -> Path:
    """``--backbone-path``: a file that torchvision's ``arch`` loads strictly, weights only;
    DownloadError (an ``error:`` line, no traceback) when it is not."""
    try:
        check_backbone_file(path, arch)
    except Exception as exc:  # a missing file, a pickle with code in it, another ResNet, ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DownloadError(f"--backbone-path {path} is not usable for {arch}: {reason}") from None
    return path


def fetch_backbone(arch: str, choice: str, progress: bool = True) -> Path:
    """The local file of torchvision's ImageNet ``arch`` weights, downloaded when not cached."""
    return fetch(
        backbone_weights_url(arch, choice),
        what=f"the ImageNet weights of {arch} ({choice})",
        verify=lambda path: check_backbone_file(path, arch),
        alternatives=(
            ", or pass --backbone-path FILE (a torchvision ResNet state dict), "
            "or --backbone-weights none (a randomly initialised backbone)"
        ),
        progress=progress,
    )


# ----------------------------------------------------------------------------- NVIDIA checkpoint


def nvidia_checkpoint_url() -> str:
    return os.environ.get("SSD_NVIDIA_CHECKPOINT_URL") or NVIDIA_CHECKPOINT_URL


def _check_detection_checkpoint(path: Path) -> None:
    state = extract_state_dict(read_checkpoint(path))
    if "conf.0.weight" not in state or "loc.0.weight" not in state:
        raise ValueError("not an SSD300 checkpoint (no conf.0.weight / loc.0.weight)")


def fetch_nvidia(progress: bool = True) -> Path:
    """NVIDIA's published COCO checkpoint, downloaded once into torch's hub cache."""
    return fetch(
        nvidia_checkpoint_url(),
        what="NVIDIA's SSD300 COCO checkpoint",
        verify=_check_detection_checkpoint,
        alternatives=", or pass the path of a checkpoint file instead of 'nvidia'",
        progress=progress,
        sha256=os.environ.get("SSD_NVIDIA_CHECKPOINT_SHA256") or None,
    )


def resolve_checkpoint_arg(value: str | Path, progress: bool = True) -> Path:
    """``nvidia`` -> the cached (or downloaded) NVIDIA file; anything else is a path."""
    return fetch_nvidia(progress) if str(value) == NVIDIA else Path(value)


# ----------------------------------------------------------------------------- transfer


@dataclass
class TransferReport:
    source: str
    kept: list[str] = field(default_factory=list)  # target tensors taken whole from the source
    reinitialised: list[str] = field(default_factory=list)  # target tensors left as initialised
    copied_classes: list[tuple[str, int, int]] = field(default_factory=list)  # name, src, dst
    unused: list[str] = field(default_factory=list)  # source tensors with no place in the target
    total: int = 0

    def lines(self) -> list[str]:
        out = [
            f"pretrained {self.source}: transferred {len(self.kept)}/{self.total} tensors; "
            f"{len(self.reinitialised)} re-initialised, {len(self.unused)} source tensors unused"
        ]
        if self.reinitialised:
            out.append("re-initialised: " + ", ".join(self.reinitialised))
        if self.copied_classes:
            out.append(
                "class rows copied by name: "
                + ", ".join(f"{n} ({s} -> {d})" for n, s, d in self.copied_classes)
            )
        if self.unused:
            out.append(
                "unused: " + ", ".join(self.unused[:20]) + (" ..." * (len(self.unused) > 20))
            )
        return out


def class_row_map(source: ClassList | None, target: ClassList) -> list[tuple[str, int, int]]:
    """(name, source label, target label) of the classes both lists name alike (case and width
    folded), the background (0 -> 0) first."""
    pairs = [("background", 0, 0)]
    if source is None:
        return pairs
    by_name = {fold_name(n): i + 1 for i, n in enumerate(source.names)}
    for t, name in enumerate(target.names, start=1):
        s = by_name.get(fold_name(name))
        if s is not None:
            pairs.append((name, s, t))
    return pairs


@torch.no_grad()
def transfer(
    model: SSD300,
    state: dict[str, torch.Tensor],
    source_classes: ClassList | None,
    target_classes: ClassList,
    source: str = "checkpoint",
) -> TransferReport:
    """Load what fits of ``state`` into ``model`` (built for ``target_classes``).

    Class heads (``conf.*``) are taken whole only when both class lists are the same (or the
    source's is unknown and the shapes match); otherwise the model's fresh initialisation stays
    and the rows of every class named in both lists are copied (channel ``k * boxes + d`` of a
    head is class ``k``, default box ``d``).
    """
    report = TransferReport(source)
    same_classes = source_classes == target_classes or source_classes is None
    target = model.state_dict()
    report.total = len(target)
    nd = model.spec.boxes_per_location
    rows = class_row_map(source_classes, target_classes)
    copied_heads = 0
    for name, tensor in target.items():
        src = state.get(name)
        is_class_head = name.startswith("conf.")
        if src is not None and src.shape == tensor.shape and (same_classes or not is_class_head):
            tensor.copy_(src)
            report.kept.append(name)
            continue
        report.reinitialised.append(name)
        if is_class_head and src is not None and src.shape[1:] == tensor.shape[1:]:
            k = nd[int(name.split(".")[1])]
            for _, s_label, t_label in rows:
                tensor[t_label * k : (t_label + 1) * k] = src[s_label * k : (s_label + 1) * k]
            copied_heads += 1
    if not same_classes and copied_heads == 2 * len(nd):  # every head's weight and bias
        report.copied_classes = rows
    report.unused = [n for n, v in state.items() if n not in target or target[n].shape != v.shape]
    return report


def load_pretrained(
    model: SSD300, path: Path, target_classes: ClassList, backbone: str
) -> TransferReport:
    """Transfer a detection checkpoint (ours or NVIDIA's) onto ``model`` (a ``backbone`` SSD300).

    Refused: a file that is not an SSD300 checkpoint (a torchvision backbone file goes to
    --backbone-path), and one of another backbone (its layers would land on the wrong ones).
    """
    obj = read_checkpoint(path)
    state = extract_state_dict(obj)
    if "conf.0.weight" not in state or "loc.0.weight" not in state:
        raise CheckpointError(
            f"{path} is not an SSD300 checkpoint (no class and box heads); a torchvision "
            "backbone file goes to --backbone-path"
        )
    source_arch = backbone_of(state)
    if source_arch != backbone:
        hint = f": pass --backbone {source_arch}" if source_arch else ""
        raise CheckpointError(
            f"{path} has a {source_arch or 'unrecognised'} backbone and this run a {backbone} "
            f"one{hint}"
        )
    source_classes = classes_of_checkpoint(obj, state)
    if source_classes is None:
        log.warning("%s records no class list: its class heads are taken as they are", path)
    return transfer(model, state, source_classes, target_classes, source=str(path))
