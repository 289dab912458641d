"""Fault injection for the reliability tests, driven by environment variables (off by default).

SSD300_FAULT_NAN_AT=3,4   the loss is NaN at these training steps (1-based calls of the loss)
SSD300_FAULT_RANK=1       ... only on this rank (default: every rank)
SSD300_FAULT_KILL_SAVING=2  the process is killed (SIGKILL) in the middle of writing the
                            checkpoint that resumes at epoch 2
"""

from __future__ import annotations

import os
import signal

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


def with_faults(loss_fn: nn.Module, rank: int) -> nn.Module:
    spec = os.environ.get("SSD300_FAULT_NAN_AT", "").strip()
    only = os.environ.get("SSD300_FAULT_RANK")
    if not spec or (only is not None and int(only) != rank):
        return loss_fn
    return NanLossAt(loss_fn, {int(s) for s in spec.split(",") if s.strip()})


class _KillWhenPickled:
    """Pickling this object kills the process: a crash in the middle of torch.save."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)
        return (int, ())


def fault_payload(epoch: int, batch: int) -> dict:
    target = os.environ.get("SSD300_FAULT_KILL_SAVING")
    if target is not None and batch == 0 and int(target) == epoch:
        return {"fault": _KillWhenPickled()}
    return {}
