"""What only the OpenVINO backend has: its precision setting. (The API, class-list and rollout
tests run on it as on ONNX Runtime; INT8 accuracy on it is in tests/training/test_int8.py.)"""

from __future__ import annotations

import openvino as ov
import pytest

from devtools.images import encode, photo
from service.backends.openvino import cpu_precision
from service.settings import Settings
from tests.service.conftest import run_service

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def test_bf16_is_served_where_the_cpu_has_it_and_said(model_repo, caplog):
    settings = Settings(model_repository=model_repo, backend="openvino", openvino_precision="bf16")
    image = encode(photo(640, 480, seed=1), "JPEG")
    with (
        caplog.at_level("INFO", logger="service.openvino"),
        run_service(settings) as live,
        live.client() as c,
    ):
        engine = c.get("/v1/models").json()["models"][0]["engine"]
        r = c.post("/v1/detect", files={"image": ("a.jpg", image)})
    assert r.status_code == 200 and r.json()["model"]["backend"] == "openvino"
    if HAS_BF16:
        assert engine["precision"] == "bf16" and "precision_requested" not in engine
    else:
        assert engine["precision"] == "f32" and engine["precision_requested"] == "bf16"
        assert "no bfloat16" in caplog.text
    assert f"precision {engine['precision']}" in caplog.text


class CoreWithout:
    """A CPU's capabilities without bfloat16 (an AVX2-only machine)."""

    def get_property(self, device: str, name: str) -> list[str]:
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return ["FP32", "INT8", "BIN", "EXPORT_IMPORT"]


def test_bf16_falls_back_to_f32_on_a_cpu_without_it():
    precision, why = cpu_precision("bf16", CoreWithout())
    assert precision == "f32" and "no bfloat16" in why
    assert cpu_precision("f32", CoreWithout()) == ("f32", None)


def test_an_unknown_precision_is_refused_by_the_settings():
    with pytest.raises(ValueError, match="openvino_precision"):
        Settings(openvino_precision="f16")
