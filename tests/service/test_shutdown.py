"""Graceful shutdown under load: SIGTERM loses no in-flight request and exits 0."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from devtools.images import encode, photo
from tests.service.conftest import start_service

pytestmark = pytest.mark.slow


def test_sigterm_under_load(model_repo, figures):
    proc, url = start_service(model_repo)

    body = encode(photo(), "JPEG")
    records: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    records.append(
                        (t0, c.post("/v1/detect", files={"image": ("x.jpg", body)}).status_code)
                    )
                except httpx.HTTPError as exc:
                    records.append((t0, type(exc).__name__))
                    return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    while sum(1 for _, s in records if s == 200) < 3:
        time.sleep(0.05)
    time.sleep(0.3)  # requests in flight now
    sent_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    before = [s for t0, s in records if t0 < sent_at]
    figures(
        "graceful shutdown (SIGTERM under load, 6 clients)",
        "in-flight finish, exit 0",
        f"exit {code}",
        f"{sum(s != 200 for s in before)} failed of {len(before)} requests sent before the signal",
    )
    assert code == 0
    assert before and all(s == 200 for s in before), before
