"""``python -m service.client`` with videos: the NDJSON answer saved, and an annotated H.264 copy of
the same size, frame count and frame rate with the boxes drawn in; a folder of videos and images."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest

from devtools.images import encode, photo
from devtools.videos import COUNTING_LINE
from service.client import main

pytestmark = pytest.mark.slow


def test_client_annotates_a_video_and_an_image(video_service, scene_clip, tmp_path):
    clip, truth = scene_clip
    src = tmp_path / "media"
    src.mkdir()
    shutil.copy(clip, src / "clip.mp4")
    (src / "still.jpg").write_bytes(encode(photo(320, 240)))
    out = tmp_path / "out"
    line = ",".join(str(v) for v in COUNTING_LINE)
    code = main([str(src), "--url", video_service.url, "--out", str(out), "--lines", line])
    assert code == 0
    rows = [json.loads(x) for x in (out / "clip.ndjson").read_text().splitlines()]
    assert len(rows) == 76 and rows[-1]["summary"]["lines"][0]["in"] == {"car": 1}
    results = json.loads((out / "detections.json").read_text())
    assert results[str(src / "clip.mp4")]["frames_processed"] == 75
    assert (out / "still.detections.jpg").exists()

    with av.open(str(out / "clip.detections.mp4")) as annotated, av.open(str(clip)) as original:
        a, o = annotated.streams.video[0], original.streams.video[0]
        assert (a.width, a.height) == (o.width, o.height) == (640, 360)
        assert a.average_rate == o.average_rate == 25
        drawn = [f.to_ndarray(format="rgb24") for f in annotated.decode(a)]
        plain = [f.to_ndarray(format="rgb24") for f in original.decode(o)]
    assert len(drawn) == len(plain) == 75
    # frame 30: the car's box outline drawn where the ground truth has it, the line at y = 180
    _, _, (x1, y1, x2, y2) = next(t for t in truth[30] if t[1] == 3)
    diff = np.abs(drawn[30].astype(int) - plain[30].astype(int)).max(axis=2)
    outline = diff[round(y1) - 3 : round(y2) + 3, round(x1) - 3 : round(x2) + 3]
    inside = diff[round(y1) + 8 : round(y2) - 8, round(x1) + 8 : round(x2) - 8]
    assert (outline > 60).sum() > 100, "no box drawn around the car"
    assert (inside > 60).mean() < 0.05, "the box's inside was painted over"
    assert (diff[178:183, 10:150] > 60).mean() > 0.5, "no counting line drawn"
