"""Waiting in tests for something that happens in another process or thread."""

from __future__ import annotations

import time


def wait_for(predicate, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``predicate()`` held, checked every ``step``; AssertionError after
    ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(step)
    raise AssertionError("condition not reached")
