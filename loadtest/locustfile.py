"""Locust users posting a corpus of varied images to POST /v1/detect (single and batch requests).

Bodies are multipart-encoded once at start-up, so the load generator spends its time sending,
not encoding. The corpus comes from `python loadtest/corpus.py` (or LOADTEST_CORPUS=DIR).
Without the 12-megapixel image: LOADTEST_MAX_PIXELS=3000000 (the default) keeps the mix realistic.
"""

from __future__ import annotations

import itertools
import os
import uuid
from pathlib import Path

from locust import FastHttpUser, constant, task

CORPUS = Path(os.environ.get("LOADTEST_CORPUS", Path(__file__).with_name("corpus")))
CTYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
BATCH = int(os.environ.get("LOADTEST_BATCH", "4"))


def _multipart(parts: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    chunks = []
    for field, name, data in parts:
        ctype = CTYPES.get(Path(name).suffix, "application/octet-stream")
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _load() -> list[tuple[str, bytes]]:
    files = sorted(p for p in CORPUS.glob("*") if p.suffix in CTYPES)
    if not files:
        raise SystemExit(f"no images in {CORPUS}: run `python loadtest/corpus.py` first")
    limit = int(os.environ.get("LOADTEST_MAX_PIXELS", "3000000"))
    keep = []
    for f in files:
        w, h = (int(v) for v in f.stem.split("_")[1].split("x"))
        if w * h <= limit:
            keep.append((f.name, f.read_bytes()))
    return keep


IMAGES = _load()
SINGLE = [_multipart([("image", name, data)]) for name, data in IMAGES]
BATCHES = [
    _multipart(
        [
            ("images", name, data)
            for name, data in itertools.islice(itertools.cycle(IMAGES), start, start + BATCH)
        ]
    )
    for start in range(len(IMAGES))
]


class DetectUser(FastHttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        self.single = itertools.cycle(SINGLE)
        self.batch = itertools.cycle(BATCHES)
        key = os.environ.get("LOADTEST_API_KEY")
        self.auth = {"X-API-Key": key} if key else {}

    @task(4)
    def detect_one(self) -> None:
        body, ctype = next(self.single)
        self.client.post(
            "/v1/detect",
            data=body,
            headers={"Content-Type": ctype, **self.auth},
            name="POST /v1/detect (1 image)",
        )

    @task(1)
    def detect_batch(self) -> None:
        body, ctype = next(self.batch)
        self.client.post(
            "/v1/detect",
            data=body,
            headers={"Content-Type": ctype, **self.auth},
            name=f"POST /v1/detect ({BATCH} images)",
        )
