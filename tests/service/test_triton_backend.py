"""The gateway over a real tritonserver gives the same detections as the embedded backend."""

from __future__ import annotations

import pytest

from tests.service.conftest import run_service, triton_settings
from tests.service.images import encode, photo
from tests.triton_server import running_triton

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_triton_and_embedded_agree(model_repo, service, tmp_path):
    images = [encode(photo(seed=s), "JPEG") for s in range(3)]
    files = [("images", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    params = {"score_threshold": 0.1, "max_detections": 50}
    with service.client() as c:
        embedded = c.post("/v1/detect", files=files, params=params).json()

    with running_triton(model_repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        settings = triton_settings(
            server.grpc_url,
            model_repo,
            backend_concurrency=2,
        )
        with run_service(settings) as live, live.client() as c:
            assert c.get("/readyz").json() == {"ready": True}
            model = c.get("/v1/models").json()["models"][0]
            assert model["backend"] == "triton" and model["candidates_per_image"] == 2000
            assert model["random_weights"] is True
            via_triton = c.post("/v1/detect", files=files, params=params)
            assert via_triton.status_code == 200, via_triton.text
            body = via_triton.json()
            single = c.post("/v1/detect", files={"image": ("x.jpg", images[0])}, params=params)
            assert single.json()["images"][0]["detections"] == body["images"][0]["detections"]
    assert body["model"]["backend"] == "triton"
    assert len(body["images"]) == 3
    for a, b in zip(body["images"], embedded["images"]):
        assert a["detections"] == b["detections"]
        assert len(a["detections"]) > 0
