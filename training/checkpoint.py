"""Checkpoints: NVIDIA's published format and ours, loaded safely; written atomically.

NVIDIA's file is ``{'model': state_dict, 'epoch', 'iteration', 'optimizer', 'scheduler',
'label_map'}`` with optional ``module.`` prefixes and fp16 tensors. Ours is a superset with
``format``, ``config``, the class list and the training state, written and read by
:class:`TrainState` alone. Every load uses ``torch.load(weights_only=True)``: a file that needs
arbitrary unpickling is refused, never executed. Also here: what a file holds (its class list,
its backbone), the save folder's lock and manifest, and the choice of the checkpoint to resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from ssdcore.labels import COCO, ClassList
from ssdcore.repository import file_sha256

FORMAT = "ssd300-checkpoint/1"
_PREFIXES = ("module.1.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU, refusing anything that is not weights-only."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it is not a weights-only checkpoint (it would need "
            f"arbitrary code to unpickle). Details: {str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated or corrupt?): {exc}"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def extract_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint dict (ours, NVIDIA's, or a bare state dict).

    Strips DDP prefixes (``module.`` and the hub's ``module.1.``).
    """
    state = obj.get("model", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("checkpoint has no 'model' state dict of tensors")
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def load_model_weights(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Strictly load a checkpoint's weights into ``model`` (fp16 tensors are cast). Returns the dict."""
    obj = read_checkpoint(path)
    state = extract_state_dict(obj)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit this model: {exc}") from exc
    return obj


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class FolderBusy(CheckpointError):
    """Another job holds the save folder."""


_HELD: set[Path] = set()  # folders this process holds (POSIX record locks are per process)
_HELD_GUARD = threading.RLock()  # re-entrant: __del__ may run inside lock_folder


class FolderLock:
    """An exclusive claim on a save folder; :meth:`close` (or the process's death) ends it."""

    def __init__(self, folder: Path, handle: IO[str]) -> None:
        self.folder, self._handle = folder, handle

    def close(self) -> None:
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.close()  # closing the descriptor releases the record lock
            with _HELD_GUARD:
                _HELD.discard(self.folder)

    def __del__(self) -> None:  # dropped without close(): the descriptor goes, so must the claim
        self.close()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lock_folder(folder: str | Path) -> FolderLock:
    """Claim ``folder/.lock`` for as long as the returned lock stays open.

    Two jobs saving into one folder would overwrite each other's checkpoints and manifest; the
    second one is refused instead. A POSIX record lock (``lockf``), not ``flock``: it belongs to
    this process alone, so DataLoader workers forked from it do not inherit it and cannot keep
    the folder locked after a SIGKILL of the job; the kernel drops it the moment the process
    dies (on a local file system; over NFS the server's lease decides). Record locks do not
    exclude the same process, which ``_HELD`` does.
    """
    try:
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop (Python 3.11)
        raise CheckpointError(f"cannot lock the save folder {folder}: {exc}") from None
    with _HELD_GUARD:
        if folder in _HELD:  # checked before opening: closing a second descriptor would unlock
            raise FolderBusy(f"another training job is saving into {folder}")
        try:
            handle = open(folder / ".lock", "a")  # noqa: SIM115 (held open on purpose)
        except OSError as exc:
            raise CheckpointError(f"cannot lock the save folder {folder}: {exc}") from None
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.close()
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise FolderBusy(f"another training job is saving into {folder}") from None
            raise CheckpointError(f"cannot lock the save folder {folder}: {exc}") from None
        _HELD.add(folder)
    return FolderLock(folder, handle)


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files that a crash in the middle of :func:`atomic_save` or
    :func:`write_json_atomic` left in ``folder`` (they are never read; only disk is lost).

    Only while holding :func:`lock_folder`, before writing anything: then no other job can be
    in the middle of a write there.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for tmp in sorted(folder.glob(".*.tmp")):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json_atomic(data: Any, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- training state


def rng_state() -> dict[str, Any]:
    """This process's random generators, in a weights-only-loadable form."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


MANIFEST = "checkpoints.json"


def load_manifest(folder: str | Path) -> list[dict]:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())["checkpoints"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def record_checkpoint(folder: str | Path, name: str, **info: Any) -> None:
    """List a complete checkpoint file (with its SHA-256) in the folder's manifest.

    Called after the file itself is safely renamed into place; the manifest is written last and
    atomically, so whatever it lists is complete. Newest last.
    """
    folder = Path(folder)
    entries = [e for e in load_manifest(folder) if e.get("file") != name]
    entries.append({"file": name, "sha256": file_sha256(folder / name), **info})
    write_json_atomic({"checkpoints": entries}, folder / MANIFEST)


def prune_checkpoints(folder: str | Path, keep: int) -> list[str]:
    """Keep the newest ``keep`` epoch checkpoints of the manifest (``interrupted.pt`` is not
    counted and stays); older ones leave the manifest first (atomically), then the disk.
    Returns the files removed."""
    folder = Path(folder)
    entries = load_manifest(folder)
    epochs = [e["file"] for e in entries if str(e.get("file", "")).startswith("epoch_")]
    if keep <= 0 or len(epochs) <= keep:
        return []
    gone = set(epochs[:-keep])
    write_json_atomic({"checkpoints": [e for e in entries if e["file"] not in gone]},
                      folder / MANIFEST)  # fmt: skip
    for name in sorted(gone):
        (folder / name).unlink(missing_ok=True)
    return sorted(gone)


def _intact(path: Path, sha256: str) -> bool:
    return path.is_file() and file_sha256(path) == sha256


def resolve_checkpoint(path: str | Path) -> tuple[Path, list[str]]:
    """The checkpoint to resume from, and warnings about the ones skipped.

    A folder: its newest intact checkpoint. A file listed in its folder's manifest whose bytes no
    longer match the recorded SHA-256 (truncated, bit-flipped): the newest intact one listed
    before it. A file not listed anywhere (NVIDIA's, say) is used as it is.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    entries = load_manifest(folder)
    if path.is_dir():
        if not entries:
            raise CheckpointError(f"{path} has no {MANIFEST}: pass a checkpoint file")
        candidates = entries
    else:
        listed = [i for i, e in enumerate(entries) if e.get("file") == path.name]
        if not listed:
            return path, []
        candidates = entries[: listed[-1] + 1]
    warnings = []
    for entry in reversed(candidates):
        file = folder / entry["file"]
        if _intact(file, entry["sha256"]):
            return file, warnings
        warnings.append(
            f"{file} is missing or does not match its recorded SHA-256 "
            "(truncated or corrupted); falling back to an older checkpoint"
        )
    raise CheckpointError(f"no intact checkpoint in {folder}: " + "; ".join(warnings))


# ----------------------------------------------------------------------------- what a file holds


def num_classes_of(state: dict[str, torch.Tensor], boxes_per_location: int = 4) -> int:
    """Outputs per anchor of a state dict (from the first class head)."""
    return int(state["conf.0.weight"].shape[0]) // boxes_per_location


def classes_of_checkpoint(obj: dict[str, Any], state: dict[str, torch.Tensor]) -> ClassList | None:
    """The class list a checkpoint was trained on: the one it records; else COCO for 81
    outputs (NVIDIA's); else unknown (None)."""
    recorded = recorded_classes(obj)
    if recorded is not None:
        return recorded
    if "conf.0.weight" in state and num_classes_of(state) == COCO.num_classes:
        return COCO
    return None


def recorded_classes(obj: dict[str, Any]) -> ClassList | None:
    """The class list a checkpoint records (ours do; NVIDIA's does not)."""
    if "classes" not in obj:
        return None
    try:
        return ClassList.from_json(obj["classes"])
    except ValueError as exc:
        raise CheckpointError(f"the checkpoint's class list is unusable: {exc}") from None


def backbone_of(state: dict[str, torch.Tensor]) -> str | None:
    """Which ResNet a state dict's backbone is, from its blocks: bottlenecks (conv3) or basic
    blocks, and the number of blocks of layer3 (feature_extractor index 6)."""
    prefix = "feature_extractor.feature_extractor.6."
    blocks = {k[len(prefix) :].split(".")[0] for k in state if k.startswith(prefix)}
    bottleneck = any(k.startswith(prefix) and ".conv3." in k for k in state)
    table = {
        (False, 2): "resnet18",
        (False, 6): "resnet34",
        (True, 6): "resnet50",
        (True, 23): "resnet101",
        (True, 36): "resnet152",
    }
    return table.get((bottleneck, len(blocks)))


# ----------------------------------------------------------------------------- our schema


@dataclass
class TrainState:
    """What a run needs to continue exactly. ``checkpoint`` writes our checkpoint's fields and
    ``resume`` reads them back: the one place that knows the schema (``FORMAT``). ``stats`` is
    the step counters (``training.engine.StepStats``: ``iteration``, ``skipped_steps``)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    stats: Any
    config: dict[str, Any]
    classes: ClassList

    def checkpoint(self, epoch: int, batch: int, rank_state: list[dict], **extra: Any) -> dict:
        """``epoch``: the next epoch to run; ``batch``: the batches of it already done;
        ``rank_state``: every rank's RNG and data state, by rank."""
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "iteration": self.stats.iteration,
            "skipped_steps": self.stats.skipped_steps,
            "config": self.config,
            "classes": self.classes.to_json(),
            "label_map": dict(enumerate(("background", *self.classes.names))),  # NVIDIA's key
            "rank_state": rank_state,
            **extra,
        }

    def save(self, folder: str | Path, epoch: int, batch: int, rank_state: list[dict],
             **extra: Any) -> Path:  # fmt: skip
        """Write atomically into ``folder`` (``epoch_<E>.pt`` at the end of an epoch,
        ``interrupted.pt`` within one) and record it in the folder's manifest."""
        folder = Path(folder)
        name = f"epoch_{epoch - 1}.pt" if batch == 0 else "interrupted.pt"
        atomic_save(self.checkpoint(epoch, batch, rank_state, **extra), folder / name)
        record_checkpoint(folder, name, epoch=epoch, batch=batch, iteration=self.stats.iteration)
        return folder / name

    def resume(self, obj: dict[str, Any], rank: int) -> Position:
        """The optimizer, scheduler, scaler, counters and this rank's random generators of one
        of our checkpoints (the model's weights are loaded before, from any checkpoint).
        ValueError/KeyError: the optimizer's groups differ (other trainable layers)."""
        self.optimizer.load_state_dict(obj["optimizer"])
        self.scheduler.load_state_dict(obj["scheduler"])
        self.scaler.load_state_dict(obj["scaler"])
        self.stats.iteration, self.stats.skipped_steps = obj["iteration"], obj["skipped_steps"]
        ranks = obj["rank_state"]
        mine = ranks[rank] if rank < len(ranks) else ranks[0]
        set_rng_state(mine["rng"])
        return Position(obj["epoch"], obj["batch"], mine["data"])


@dataclass(frozen=True)
class Position:
    epoch: int  # the next epoch to run
    batch: int  # batches of it already done
    data: str | None = None  # this rank's data loader state (DALI's), if any


def is_ours(obj: dict[str, Any]) -> bool:
    """A checkpoint of this project's training job (with the state to resume), not NVIDIA's or a
    bare state dict."""
    return obj.get("format") == FORMAT


def start_epoch_of(obj: dict[str, Any]) -> int:
    """The epoch a checkpoint of any kind says comes next (0 when it does not say)."""
    return int(obj["epoch"]) if isinstance(obj.get("epoch"), int) else 0
