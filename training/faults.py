"""Fault injection for the reliability tests: the training job launched with faults installed
from outside, so that the job itself never calls through a test seam.

    torchrun --nproc_per_node=N training/faults.py <the flags of training/train.py>

SSD300_FAULT_NAN_AT=3,4   the loss is NaN at these training steps (1-based calls of the loss)
SSD300_FAULT_RANK=1       ... only on this rank (default: every rank)
SSD300_FAULT_KILL_SAVING=2  the process is killed (SIGKILL) in the middle of writing the
                            checkpoint that resumes at epoch 2
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by torchrun, as training/train.py is
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn


class NanLossAt(nn.Module):
    def __init__(self, loss_fn: nn.Module, steps: set[int]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.steps = steps
        self.calls = 0

    def forward(self, *args) -> torch.Tensor:
        self.calls += 1
        loss = self.loss_fn(*args)
        return loss * float("nan") if self.calls in self.steps else loss


class _KillWhenPickled:
    """Pickling this object kills the process: a crash in the middle of torch.save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        return (int, ())


def install() -> None:
    """The faults the environment asks for, patched into the training job's module."""
    import training.train as train
    from training.checkpoint import TrainState

    spec = os.environ.get("SSD300_FAULT_NAN_AT", "").strip()
    only = os.environ.get("SSD300_FAULT_RANK")
    rank = int(os.environ.get("RANK", "0"))
    if spec and (only is None or int(only) == rank):
        steps = {int(s) for s in spec.split(",") if s.strip()}
        loss = train.MultiboxLoss
        train.MultiboxLoss = lambda: NanLossAt(loss(), steps)
    target = os.environ.get("SSD300_FAULT_KILL_SAVING")
    if target is not None:
        checkpoint = TrainState.checkpoint

        def killing(self, epoch: int, batch: int, rank_state: list[dict], **extra):
            obj = checkpoint(self, epoch, batch, rank_state, **extra)
            if batch == 0 and int(target) == epoch:
                obj["fault"] = _KillWhenPickled()
            return obj

        TrainState.checkpoint = killing


if __name__ == "__main__":
    install()
    from training.train import cli

    sys.exit(cli())
