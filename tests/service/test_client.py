from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from devtools.images import encode, photo
from service.client import main


def test_client_annotates_a_folder(service, tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.jpg").write_bytes(encode(photo(seed=1), "JPEG"))
    (src / "b.png").write_bytes(encode(photo(320, 240, seed=2), "PNG"))
    (src / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    assert (
        main([str(src), "--url", service.url, "--out", str(out), "--score-threshold", "0.2"]) == 0
    )
    results = json.loads((out / "detections.json").read_text())
    assert sorted(results) == [str(src / "a.jpg"), str(src / "b.png")]
    assert results[str(src / "b.png")]["width"] == 320
    assert results[str(src / "a.jpg")]["detections"]
    annotated = Image.open(out / "a.detections.jpg")
    assert annotated.size == (640, 480)
    original = Image.open(src / "a.jpg").convert("RGB")
    recompressed = Image.open(io.BytesIO(encode(original, "JPEG"))).convert("RGB")

    def changed(img: Image.Image) -> int:  # pixels far from the original
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(original, np.int16)).max(axis=2)
        return int((diff > 60).sum())

    # boxes were drawn: far more strongly changed pixels than JPEG recompression alone makes
    assert changed(annotated) > 200 + 10 * changed(recompressed)


def test_client_reports_failures(service, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main([str(bad), "--url", service.url, "--out", str(tmp_path / "o")]) == 1
    results = json.loads((tmp_path / "o" / "detections.json").read_text())
    assert results[str(bad)]["error"]["code"] == "invalid_image"
