"""Training progress: a progress bar on rank 0, a JSON-lines metrics log, optional TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from training.config import TrainConfig
from training.distributed import DistInfo


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        pass


def progress(info: DistInfo, total: int, epoch: int, epochs: int, initial: int = 0):
    if not info.is_main:
        return _NoBar()
    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="batch",
        dynamic_ncols=True,
        mininterval=1.0,
    )


class MetricsLog:
    """One JSON object per line: start, step (every --log-interval), eval, end. Rank 0 only."""

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.enabled = info.is_main
        self.interval = max(1, cfg.log_interval)
        path = cfg.json_summary or (str(Path(cfg.save) / "metrics.jsonl") if cfg.save else None)
        self.file = None
        if self.enabled and path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the run
        self.tb = None
        if self.enabled and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(cfg.tensorboard)

    def event(self, name: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"event": name, "time": time.time(), **fields}
        if self.file:
            self.file.write(json.dumps(record, default=str) + "\n")
        if self.tb and name == "eval":
            for k, v in fields.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"eval/{k}", v, fields.get("epoch", 0))

    def step(
        self, epoch: int, stats, loss: float, optimizer, images: int, seconds: float, bar
    ) -> None:
        lr = optimizer.param_groups[0]["lr"]
        rate = images / seconds if seconds > 0 else 0.0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        stats.losses.append(loss)
        if stats.iteration % self.interval == 0 or stats.iteration == 1:
            self.event(
                "step",
                epoch=epoch,
                iteration=stats.iteration,
                loss=loss,
                lr=lr,
                images_per_s=rate,
                skipped_steps=stats.skipped_steps,
            )
            if self.tb:
                self.tb.add_scalar("train/loss", loss, stats.iteration)
                self.tb.add_scalar("train/lr", lr, stats.iteration)
