"""A normal upload for the slow-client and upload-admission tests: one 640x480 JPEG in a
multipart body written out byte by byte (what the attacks beside it send part of)."""

from __future__ import annotations

import time

import httpx

from devtools.images import encode, photo

JPEG = encode(photo(640, 480, seed=3), "JPEG")


def multipart(boundary: str = "XyZ", image: bytes = JPEG) -> tuple[bytes, str]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def normal_request(url: str) -> tuple[int, float]:
    body, ctype = multipart()
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/detect", content=body, headers={"content-type": ctype}, timeout=60)
    return r.status_code, time.perf_counter() - t0
