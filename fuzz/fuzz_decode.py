"""Coverage-guided fuzzing (atheris) of the image decode path: any exception other than the
service's own 4xx ApiError is a finding.

    python fuzz/fuzz_decode.py [CORPUS_DIR] -max_total_time=600

Without a corpus folder it starts from small valid JPEG, PNG and WebP images.
"""

from __future__ import annotations

import io
import sys
import tempfile
import warnings
from pathlib import Path

import atheris

# instrument only our code and Pillow's Python side: instrumenting every import (numpy, pydantic,
# ...) costs gigabytes of memory and adds no coverage of the decode path
with atheris.instrument_imports(include=["service", "PIL"]):
    from service.errors import ApiError
    from service.imaging import ImageLimits, decode_image

LIMITS = ImageLimits(max_pixels=4_000_000, max_side=4096)


def test_one_input(data: bytes) -> None:
    try:
        decode_image(data, LIMITS)
    except ApiError as exc:
        assert 400 <= exc.status < 500


def seed_corpus() -> str:
    import numpy as np
    from PIL import Image

    folder = Path(tempfile.mkdtemp(prefix="decode-corpus-"))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        (folder / f"seed.{fmt.lower()}").write_bytes(buf.getvalue())
    return str(folder)


def main() -> None:
    warnings.simplefilter("ignore")
    args = list(sys.argv)
    if not any(not a.startswith("-") for a in args[1:]):
        args.append(seed_corpus())
    if not any(a.startswith("-rss_limit_mb") for a in args):
        args.append("-rss_limit_mb=4096")
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
