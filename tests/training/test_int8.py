"""INT8 export (static QDQ with ONNX Runtime): a quarter of the file, served over HTTP with the
same contract, and the fp32 detections of a trained model reproduced, run by ONNX Runtime and by
OpenVINO alike."""

from __future__ import annotations

import json

import onnx
import pytest

from devtools.images import encode, photo
from devtools.int8_accuracy import int8_maps
from service.settings import Settings
from tests.service.conftest import run_service
from training.export import ExportOptions, export

pytestmark = pytest.mark.slow


def test_int8_reproduces_the_fp32_detections(overfit_run, overfit_coco, tmp_path, figures):
    """INT8 gives the fp32 model's detections: every one scoring 0.3 or more, same class, IoU >=
    0.9, scores a few quantization steps apart; and the mAP within 5 %. The 99 % of MLPerf's rule
    is the benchmark's goal (benchmarks/cpu_engines_bench.py), not this test's: here mAP is
    measured on the 8 images the model overfit, where it turns on the order of a few low-score
    false positives (one of 0.20 scoring 0.25 in INT8 moved the mAP by 2.5 % while every
    confident detection was reproduced to 0.04 of its score: 97.5 % / 95.4 % of fp32 on this
    Intel Xeon, 100.6 % / 102.5 % in the benchmark's run)."""
    folder, _ = overfit_run
    m = int8_maps(folder / "epoch_24.pt", overfit_coco, tmp_path)
    fp32, matched, worst = m["fp32"], *m["agreement"]
    figures(
        "INT8 vs fp32 mAP (trained ResNet-18, synthetic set)",
        "INT8 reproduces the fp32 detections >= 0.3 (IoU >= 0.9, scores within 0.06), mAP "
        "within 5 %, both engines",
        f"fp32 {fp32:.4f}; INT8 ONNX Runtime {m['int8']:.4f} ({m['int8'] / fp32:.1%}), "
        f"OpenVINO {m['int8_openvino']:.4f} ({m['int8_openvino'] / fp32:.1%}); "
        f"OpenVINO fp32 {m['fp32_openvino']:.4f}, bf16 {m['bf16_openvino']:.4f}",
        f"fp32 detections >= 0.3 reproduced: {m['fidelity'][0]:.1%} (ONNX Runtime INT8), "
        f"{m['fidelity_openvino'][0]:.1%} (OpenVINO INT8); "
        f"OpenVINO INT8 vs ONNX Runtime INT8: {matched:.1%} of detections >= 0.3 matched "
        f"(IoU >= 0.9, same class), score difference <= {worst:.4f}; "
        f"export + calibration {m['seconds']:.1f} s",
    )
    assert fp32 > 0.3  # a model that detects, else the comparison means nothing
    for engine in ("fidelity", "fidelity_openvino"):
        reproduced, apart = m[engine]
        assert reproduced >= 0.97 and apart <= 0.06, (engine, m[engine])
    assert m["int8"] >= 0.95 * fp32, m
    assert m["int8_openvino"] >= 0.95 * fp32, m
    assert abs(m["fp32_openvino"] - fp32) <= 0.01 * fp32, m  # fp32 in both: the same model
    # the same QDQ graph in two engines: they differ in how int8 convolutions are fused and
    # requantized (and in fp32 summation order), a few quantization steps of a score at most
    # (0.017 measured on AMD EPYC, 0.038 on Intel Xeon); each engine gives every fp32 box
    # (above); between the two, boxes scoring just above 0.3 may differ, where NMS kept
    # another of two overlapping candidates (2 of 21 on the Intel Xeon, scoring 0.307, 0.316)
    assert matched >= 0.85 and worst <= 0.05, m["agreement"]


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
