"""The gateway over a real tritonserver gives the same detections as the embedded backend."""

from __future__ import annotations

import pytest

from devtools.images import encode, photo
from devtools.triton_server import running_triton
from tests.service.conftest import run_service, triton_settings

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


def test_poll_mode_over_a_dns_name_follows_tritons_own_rollout(tmp_path):
    """The Helm chart's wiring: Triton polls its repository and loads a new version itself;
    the gateway (SSD_TRITON_MODEL_CONTROL=poll, a dns:/// address balanced round-robin) never
    asks it to load, and labels the answers with the version Triton served."""
    import time

    from devtools.triton_server import start_triton
    from ssdcore.repository import ModelStore
    from tests.service.versions import copy_version, write_version

    repo = tmp_path / "repo"
    write_version(repo, "python", 1)
    server = start_triton(repo, [], tmp_path / "triton.log", poll_s=1)
    try:
        url = "dns:///localhost:" + server.grpc_url.rpartition(":")[2]
        settings = triton_settings(url, repo, triton_model_control="poll", model_poll_s=0.2)
        body = encode(photo(seed=1), "JPEG")
        with run_service(settings) as live, live.client() as c:
            assert (
                c.post("/v1/detect", files={"image": ("a.jpg", body)}).json()["model"]["version"]
                == "1"
            )
            store = ModelStore(repo, "ssd300_python")
            copy_version(store.version(1).path, store, 2)
            deadline = time.monotonic() + 60
            while True:
                r = c.post("/v1/detect", files={"image": ("a.jpg", body)})
                assert r.status_code == 200, r.text
                if r.json()["model"]["version"] == "2":
                    break
                assert time.monotonic() < deadline, server.log()[-3000:]
                time.sleep(0.2)
            # Triton refuses explicit loads in poll mode ("explicit model load / unload is not
            # allowed if polling is enabled"): had the gateway asked, v2 would show as refused
            # the gateway learns of Triton's switch at its next repository check (0.2 s here)
            while (versions := c.get("/v1/models").json()["models"][0]["versions"])[
                "served"
            ] != "2":
                assert time.monotonic() < deadline + 10, versions
                time.sleep(0.1)
            assert versions["refused"] is None, versions
    finally:
        server.stop()


def test_poll_mode_and_versions_that_appear_in_pieces(tmp_path):
    """Why deploy/s3_publish.sh publishes as it does, on a local repository (the tritonserver
    here cannot read S3). Triton, polling: ignores MODEL/.next-N/ (where the class list goes
    first); tries a version folder it finds incomplete once, fails, and keeps serving the old
    version (no failed request); and does not try that version again when the rest of its
    files arrive (tritonserver 2.51), so a version must appear complete."""
    import os
    import shutil
    import time

    from devtools.triton_server import start_triton
    from ssdcore.repository import CLASSES, LABELS, METADATA, MODEL_FILES, ModelStore
    from tests.service.versions import write_version

    repo, elsewhere = tmp_path / "repo", tmp_path / "exported"
    write_version(repo, "python", 1)
    write_version(elsewhere, "python", 2, version=2)
    store, source = ModelStore(repo, "ssd300_python"), ModelStore(elsewhere, "ssd300_python")
    server = start_triton(repo, [], tmp_path / "triton.log", poll_s=1)
    body = encode(photo(seed=1), "JPEG")
    try:
        settings = triton_settings(server.grpc_url, repo, triton_model_control="poll",
                                   model_poll_s=0.2)  # fmt: skip

        def small_files_into(folder) -> None:
            folder.mkdir()
            for name in (CLASSES, LABELS, METADATA):
                shutil.copyfile(source.version(2).file(name), folder / name)

        with run_service(settings) as live, live.client() as c:

            def served_for(seconds: float) -> set[str]:
                versions, t0 = set(), time.monotonic()
                while time.monotonic() - t0 < seconds:
                    r = c.post("/v1/detect", files={"image": ("a.jpg", body)})
                    assert r.status_code == 200, (r.text, server.log()[-3000:])
                    versions.add(r.json()["model"]["version"])
                    time.sleep(0.1)
                return versions

            small_files_into(store.path / ".next-2")
            assert served_for(3) == {"1"}  # three polls
            assert "ssd300_python:2" not in server.log()
            small_files_into(store.version(2).path)  # a version folder without its model
            assert served_for(3) == {"1"}
            assert "loading: ssd300_python:2" in server.log()  # it tried, and failed
            for name in MODEL_FILES["python"]:  # the rest, each file whole and new
                shutil.copyfile(source.version(2).file(name), tmp_path / name)
                os.replace(tmp_path / name, store.version(2).file(name))
            assert served_for(8) == {"1"}, server.log()[-3000:]  # eight polls: not tried again
            assert server.log().count("loading: ssd300_python:2") == 1
    finally:
        server.stop()


def test_new_channel_when_the_name_resolves_to_other_addresses(monkeypatch):
    """Triton pods added behind the headless Service: gRPC would only re-resolve the name when
    a connection breaks, so the backend opens a new channel when the addresses change, and
    closes the old one once its requests are past their deadline."""
    import asyncio
    import socket

    from service.backends.triton import TritonBackend

    answers = [[("10.0.0.1", 8001)], [("10.0.0.1", 8001)], [("10.0.0.1", 8001), ("10.0.0.2", 8001)]]
    calls = []

    def getaddrinfo(host, port, type=0):  # socket's own parameter name
        calls.append((host, port))
        return [(socket.AF_INET, type, 6, "", a) for a in answers[min(len(calls), 3) - 1]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)

    async def scenario():
        b = TritonBackend("dns:///triton-pods.ns.svc:8001", "ssd300_python", timeout_s=0.1)
        from tritonclient.grpc import aio as grpcaio

        b.client = grpcaio.InferenceServerClient(b.url)
        b._addresses = await b._resolve()
        first = b.client
        await b._follow_addresses()  # same addresses: same channel
        assert b.client is first and not b._retired
        await b._follow_addresses()  # a second pod: a new channel, the old one retired
        assert b.client is not first and b._retired[0][1] is first
        await asyncio.sleep(1.3)  # past 2 x the deadline + 1 s
        await b._follow_addresses()
        assert not b._retired
        await b.close()

    asyncio.run(scenario())
    assert calls[0] == ("triton-pods.ns.svc", "8001")


def test_pods_polling_at_different_moments_serve_one_version(tmp_path):
    """Two Triton pods in poll mode while a version rolls out: pod A has version 1 only, pod B
    has 1 and 2 already (the policy keeps the last two). The gateway, balancing over both
    (``ipv4:A,B``, round robin), serves the version READY on every pod and names it in each
    call: every answer is version 1, requests of several batches included, and no request
    fails; once A has version 2 too, every answer is version 2 and none goes back to 1. (The
    gateway used to take whichever pod it asked for the served version, flip-flop, and fail
    requests whose batches two pods answered with two versions.)"""
    import shutil
    import time

    from devtools.triton_server import start_triton
    from ssdcore.repository import ModelStore
    from tests.service.versions import copy_version, write_version

    repo_a, repo_b = tmp_path / "a", tmp_path / "b"
    write_version(repo_a, "python", 1)
    shutil.copytree(repo_a, repo_b)
    write_version(repo_b, "python", 2, version=2)
    pods = [
        start_triton(repo, [], tmp_path / f"triton-{name}.log", poll_s=1)
        for name, repo in (("a", repo_a), ("b", repo_b))
    ]
    try:
        url = "ipv4:" + ",".join(pod.grpc_url for pod in pods)
        settings = triton_settings(
            url, repo_b, triton_model_control="poll", model_poll_s=0.2, batch_max_size=2
        )
        files = [("images", (f"{i}.jpg", encode(photo(seed=i), "JPEG"))) for i in range(5)]
        with run_service(settings) as live, live.client() as c:

            def versions_answered(n: int) -> list[str]:
                answered = []
                for _ in range(n):
                    r = c.post("/v1/detect", files=files)  # 5 images: 3 batches
                    assert r.status_code == 200, (r.text, pods[0].log()[-2000:])
                    answered.append(r.json()["model"]["version"])
                return answered

            assert set(versions_answered(12)) == {"1"}
            assert c.get("/v1/models").json()["models"][0]["versions"]["served"] == "1"
            store_a = ModelStore(repo_a, "ssd300_python")
            copy_version(ModelStore(repo_b, "ssd300_python").version(2).path, store_a, 2)
            seen, deadline = [], time.monotonic() + 60
            while not seen or seen[-1] != "2":
                assert time.monotonic() < deadline, (seen, pods[0].log()[-2000:])
                seen += versions_answered(1)
            assert set(versions_answered(12)) == {"2"}
            assert "1" not in seen[seen.index("2") :]
    finally:
        for pod in pods:
            pod.stop()


def test_a_pod_that_does_not_answer_keeps_the_served_version():
    """Pods A and B; B's index call fails once (a deadline, a blip) while A has version 2: the
    gateway must not move to 2, which B (still getting requests, round robin) may not have;
    when both answer with 2 ready, it moves."""
    import asyncio

    from tritonclient.utils import InferenceServerException

    from service.backends.triton import TritonBackend

    async def scenario():
        b = TritonBackend("ipv4:127.0.0.1:1,127.0.0.2:1", "ssd300_python", timeout_s=0.1)
        b.versions.served = "1"
        b_answers = [None, {1, 2}]

        async def ready_versions(client, not_ready, pod=""):
            if pod.startswith("127.0.0.2"):
                answer = b_answers.pop(0)
                if answer is None:
                    raise InferenceServerException("Deadline Exceeded")
                return answer
            return {1, 2}

        b._ready_versions = ready_versions
        assert await b._ready_candidates() == ["1"]
        assert await b._ready_candidates() == ["2", "1"]
        await b.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("triton_live", [True, False])
def test_explicit_rollback_past_a_version_triton_cannot_load(tmp_path, triton_live):
    """Explicit mode, the served version (3) retired with nothing loaded to fall back on: the
    newest servable on disk (2) is one Triton cannot load (its files have the right sizes; the
    failure is injected). It is refused and the next older one (1) loaded; it used to be asked for
    again on every poll and 1 never. With Triton itself away, nothing is refused."""
    import asyncio

    from tritonclient.utils import InferenceServerException

    from service.backends.triton import TritonBackend
    from tests.service.versions import write_version

    repo = tmp_path / "repo"
    for seed in (1, 2):
        write_version(repo, "onnx", seed)

    async def scenario() -> tuple[list[list[int]], TritonBackend]:
        b = TritonBackend("127.0.0.1:1", "ssd300_onnx", timeout_s=0.1, repo=repo)
        b.versions.served = "3"
        loads: list[list[int]] = []

        async def load_exactly(numbers: list[int]) -> None:
            loads.append(numbers)
            if numbers == [2] or not triton_live:
                raise InferenceServerException("failed to load 'ssd300_onnx' version 2")

        async def live() -> bool:
            return triton_live

        async def follow_served() -> None:
            b.versions.served = str(loads[-1][0])

        b._load_exactly, b._live, b._follow_served = load_exactly, live, follow_served
        await b._serve_newest_servable()
        await b._serve_newest_servable()  # the next poll: nothing more to do, or the same try
        return loads, b

    loads, b = asyncio.run(scenario())
    if triton_live:
        assert loads == [[2], [1]], loads
        assert b.versions.served == "1"
        assert (
            b.versions.refused["version"] == "2"
            and "could not load" in b.versions.refused["reason"]
        )
    else:
        assert loads == [[2], [2]], loads  # asked again once Triton answers; refused nothing
        assert b.versions.refused is None
