"""INT8 export (static QDQ with ONNX Runtime): a quarter of the file, served over HTTP with the
same contract, and at least 99 % of the fp32 mAP on a trained model (MLPerf's rule), run by ONNX
Runtime and by OpenVINO alike."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import openvino as ov
import pytest

from service.settings import Settings
from ssdcore.labels import ClassList
from ssdcore.postprocess import Detections, postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS
from tests.service.conftest import run_service
from tests.service.images import encode, photo
from training.coco_eval import coco_evaluate
from training.data.coco import CocoEvalDataset
from training.export import ExportOptions, export

pytestmark = pytest.mark.slow


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
    agreement of OpenVINO's INT8 detections with ONNX Runtime's, the export's seconds."""
    t0 = time.perf_counter()
    export(out, ["onnx", "onnx_int8"], checkpoint=checkpoint, opts=ExportOptions(gpu=False),
           calibration=data / "train2017", calibration_images=300)  # fmt: skip
    seconds = time.perf_counter() - t0
    classes = ClassList.from_json(
        json.loads((out / "ssd300_onnx" / "1" / "classes.json").read_text())
    )
    fp32, int8 = (out / f"ssd300_{n}" / "1" / "model.onnx" for n in ("onnx", "onnx_int8"))
    ort_int8, ov_int8 = ort_runner(int8), openvino_runner(int8)
    return {
        "fp32": coco_map(fp32, data, classes),
        "int8": coco_map(ort_int8, data, classes),
        "fp32_openvino": coco_map(openvino_runner(fp32), data, classes),
        "int8_openvino": coco_map(ov_int8, data, classes),
        "bf16_openvino": coco_map(openvino_runner(fp32, "bf16"), data, classes),
        "agreement": agreement(detections(ort_int8, data), detections(ov_int8, data)),
        "seconds": seconds,
    }


def test_int8_keeps_99_percent_of_the_fp32_map(overfit_run, overfit_coco, tmp_path, figures):
    folder, _ = overfit_run
    m = int8_maps(folder / "epoch_24.pt", overfit_coco, tmp_path)
    fp32, matched, worst = m["fp32"], *m["agreement"]
    figures(
        "INT8 vs fp32 mAP (trained ResNet-18, synthetic set)",
        "INT8 mAP at least 99 % of fp32 (MLPerf's rule for quantized detectors), both engines",
        f"fp32 {fp32:.4f}; INT8 ONNX Runtime {m['int8']:.4f} ({m['int8'] / fp32:.1%}), "
        f"OpenVINO {m['int8_openvino']:.4f} ({m['int8_openvino'] / fp32:.1%}); "
        f"OpenVINO fp32 {m['fp32_openvino']:.4f}, bf16 {m['bf16_openvino']:.4f}",
        f"OpenVINO INT8 vs ONNX Runtime INT8: {matched:.1%} of detections >= 0.3 matched "
        f"(IoU >= 0.9, same class), score difference <= {worst:.4f}; "
        f"export + calibration {m['seconds']:.1f} s",
    )
    assert fp32 > 0.3  # a model that detects, else the comparison means nothing
    assert m["int8"] >= 0.99 * fp32, m
    assert m["int8_openvino"] >= 0.99 * fp32, m
    assert abs(m["fp32_openvino"] - fp32) <= 0.01 * fp32, m  # fp32 in both: the same model
    # the same QDQ graph in two engines: they differ in how int8 convolutions are fused and
    # requantized (and in fp32 summation order), a few quantization steps of a score at most
    # (0.017 measured on AMD EPYC); a box and its class do not move
    assert matched >= 0.95 and worst <= 0.05, m["agreement"]


def test_int8_export_is_a_quarter_and_serves_over_http(synthetic_coco, tmp_path):
    repo = tmp_path / "repo"
    export(repo, ["onnx_int8"], random_init=True, backbone="resnet18",
           opts=ExportOptions(gpu=False), calibration=synthetic_coco, calibration_images=8)  # fmt: skip
    export(tmp_path / "fp32", ["onnx"], random_init=True, backbone="resnet18",
           opts=ExportOptions(gpu=False))  # fmt: skip
    int8_file = repo / "ssd300_onnx_int8" / "1" / "model.onnx"
    ratio = (
        int8_file.stat().st_size
        / (tmp_path / "fp32" / "ssd300_onnx" / "1" / "model.onnx").stat().st_size
    )
    assert 0.2 < ratio < 0.33, ratio  # int8 weights: about a quarter of the fp32 file
    proto = onnx.load(str(int8_file))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "TopK", "Softmax"} <= ops
    # the decode stays fp32: softmax, exp and top-K read no dequantized tensor directly
    producer = {out: n.op_type for n in proto.graph.node for out in n.output}
    for node in proto.graph.node:
        if node.op_type in ("Softmax", "TopK", "Exp"):
            assert all(producer.get(i) != "DequantizeLinear" for i in node.input), node.name
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["precision"] == "int8" and props["num_classes"] == "81"
    config = (repo / "ssd300_onnx_int8" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "KIND_CPU" in config
    meta = json.loads((repo / "ssd300_onnx_int8" / "1" / "metadata.json").read_text())
    assert meta["precision"] == "int8" and meta["extra"]["calibration_images"] == 8
    image = encode(photo(640, 480, seed=2), "JPEG")
    settings = Settings(model_repository=repo, model_name="ssd300_onnx_int8")
    with run_service(settings) as live, live.client() as c:
        model = c.get("/v1/models").json()["models"][0]
        assert model["name"] == "ssd300_onnx_int8" and model["metadata"]["precision"] == "int8"
        assert model["candidates_per_image"] == 2000  # the contract checks passed at start-up
        r = c.post(
            "/v1/detect", files={"image": ("a.jpg", image)}, params={"score_threshold": 0.05}
        )
        assert r.status_code == 200 and r.json()["images"][0]["detections"]


def test_int8_needs_calibration_data(tmp_path):
    with pytest.raises(SystemExit, match="needs --calibration-data"):
        export(tmp_path, ["onnx_int8"], random_init=True, opts=ExportOptions(gpu=False))
