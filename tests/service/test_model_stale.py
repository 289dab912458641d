"""A stale model is said, not hidden: the newest version in the repository that is not served
for longer than SSD_MODEL_STALE_AFTER_S shows in GET /v1/models (versions.stale), in
ssd_model_stale_seconds and in the log, while the served version goes on answering and the
gateway stays ready. On the embedded backend (a version refused) and on a real tritonserver
polling its repository (a version stuck loading keeps every later one out)."""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

from devtools.images import encode, photo
from service.settings import Settings
from ssdcore.repository import CLASSES, LABELS, METADATA, MODEL_NAMES, ModelStore
from tests.service.conftest import run_service, triton_settings
from tests.service.versions import copy_version, truncated_copy, write_version

pytestmark = pytest.mark.slow
JPEG = encode(photo(320, 240, seed=5), "JPEG")


def stale_gauge(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "ssd_model_stale_seconds"
    )


def wait_for_stale(c: httpx.Client, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while (versions := c.get("/v1/models").json()["models"][0]["versions"])["stale"] is None:
        assert time.monotonic() < deadline, versions
        time.sleep(0.2)
    return versions


def test_a_refused_newest_version_is_reported_stale_until_it_is_gone(tmp_path, caplog):
    repo = tmp_path / "repo"
    write_version(repo, "onnx", 1)
    store = ModelStore(repo, MODEL_NAMES["onnx"])
    settings = Settings(
        model_repository=repo, model_name="ssd300_onnx", model_poll_s=0.2, model_stale_after_s=1.5
    )
    with run_service(settings) as live, live.client() as c:
        assert c.get("/v1/models").json()["models"][0]["versions"]["stale"] is None
        t_written = time.time()
        broken = truncated_copy(repo, store, 2)
        versions = wait_for_stale(c, 20)
        stale = versions["stale"]
        assert time.time() - t_written >= 1.5  # not before the bound
        assert stale["newest"] == str(broken) and stale["served"] == "1"
        assert "bytes" in stale["last_error"]  # the refusal's reason: the file is truncated
        assert abs(stale["since"] - t_written) < 2
        assert stale_gauge(live.url) >= 1.5
        assert c.get("/readyz").status_code == 200  # the old version still serves
        r = c.post("/v1/detect", files={"image": ("a.jpg", JPEG)})
        assert r.status_code == 200 and r.json()["model"]["version"] == "1"
        assert any("is stale" in m for m in caplog.messages)
        store.retire(broken)  # the operator removes it: nothing newer than the served one
        deadline = time.monotonic() + 10
        while c.get("/v1/models").json()["models"][0]["versions"]["stale"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert stale_gauge(live.url) == 0


@pytest.mark.triton
def test_triton_polling_stuck_on_a_half_copied_version_never_loads_the_next(tmp_path):
    """What was seen once and is reproduced here on every run (tritonserver 2.51, poll mode, the
    Python-backend model): version 2's folder appears without its model file, as a copy in
    progress does; Triton tries to load it and version 2 stays LOADING (the Python stub failed
    to start). Version 3 then arrives complete, and Triton never loads it: every later
    version of the model waits behind the stuck one until Triton restarts (a load call is
    refused in poll mode). The old version answers all along; the gateway says the model is
    stale, with what Triton says of the versions."""
    from devtools.triton_server import start_triton

    repo, exported = tmp_path / "repo", tmp_path / "exported"
    write_version(repo, "python", 1)
    write_version(exported, "python", 2, version=2)
    write_version(exported, "python", 3, version=3)
    store, source = ModelStore(repo, "ssd300_python"), ModelStore(exported, "ssd300_python")
    server = start_triton(repo, [], tmp_path / "triton.log", poll_s=1)
    try:
        settings = triton_settings(
            server.grpc_url,
            repo,
            triton_model_control="poll",
            model_poll_s=0.2,
            model_stale_after_s=3,
        )
        with run_service(settings) as live, live.client() as c:
            half = store.version(2).path
            half.mkdir()
            for name in (CLASSES, LABELS, METADATA):  # the small files first, as a copy goes
                shutil.copyfile(source.version(2).file(name), half / name)
            deadline = time.monotonic() + 30
            while "loading: ssd300_python:2" not in server.log():
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.2)
            copy_version(source.version(3).path, store, 3)  # complete, in one rename
            stale = wait_for_stale(c, 30)["stale"]
            assert stale["newest"] == "3" and stale["served"] == "1"
            assert "has not tried to load version 3" in stale["last_error"]
            assert "version 2 LOADING" in stale["last_error"]
            for _ in range(10):  # ten of Triton's polls: version 3 never loads
                r = c.post("/v1/detect", files={"image": ("a.jpg", JPEG)})
                assert r.status_code == 200 and r.json()["model"]["version"] == "1"
                time.sleep(1)
            assert "loading: ssd300_python:3" not in server.log()
            assert c.get("/readyz").status_code == 200
    finally:
        server.stop()
