"""The choice of K: the served top-K candidates + the gateway's NMS reproduce the reference decode.

On the model trained to overfit a small synthetic set (mAP@0.5 about 0.6 there), for every
validation image: the detections from the exported graph's top-2000 candidates through
``ssdcore.postprocess`` equal the slow reference decode of the raw outputs, and both give the
same COCO mAP to 3 decimals.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from devtools.reference_decode import reference_decode_single
from ssdcore.anchors import default_boxes
from ssdcore.labels import COCO
from ssdcore.postprocess import decode_boxes, postprocess, softmax
from training.coco_eval import coco_evaluate
from training.data.coco import CocoEvalDataset
from training.export import ExportOptions, export

pytestmark = pytest.mark.slow


def coco_rows(boxes, scores, labels, image_id, w, h):
    return [
        {
            "image_id": image_id,
            "category_id": int(COCO.category_ids(np.array([c]))[0]),
            "bbox": [
                float(b[0] * w),
                float(b[1] * h),
                float((b[2] - b[0]) * w),
                float((b[3] - b[1]) * h),
            ],
            "score": float(s),
        }
        for b, s, c in zip(boxes, scores, labels)
    ]


def test_topk_candidates_give_the_reference_detections(
    overfit_coco, overfit_run, tmp_path, figures
):
    folder, _ = overfit_run
    repo = tmp_path / "repo"
    export(
        repo,
        ["onnx"],
        checkpoint=folder / "epoch_24.pt",
        backbone="resnet18",
        opts=ExportOptions(topk=2000, gpu=False),
        raw=True,
    )
    served = ort.InferenceSession(str(repo / "ssd300_onnx" / "1" / "model.onnx"))
    raw = ort.InferenceSession(str(repo / "ssd300_raw" / "1" / "model.onnx"))
    anchors = np.array(default_boxes())
    dataset = CocoEvalDataset(overfit_coco)
    same, counts, ours_rows, ref_rows = 0, [], [], []
    for i in range(len(dataset)):
        pixels, image_id, (h, w) = dataset[i]
        x = pixels.numpy()[None]
        boxes, scores, classes = served.run(None, {"images": x})
        det = postprocess(boxes[0], scores[0], classes[0])
        locs, logits = raw.run(None, {"images": x})
        probs = softmax(logits.transpose(0, 2, 1), -1)[0]
        counts.append(int((probs[:, 1:] > 0.05).sum()))
        ref = reference_decode_single(
            torch.from_numpy(decode_boxes(locs, anchors)[0]), torch.from_numpy(probs)
        )
        ours_rows += coco_rows(det.boxes, det.scores, det.classes, image_id, w, h)
        ref_rows += coco_rows(ref[0].numpy(), ref[1].numpy(), ref[2].numpy(), image_id, w, h)
        if (
            len(det) == ref[1].numel()
            and np.array_equal(det.classes, ref[2].numpy())
            and np.allclose(det.boxes, ref[0].numpy(), atol=1e-4)
            and np.allclose(det.scores, ref[1].numpy(), atol=1e-5)
        ):
            same += 1
    ann = overfit_coco / "annotations" / "instances_val2017.json"
    ours_map = coco_evaluate(ann, ours_rows)[0]["AP"]
    ref_map = coco_evaluate(ann, ref_rows)[0]["AP"]
    figures(
        "choice of K = 2000 (model overfit on 8 synthetic images)",
        ">= 99 % of images identical to the reference decode; same mAP to 3 decimals",
        f"{same} of {len(dataset)} identical; mAP {ours_map:.3f} vs {ref_map:.3f}",
        f"candidates above 0.05 per image: median {int(np.median(counts))}, max {max(counts)}",
    )
    assert same / len(dataset) >= 0.99
    assert round(ours_map, 3) == round(ref_map, 3)
    assert min(counts) > 0 and ref_map > 0.1  # a model that detects things
