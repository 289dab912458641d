"""Write the load-test corpus: varied sizes and formats (JPEG, PNG, WebP), pre-encoded once.

python loadtest/corpus.py [--out loadtest/corpus]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SPECS = [  # (width, height, format)
    (640, 480, "JPEG"),
    (1280, 720, "JPEG"),
    (1920, 1080, "JPEG"),
    (480, 640, "JPEG"),
    (800, 600, "PNG"),
    (300, 300, "PNG"),
    (1024, 768, "WEBP"),
    (4000, 3000, "JPEG"),
]


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (9, 12, 3), dtype=np.uint8))
    img = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC)).copy()
    for _ in range(5):
        w, h = (
            int(rng.integers(width // 10, width // 3)),
            int(rng.integers(height // 10, height // 3)),
        )
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        img[y : y + h, x : x + w] = rng.integers(0, 255, 3)
    return Image.fromarray(img)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("corpus"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for i, (w, h, fmt) in enumerate(SPECS):
        buf = io.BytesIO()
        picture(w, h, i).save(buf, fmt, **({"quality": 90} if fmt != "PNG" else {}))
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        (args.out / f"{i:02d}_{w}x{h}.{ext}").write_bytes(buf.getvalue())
    print(f"wrote {len(SPECS)} images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
