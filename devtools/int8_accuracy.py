"""INT8 against fp32 on a trained model: COCO mAP of the exported graphs run by ONNX Runtime and
OpenVINO through the gateway's postprocess, and how closely two engines' detections agree
(tests/training/test_int8.py and benchmarks/cpu_engines_bench.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import openvino as ov

from ssdcore.labels import ClassList
from ssdcore.postprocess import Detections, postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS
from training.coco_eval import coco_evaluate
from training.data.coco import CocoEvalDataset
from training.export import ExportOptions, export

Runner = Callable[[np.ndarray], list[np.ndarray]]


def ort_runner(model: Path) -> Runner:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def openvino_runner(model: Path, precision: str = "f32") -> Runner:
    compiled = ov.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": precision})
    return lambda images: list(compiled(images).values())


def detections(run: Runner, data: Path) -> list[tuple[int, tuple[int, int], Detections]]:
    """(image id, (h, w), the gateway's postprocessed detections) per validation image."""
    dataset = CocoEvalDataset(data)
    out = []
    for i in range(len(dataset)):
        pixels, image_id, size = dataset[i]
        boxes, scores, labels = run(pixels.numpy()[None])
        out.append(
            (image_id, size, postprocess(boxes[0], scores[0], labels[0], REFERENCE_POSTPROCESS))
        )
    return out


def coco_map(model: Path | Runner, data: Path, classes: ClassList) -> float:
    run = ort_runner(model) if isinstance(model, Path) else model
    rows = []
    for image_id, (h, w), det in detections(run, data):
        for b, s, cid in zip(det.boxes, det.scores, classes.category_ids(det.classes)):
            x1, y1, x2, y2 = (float(v) for v in b * np.array([w, h, w, h]))
            rows.append({"image_id": int(image_id), "category_id": int(cid),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)})  # fmt: skip
    ann = data / "annotations" / "instances_val2017.json"
    return coco_evaluate(ann, rows)[0]["AP"]


def agreement(a: list, b: list, threshold: float = 0.3) -> tuple[float, float]:
    """How closely detections ``b`` reproduce ``a`` (the output of :func:`detections`): the share
    of ``a``'s detections scoring ``threshold`` or more (the service's default) that ``b`` has
    with the same class at IoU >= 0.9, and the largest score difference among those."""
    wanted = matched = 0
    worst = 0.0
    for (_, _, da), (_, _, db) in zip(a, b, strict=True):
        for box, score, label in zip(da.boxes, da.scores, da.classes):
            if score < threshold:
                continue
            wanted += 1
            same = db.classes == label
            if not same.any():
                continue
            iou = box_iou(box, db.boxes[same])
            best = int(np.argmax(iou))
            if iou[best] >= 0.9:
                matched += 1
                worst = max(worst, abs(float(score) - float(db.scores[same][best])))
    return (matched / wanted if wanted else 1.0), worst


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    lt = np.maximum(box[:2], boxes[:, :2])
    rb = np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    return inter / (area(box) + area(boxes) - inter)


def int8_maps(checkpoint: Path, data: Path, out: Path) -> dict:
    """mAPs of a checkpoint exported in fp32 and INT8 (calibrated on ``data``'s training images;
    the validation ones are measured): ONNX Runtime fp32 and INT8, OpenVINO INT8 and bf16, the
    agreement of OpenVINO's INT8 detections with ONNX Runtime's, how many of the fp32
    detections each INT8 engine reproduces, the export's seconds."""
    t0 = time.perf_counter()
    export(out, ["onnx", "onnx_int8"], checkpoint=checkpoint, opts=ExportOptions(gpu=False),
           calibration=data / "train2017", calibration_images=300)  # fmt: skip
    seconds = time.perf_counter() - t0
    classes = ClassList.from_json(
        json.loads((out / "ssd300_onnx" / "1" / "classes.json").read_text())
    )
    fp32, int8 = (out / f"ssd300_{n}" / "1" / "model.onnx" for n in ("onnx", "onnx_int8"))
    ort_int8, ov_int8 = ort_runner(int8), openvino_runner(int8)
    of_fp32, of_ort, of_ov = (detections(r, data) for r in (ort_runner(fp32), ort_int8, ov_int8))
    return {
        "fp32": coco_map(fp32, data, classes),
        "int8": coco_map(ort_int8, data, classes),
        "fp32_openvino": coco_map(openvino_runner(fp32), data, classes),
        "int8_openvino": coco_map(ov_int8, data, classes),
        "bf16_openvino": coco_map(openvino_runner(fp32, "bf16"), data, classes),
        "agreement": agreement(of_ort, of_ov),
        # the fp32 detections scoring 0.3 or more that INT8 reproduces (same class, IoU >= 0.9)
        "fidelity": agreement(of_fp32, of_ort),
        "fidelity_openvino": agreement(of_fp32, of_ov),
        "seconds": seconds,
    }
