"""A 300x300 PNG through HTTP gives exactly the reference decode of the same network outputs.

The model is random but shaped like a trained one (background dominant, a few hundred candidates
above 0.05), so all candidates fit in the graph's top-K and the gateway's NMS must reproduce the
slow per-class reference loop on the raw outputs of the same weights.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from devtools.images import encode, photo
from devtools.reference_decode import reference_decode_single
from service.settings import Settings
from ssdcore.anchors import default_boxes
from ssdcore.labels import COCO
from ssdcore.postprocess import decode_boxes, softmax
from tests.service.conftest import run_service
from training.export import ExportOptions, export
from training.model import build_model, calibrate_random_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_like_repo(tmp_path_factory):
    torch.manual_seed(3)
    model = build_model()
    photos = torch.from_numpy(np.stack([photo(300, 300, seed=s) for s in range(4)]))
    mean = torch.tensor(model.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.spec.std).view(1, 3, 1, 1)
    calibrate_random_model(model, (photos.permute(0, 3, 1, 2) / 255 - mean) / std)
    with torch.no_grad():
        for head, nd in zip(model.conf, model.spec.boxes_per_location):
            head.bias[:nd] += 15.0  # background channels (class 0 = channels 0..nd-1)
    tmp = tmp_path_factory.mktemp("trained_like")
    torch.save({"model": model.state_dict()}, tmp / "ckpt.pt")
    repo = tmp / "repo"
    export(repo, ["onnx"], checkpoint=tmp / "ckpt.pt", opts=ExportOptions(gpu=False), raw=True)
    return repo


def test_png_gives_the_reference_detections(trained_like_repo):
    pixels = photo(300, 300, seed=5)
    session = ort.InferenceSession(str(trained_like_repo / "ssd300_raw" / "1" / "model.onnx"))
    locs, logits = session.run(["locs", "logits"], {"images": pixels[None]})
    boxes = decode_boxes(locs, np.array(default_boxes()))[0]
    probs = softmax(logits.transpose(0, 2, 1), -1)[0]
    candidates = int((probs[:, 1:] > 0.05).sum())
    assert 50 < candidates <= 2000, candidates  # all of them fit in the top-K output
    ref_boxes, ref_scores, ref_labels = reference_decode_single(
        torch.from_numpy(boxes), torch.from_numpy(probs)
    )
    assert ref_scores.numel() > 5

    settings = Settings(model_repository=trained_like_repo)
    with run_service(settings) as live, live.client() as c:
        r = c.post(
            "/v1/detect",
            files={"image": ("x.png", encode(pixels, "PNG"))},
            params={"score_threshold": 0.05, "iou_threshold": 0.5, "max_detections": 200},
        )
    assert r.status_code == 200
    dets = r.json()["images"][0]["detections"]
    assert len(dets) == ref_scores.numel()
    got = np.array([[d["box"]["x1"], d["box"]["y1"], d["box"]["x2"], d["box"]["y2"]] for d in dets])
    expected = np.clip(ref_boxes.numpy() * 300, 0, 300)
    np.testing.assert_allclose(got, expected, atol=0.02)
    np.testing.assert_allclose([d["score"] for d in dets], ref_scores.numpy(), atol=2e-5)
    assert [d["category_id"] for d in dets] == COCO.category_ids(ref_labels.numpy()).tolist()
