"""Background clients posting one image over and over: every answer recorded (start, end,
status, the version that produced it, its labels), for the rollout and fault tests and the
rollout benchmark."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import httpx


@dataclass
class Answer:
    start: float
    end: float
    status: int  # -1: no HTTP answer (connection error, timeout)
    version: str = ""
    labels: frozenset[str] = frozenset()


class Load:
    """``clients`` threads posting ``image`` to ``url``/v1/detect until the context ends."""

    def __init__(
        self,
        url: str,
        image: bytes,
        clients: int = 4,
        params: dict | None = None,
        timeout: float = 60,
    ) -> None:
        self.url, self.image, self.params, self.timeout = url, image, params, timeout
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout) as c:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/detect", files={"image": ("x.jpg", self.image)},
                               params=self.params)  # fmt: skip
                    answer = Answer(t0, time.monotonic(), r.status_code)
                    if r.status_code == 200:
                        body = r.json()
                        answer.version = body["model"]["version"]
                        answer.labels = frozenset(
                            d["label"] for d in body["images"][0]["detections"]
                        )
                except (httpx.HTTPError, ValueError):
                    answer = Answer(t0, time.monotonic(), -1)
                self.answers.append(answer)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def wait_for(self, version: str, since: float, timeout: float = 120) -> float:
        """The time the first response naming ``version`` ended after ``since``."""
        while time.monotonic() - since < timeout:
            ends = [a.end for a in self.answers[-64:] if a.version == version and a.end > since]
            if ends:
                return min(ends)
            time.sleep(0.01)
        raise AssertionError(f"no response from version {version} within {timeout} s")
