"""A real tritonserver loads the exported repository and answers like in-process ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from devtools.triton_server import running_triton

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_triton_python_backend_serves_the_export(model_repo, test_images, tmp_path):
    import tritonclient.grpc as grpcclient

    session = ort.InferenceSession(str(model_repo / "ssd300_python" / "1" / "model.onnx"))
    expected = session.run(["boxes", "scores", "classes"], {"images": test_images[:3]})
    with running_triton(model_repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_model_ready("ssd300_python")
        meta = client.get_model_metadata("ssd300_python", as_json=True)
        assert [i["name"] for i in meta["inputs"]] == ["images"]
        assert meta["inputs"][0]["datatype"] == "UINT8"
        cfg = client.get_model_config("ssd300_python", as_json=True)["config"]
        assert cfg["dynamic_batching"]["default_queue_policy"]["max_queue_size"] == 64
        inp = grpcclient.InferInput("images", list(test_images[:3].shape), "UINT8")
        inp.set_data_from_numpy(test_images[:3])
        outs = [grpcclient.InferRequestedOutput(n) for n in ("boxes", "scores", "classes")]
        result = client.infer("ssd300_python", [inp], outputs=outs, client_timeout=30)
        for name, ref in zip(("boxes", "scores", "classes"), expected):
            got = result.as_numpy(name)
            assert got.dtype == ref.dtype
            np.testing.assert_array_equal(got, ref)
        client.close()
