"""The service serves the model's own class list, and refuses to guess one."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import onnx
import pytest

from service.backends.onnx import OnnxBackend
from service.settings import Settings
from ssdcore.labels import COCO, ClassList
from tests.service.conftest import run_service, triton_settings
from tests.service.images import encode, photo
from training.export import ExportOptions, export

OWN = ClassList((40, 7, 12), ("Zebra crossing", "Café table", "señal de tráfico"))


@pytest.fixture(scope="module")
def own_repo(tmp_path_factory):
    """A random-init 3-class model (ONNX + Python backend), exported with its class list."""
    repo = tmp_path_factory.mktemp("own_repo")
    export(
        repo,
        ["onnx", "python"],
        random_init=True,
        backbone="resnet18",
        classes=OWN,
        opts=ExportOptions(gpu=False),
    )
    return repo


def copy_model(repo, tmp_path, name="ssd300_onnx"):
    out = tmp_path / "repo"
    shutil.copytree(repo / name, out / name)
    return out


def strip_onnx_classes(path, keep_count: bool) -> None:
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if keep_count and p.key == "num_classes"]
    del proto.metadata_props[:]
    for p in kept:
        proto.metadata_props.add(key=p.key, value=p.value)
    onnx.save(proto, str(path))


def start(repo, name="ssd300_onnx"):
    backend = OnnxBackend(repo, name)
    asyncio.run(backend.start())
    return backend.info


def test_class_list_from_the_repository_and_from_the_model_file(own_repo, tmp_path):
    assert start(own_repo).classes == OWN
    repo = copy_model(own_repo, tmp_path)
    (repo / "ssd300_onnx" / "classes.json").unlink()  # the model file carries it too
    assert start(repo).classes == OWN


def test_no_class_list_and_not_80_classes_refuses_to_start(own_repo, tmp_path):
    repo = copy_model(own_repo, tmp_path)
    (repo / "ssd300_onnx" / "classes.json").unlink()
    strip_onnx_classes(repo / "ssd300_onnx" / "1" / "model.onnx", keep_count=True)
    with pytest.raises(RuntimeError, match="has 3 classes and no class list"):
        start(repo)
    # the real process: exits with the message, never serves COCO's names for these classes
    proc = subprocess.run(
        [sys.executable, "-m", "service", "--model-repository", str(repo), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "has 3 classes and no class list" in proc.stderr


def test_a_class_list_that_disagrees_with_the_model_refuses_to_start(own_repo, tmp_path):
    repo = copy_model(own_repo, tmp_path)
    strip_onnx_classes(repo / "ssd300_onnx" / "1" / "model.onnx", keep_count=True)
    two = ClassList((40, 7), ("Zebra crossing", "Café table"))
    (repo / "ssd300_onnx" / "classes.json").write_text(json.dumps(two.to_json()))
    with pytest.raises(
        RuntimeError, match="lists 2 classes but the model file says model 'ssd300_onnx' has 3"
    ):
        start(repo)
    (repo / "ssd300_onnx" / "classes.json").write_text("{not json")
    with pytest.raises(RuntimeError, match="cannot read the class list"):
        start(repo)


def test_a_repository_list_other_than_the_model_files_refuses_to_start(own_repo, tmp_path):
    """A classes.json restored by version control next to another model's files: refused."""
    repo = copy_model(own_repo, tmp_path)
    other = ClassList((1, 2, 3), ("a", "b", "c"))  # same count, other classes
    (repo / "ssd300_onnx" / "classes.json").write_text(json.dumps(other.to_json()))
    with pytest.raises(RuntimeError, match="differ: export the model and its class list together"):
        start(repo)


def test_an_80_class_model_without_a_list_is_coco_with_a_warning(model_repo, tmp_path, caplog):
    repo = copy_model(model_repo, tmp_path)
    (repo / "ssd300_onnx" / "classes.json").unlink()
    strip_onnx_classes(repo / "ssd300_onnx" / "1" / "model.onnx", keep_count=False)
    with caplog.at_level("WARNING", logger="service"):
        assert start(repo).classes == COCO
    assert "has no class list" in caplog.text and "serving it as COCO" in caplog.text


@pytest.mark.triton
@pytest.mark.slow
def test_triton_backend_serves_the_own_classes(own_repo, tmp_path):
    from service.backends.triton import TritonBackend
    from tests.triton_server import running_triton

    image = encode(photo(400, 300, seed=3), "JPEG")
    with running_triton(own_repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        with run_service(triton_settings(server.grpc_url, own_repo)) as live, live.client() as c:
            model = c.get("/v1/models").json()["models"][0]
            assert model["classes"] == OWN.public()
            r = c.post(
                "/v1/detect",
                files={"image": ("a.jpg", image)},
                params={"score_threshold": 0.0, "max_detections": 1000},
            )
            dets = r.json()["images"][0]["detections"]
            assert {d["category_id"] for d in dets} == set(OWN.ids)
        # a gateway whose repository holds another class list than the served model: refused
        other = tmp_path / "other" / "ssd300_python"
        other.mkdir(parents=True)
        (other / "classes.json").write_text(json.dumps(COCO.to_json()))
        backend = TritonBackend(server.grpc_url, "ssd300_python", 5.0, other.parent)

        async def start_and_close():
            try:
                await backend.start(wait_s=10)
            finally:
                await backend.close()

        with pytest.raises(RuntimeError, match="lists 80 classes but its Triton config says model"):
            asyncio.run(start_and_close())


def test_openapi_does_not_promise_coco_ids(own_repo):
    """The class filter's parameter description names this model's classes, not COCO's."""
    with run_service(Settings(model_repository=own_repo)) as live, live.client() as c:
        doc = c.get("/openapi.json").json()
        params = doc["paths"]["/v1/detect"]["post"]["parameters"]
        described = next(p for p in params if p["name"] == "classes")["description"]
        assert "COCO" not in described
