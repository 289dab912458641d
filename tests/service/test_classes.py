"""The service serves the model's own class list, and refuses to guess one."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest

from devtools.images import encode, photo
from service.backends.onnx import OnnxBackend
from service.settings import Settings
from ssdcore.labels import ClassList
from ssdcore.repository import ModelStore
from tests.service.conftest import rerecord, run_service, triton_settings
from tests.service.versions import copy_version
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


def start(repo, engine: str, name="ssd300_onnx"):
    if engine == "openvino":
        from service.backends.openvino import OpenVinoBackend

        backend = OpenVinoBackend(repo, name)
    else:
        backend = OnnxBackend(repo, name)
    asyncio.run(backend.start())
    return backend.info


embedded_engines = pytest.mark.parametrize("engine", ["onnx", "openvino"])


def version(repo, name="ssd300_onnx"):
    return ModelStore(repo, name).version(1)


@embedded_engines
def test_the_class_list_is_the_versions(own_repo, tmp_path, engine):
    assert start(own_repo, engine).classes == OWN
    repo = copy_model(own_repo, tmp_path)
    version(repo).file("classes.json").unlink()  # a version without its list is not servable
    with pytest.raises(RuntimeError, match=r"classes\.json is missing"):
        start(repo, engine)
    # the real process: exits with the message, never serves COCO's names for these classes
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service",
            "--model-repository",
            str(repo),
            "--port",
            "0",
            "--backend",
            engine,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "classes.json is missing" in proc.stderr


@embedded_engines
def test_a_class_list_that_disagrees_with_the_model_is_refused(own_repo, tmp_path, engine):
    """Even when its files are recorded as they are (a version put together by hand)."""
    repo = copy_model(own_repo, tmp_path)
    two = ClassList((40, 7), ("Zebra crossing", "Café table"))
    rerecord(version(repo), "classes.json", json.dumps(two.to_json()).encode())
    with pytest.raises(
        RuntimeError, match=r"lists 2 classes but .*metadata.json says the model has 3"
    ):
        start(repo, engine)
    rerecord(version(repo), "classes.json", b"{not json")
    with pytest.raises(RuntimeError, match=r"classes\.json is not JSON"):
        start(repo, engine)
    # the model file declares another count than its version's list and metadata
    rerecord(version(repo), "classes.json", json.dumps(OWN.to_json()).encode())
    model = version(repo).file("model.onnx")
    strip_onnx_classes(model, keep_count=False)
    proto = onnx.load(str(model))
    proto.metadata_props.add(key="num_classes", value="3")
    onnx.save(proto, str(model))
    rerecord(version(repo), "model.onnx", model.read_bytes())
    with pytest.raises(
        RuntimeError, match="lists 3 classes but the model file says the model has 2"
    ):
        start(repo, engine)


@embedded_engines
def test_a_list_other_than_the_model_files_is_refused(own_repo, tmp_path, engine):
    """A classes.json restored by version control next to another model's files: refused."""
    repo = copy_model(own_repo, tmp_path)
    other = ClassList((1, 2, 3), ("a", "b", "c"))  # same count, other classes
    rerecord(version(repo), "classes.json", json.dumps(other.to_json()).encode())
    with pytest.raises(RuntimeError, match="differ: export the model and its class list together"):
        start(repo, engine)


def test_a_changed_file_is_refused_and_an_older_version_served(own_repo, tmp_path):
    repo = copy_model(own_repo, tmp_path)
    store = ModelStore(repo, "ssd300_onnx")
    shutil.copytree(store.version(1).path, store.path / ".v2")
    meta = json.loads((store.path / ".v2" / "metadata.json").read_text())
    (store.path / ".v2" / "metadata.json").write_text(json.dumps({**meta, "version": 2}))
    (store.path / ".v2").rename(store.version(2).path)
    classes = store.version(2).file("classes.json")
    classes.write_text(json.dumps(ClassList((1, 2, 3), ("a", "b", "c")).to_json()))
    backend = OnnxBackend(repo, "ssd300_onnx")
    asyncio.run(backend.start())
    assert backend.info.version == "1" and backend.info.classes == OWN
    assert backend.versions.refused["version"] == "2"
    assert "2/classes.json has 151 bytes, 288 were written" in backend.versions.refused["reason"]


@pytest.mark.triton
@pytest.mark.slow
def test_triton_backend_serves_the_own_classes(own_repo, tmp_path):
    from devtools.triton_server import running_triton
    from service.backends.triton import TritonBackend

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
        # a gateway whose repository is not Triton's (versions there, but no version 1): refused
        other = tmp_path / "other" / "ssd300_python"
        other.mkdir(parents=True)
        copy_version(ModelStore(own_repo, "ssd300_python").version(1).path,
                     ModelStore(other.parent, "ssd300_python"), 2)  # fmt: skip
        backend = TritonBackend(server.grpc_url, "ssd300_python", 5.0, other.parent)

        async def start_and_close():
            try:
                await backend.start(wait_s=10)
            finally:
                await backend.close()

        with pytest.raises(RuntimeError, match="version 1 cannot be labelled: cannot read"):
            asyncio.run(start_and_close())


@pytest.mark.triton
@pytest.mark.slow
def test_a_gateway_before_its_first_sync_starts_unready_and_follows(own_repo, tmp_path):
    """With S3, a gateway's repository is an emptyDir its sidecar fills: a pod that starts before
    the first sync has no class list for the version Triton serves. It used to crash at start
    (a crash loop until the sync won the race); it starts, is not ready, answers 503 (never
    boxes under guessed names), and is ready with the version's own classes once the files
    arrive."""
    import time

    from devtools.triton_server import running_triton

    image = encode(photo(400, 300, seed=3), "JPEG")
    synced = tmp_path / "synced"
    (synced / "ssd300_python").mkdir(parents=True)
    with running_triton(own_repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        settings = triton_settings(server.grpc_url, synced, model_poll_s=0.2)
        with run_service(settings) as live, live.client() as c:
            assert c.get("/livez").status_code == 200
            assert c.get("/readyz").status_code == 503
            r = c.post("/v1/detect", files={"image": ("a.jpg", image)})
            assert r.status_code == 503 and "cannot be labelled" in r.json()["error"]["message"]
            copy_version(ModelStore(own_repo, "ssd300_python").version(1).path,
                         ModelStore(synced, "ssd300_python"), 1)  # fmt: skip
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            r = c.post("/v1/detect", files={"image": ("a.jpg", image)},
                       params={"score_threshold": 0.0, "max_detections": 1000})  # fmt: skip
            assert r.status_code == 200, r.text
            dets = r.json()["images"][0]["detections"]
            assert {d["category_id"] for d in dets} == set(OWN.ids)
            assert c.get("/v1/models").json()["models"][0]["classes"] == OWN.public()


def test_openapi_does_not_promise_coco_ids(own_repo):
    """The class filter's parameter description names this model's classes, not COCO's."""
    with run_service(Settings(model_repository=own_repo)) as live, live.client() as c:
        doc = c.get("/openapi.json").json()
        params = doc["paths"]["/v1/detect"]["post"]["parameters"]
        described = next(p for p in params if p["name"] == "classes")["description"]
        assert "COCO" not in described


def test_a_model_naming_labels_outside_its_list_is_a_502_not_a_500():
    """Label -1 would index the last name from the end; a label past the list would raise."""
    from service.errors import ApiError
    from service.pipeline import to_pixel_detections

    boxes = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)
    for label in (-1, 0, 4):
        with pytest.raises(ApiError) as err:
            to_pixel_detections(boxes, np.array([0.9]), np.array([label]), 100, 100, OWN)
        assert err.value.status == 502 and err.value.code == "bad_model_output"
    assert to_pixel_detections(boxes, np.array([0.9]), np.array([3]), 100, 100, OWN)
