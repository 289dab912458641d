"""Where video uploads wait while they are processed: files on disk, never in memory.

Each gateway process writes into its own folder ``<root>/gateway-<id>/`` and holds an ``flock``
on ``<root>/gateway-<id>.lock`` for its whole life. The kernel drops the lock when the process
ends, however it ends, so at start a gateway removes every folder whose lock it can take: those
of gateways that crashed (a PID would not do: every container's gateway is PID 1). Files are
removed when their video is answered, the client went away, or an error ended it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("service")


class VideoSpool:
    def __init__(self, root: Path | None) -> None:
        self.root = (
            Path(root) if root is not None else Path(tempfile.gettempdir()) / "ssd300-videos"
        )
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"gateway-{uuid.uuid4().hex[:12]}"
        self._lock_path = self.root / f"{name}.lock"
        # locked before it has its name: another gateway starting at the same moment never
        # finds it unlocked (and removes it) between its creation and the flock
        pending = self.root / f".pending-{name}.lock"
        self._lock = os.open(pending, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        os.rename(pending, self._lock_path)
        self.folder = self.root / name
        self.folder.mkdir(mode=0o700)
        self.removed_at_start = self._remove_abandoned()

    def _remove_abandoned(self) -> int:
        """Folders of gateways that are gone (their lock is free): removed with their files."""
        removed = 0
        for lock_path in self.root.glob("gateway-*.lock"):
            if lock_path == self._lock_path:
                continue
            try:
                fd = os.open(lock_path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a live gateway's
                os.close(fd)
                continue
            try:
                folder = lock_path.with_suffix("")
                if folder.exists():
                    removed += sum(1 for p in folder.iterdir() if p.is_file())
                    shutil.rmtree(folder, ignore_errors=True)
                lock_path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        if removed:
            log.warning("removed %d video file(s) left by a gateway that ended abruptly", removed)
        return removed

    def new_file(self) -> Path:
        return self.folder / f"video-{uuid.uuid4().hex}"

    def files(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self._lock_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock)
