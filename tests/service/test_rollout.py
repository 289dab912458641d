"""Model versions under load: a retrained model rolls out, a new class list comes with its
version, a broken version is refused, and removing versions rolls back, with no failed request.

Both backends, over real HTTP: the embedded one (ONNX Runtime in process) and a real tritonserver
(explicit model control, the gateway asks it to load new versions). Every response must name the
version that produced it and only that version's class names.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest

from devtools.images import encode, photo
from devtools.load import Load
from devtools.triton_server import running_triton
from service.settings import Settings
from ssdcore.labels import COCO, ClassList
from ssdcore.repository import MODEL_NAMES, ModelStore
from tests.service.conftest import run_service, start_service, triton_settings
from tests.service.versions import copy_version, truncated_copy, write_version

pytestmark = pytest.mark.slow
JPEG = encode(photo(320, 240, seed=5), "JPEG")
PARAMS = {"score_threshold": 0.01}
PETS = ClassList((7, 8, 9), ("cat", "dog", "bird"))


def models(url: str) -> dict:
    return httpx.get(url + "/v1/models").json()["models"][0]


def roll_out_and_back(url: str, repo: Path, fmt: str, load: Load) -> dict:
    """v2 (other weights), v3 (other classes), broken v4, then back to v2; returns what happened
    and when: ``switches`` [(version, its change began at, complete on disk at, its first
    answer ended at)]. A change may be seen before it is complete (the export renames the
    version into place and then tidies up; a retire renames the folder away and then deletes
    its files), so the version before is only required until the next change begins."""
    store = ModelStore(repo, MODEL_NAMES[fmt])
    names = {"1": set(COCO.names)}
    load.wait_for("1", time.monotonic())
    switches = []
    for seed, classes in ((2, COCO), (3, PETS)):
        began = time.monotonic()
        number = str(write_version(repo, fmt, seed, classes))
        complete = time.monotonic()
        names[number] = set(classes.names)
        switches.append((number, began, complete, load.wait_for(number, complete)))
    # v4 arrives with its model file cut short (a copy that died, a full disk)
    scratch = repo.parent / "scratch"
    broken = write_version(scratch, fmt, 4, COCO, version=store.next_number())
    model_file = ModelStore(scratch, store.name).version(broken).file("model.onnx")
    model_file.write_bytes(model_file.read_bytes()[:4096])
    ModelStore(scratch, store.name).version(broken).path.rename(store.version(broken).path)
    deadline = time.monotonic() + 60
    while (models(url)["versions"]["refused"] or {}).get("version") != str(broken):
        assert time.monotonic() < deadline, models(url)
        time.sleep(0.1)
    time.sleep(1.0)  # answers keep coming from v3
    began = time.monotonic()
    store.retire(broken)
    store.retire(3)
    complete = time.monotonic()
    switches.append(("2", began, complete, load.wait_for("2", complete)))
    time.sleep(1.0)
    return {"names": names, "switches": switches, "broken": str(broken)}


def check_answers(load: Load, facts: dict) -> None:
    answers = load.answers
    failed = [a for a in answers if a.status != 200]
    assert answers and not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    names = facts["names"]
    for a in answers:  # a response's names are those of the version it names
        assert a.version in names and a.version != facts["broken"], a
        assert a.labels <= names[a.version], (a.version, a.labels - names[a.version])
    assert any(a.labels & set(PETS.names) for a in answers if a.version == "3")
    # once a switch has been answered, requests that start later (until the next change
    # begins) never name the old version, the broken v4 included
    switches = facts["switches"]
    for i, (version, _, _, seen) in enumerate(switches):
        until = switches[i + 1][1] if i + 1 < len(switches) else float("inf")
        after = [a for a in answers if seen < a.start < until]
        assert after and {a.version for a in after} == {version}, (version, len(after))


def summary(load: Load, facts: dict) -> str:
    took = ", ".join(f"v{v} {seen - done:.2f} s" for v, _, done, seen in facts["switches"])
    return f"{len(load.answers)} requests, 0 failed; first answer from the new version after {took}"


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_embedded_backend_rolls_out_refuses_and_rolls_back(engine, tmp_path, figures):
    repo = tmp_path / "repo"
    write_version(repo, "onnx", 1)
    settings = Settings(
        model_repository=repo, model_name="ssd300_onnx", model_poll_s=0.2, backend=engine
    )
    with run_service(settings) as live, Load(live.url, JPEG, params=PARAMS) as load:
        facts = roll_out_and_back(live.url, repo, "onnx", load)
        info = models(live.url)
        refused = live.metric("ssd_model_versions_refused_total", model="ssd300_onnx")
        switches = live.metric("ssd_model_version_switches_total", model="ssd300_onnx")
    check_answers(load, facts)
    assert info["version"] == "2" and info["versions"]["served"] == "2"
    assert info["versions"]["present"] == ["1", "2"]
    assert info["versions"]["refused"]["version"] == facts["broken"]
    assert "bytes" in info["versions"]["refused"]["reason"]  # says the file is truncated
    assert refused == 1 and switches == 3
    figures(
        f"rollout under load, embedded backend ({engine})",
        "v2, v3 (other classes), broken v4 refused, back to v2: no failed request",
        summary(load, facts),
        "4 clients",
    )


@pytest.mark.triton
def test_triton_backend_rolls_out_refuses_and_rolls_back(tmp_path, figures):
    repo = tmp_path / "repo"
    write_version(repo, "python", 1)
    with running_triton(repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        settings = triton_settings(server.grpc_url, repo, model_poll_s=0.2)
        with run_service(settings) as live, Load(live.url, JPEG, params=PARAMS) as load:
            facts = roll_out_and_back(live.url, repo, "python", load)
            info = models(live.url)
    check_answers(load, facts)
    assert info["version"] == "2" and info["versions"]["refused"]["version"] == facts["broken"]
    figures(
        "rollout under load, Triton backend",
        "v2, v3 (other classes), broken v4 refused, back to v2: no failed request",
        summary(load, facts),
        "4 clients, tritonserver 2.51 (Python backend)",
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_old_versions_are_released(engine, tmp_path, figures):
    """After 10 rollouts (two sets of weights in turn) the service's resident memory stays
    within 1.3x of what it was after the first: every replaced session is freed."""
    scratch, repo = tmp_path / "scratch", tmp_path / "repo"
    sources = [ModelStore(scratch, "ssd300_onnx").version(write_version(scratch, "onnx", s)).path
               for s in (1, 2)]  # fmt: skip
    store = ModelStore(repo, "ssd300_onnx")
    copy_version(sources[0], store, 1)
    proc, url = start_service(repo, "--backend", engine, env={"SSD_MODEL_POLL_S": "0.2"})
    try:
        with Load(url, JPEG, clients=2, params=PARAMS) as load:
            rss = []
            for number in range(2, 12):
                copy_version(sources[number % 2], store, number)
                load.wait_for(str(number), time.monotonic())
                shutil.rmtree(store.version(number - 1).path)  # as --keep 1 would
                time.sleep(0.5)  # the old session goes once its last request is done
                rss.append(rss_mb(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not [a for a in load.answers if a.status != 200]
    assert rss[-1] <= 1.3 * rss[0], rss
    figures(
        f"memory over 10 rollouts, embedded backend ({engine})",
        "RSS after the 10th within 1.3x of after the first",
        f"RSS {rss[0]:.0f} MB after the first, {rss[-1]:.0f} MB after the 10th "
        f"(max {max(rss):.0f} MB)",
        f"{len(load.answers)} requests, 0 failed",
    )


def test_sighup_checks_at_once(tmp_path):
    """``SSD_MODEL_POLL_S=0``: a new version waits for SIGHUP, then is served without a restart."""
    repo = tmp_path / "repo"
    write_version(repo, "onnx", 1)
    proc, url = start_service(repo, "--backend", "onnx", env={"SSD_MODEL_POLL_S": "0"})
    try:
        write_version(repo, "onnx", 2)
        time.sleep(1.0)
        assert models(url)["version"] == "1"  # no polling
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while models(url)["version"] != "2":
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        r = httpx.post(url + "/v1/detect", files={"image": ("x.jpg", JPEG)})
        assert r.status_code == 200 and r.json()["model"]["version"] == "2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_rollback_behind_a_refused_version_serves_the_newest_servable_one(tmp_path):
    """v1, v2 served, v3 broken (refused); retiring v2 must bring v1 back, not keep serving the
    retired v2 because the newest version (v3) is the refused one."""
    import asyncio

    from service.backends.onnx import OnnxBackend

    repo = tmp_path / "repo"
    write_version(repo, "onnx", 1)
    write_version(repo, "onnx", 2)
    store = ModelStore(repo, MODEL_NAMES["onnx"])

    async def main():
        backend = OnnxBackend(repo, "ssd300_onnx", 1)
        await backend.start()
        assert backend.info.version == "2"
        broken = truncated_copy(repo, store, 3)
        outcome = await backend.refresh()
        assert outcome.refused[0] == str(broken) and backend.info.version == "2"
        store.retire(2)
        outcome = await backend.refresh()
        assert outcome.switched_to == "1" and backend.info.version == "1"
        assert (await backend.refresh()).switched_to is None  # and stays there
        await backend.close()

    asyncio.run(main())


def test_a_version_that_fails_its_checks_in_any_way_is_refused(tmp_path, monkeypatch):
    """A model that trips the contract check with something else than RuntimeError (a scores
    output of rank 1: IndexError) is refused like any broken version: at start-up the previous
    one is served (it used to crash the start), on a poll it is not reloaded again and again."""
    import asyncio

    import service.backends.onnx as onnx_backend

    repo = tmp_path / "repo"
    write_version(repo, "onnx", 1)
    write_version(repo, "onnx", 2)
    real, checks = onnx_backend.check_contract, []

    def check(inputs, outputs):  # version 2's model, as one with a rank-1 scores output
        checks.append(1)
        if len(checks) == 1:
            raise IndexError("list index out of range")
        return real(inputs, outputs)

    monkeypatch.setattr(onnx_backend, "check_contract", check)

    async def main():
        backend = onnx_backend.OnnxBackend(repo, "ssd300_onnx", 1)
        await backend.start()
        assert backend.info.version == "1"
        assert backend.versions.refused["version"] == "2"
        assert "IndexError" in backend.versions.refused["reason"]
        calls = len(checks)
        for _ in range(3):
            assert (await backend.refresh()).switched_to is None
        assert len(checks) == calls  # refused once, not re-checked while unchanged
        await backend.close()

    asyncio.run(main())


@pytest.mark.triton
def test_triton_a_rollback_behind_a_refused_version_serves_the_newest_servable_one(tmp_path):
    """Explicit mode: v1, v2 served, v3 broken (refused). Retiring v2 must bring v1 back (Triton
    still has it loaded: the policy keeps the last two), not keep answering with the retired v2
    because the newest version on disk is the refused v3 (the gateway used to stop there and
    never ask Triton for anything)."""
    repo = tmp_path / "repo"
    write_version(repo, "python", 1)
    write_version(repo, "python", 2)
    store = ModelStore(repo, "ssd300_python")
    scratch = ModelStore(tmp_path / "scratch", "ssd300_python")
    broken = write_version(scratch.root, "python", 3, version=3)
    model_file = scratch.version(broken).file("model.onnx")
    model_file.write_bytes(model_file.read_bytes()[:4096])
    with running_triton(repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        settings = triton_settings(server.grpc_url, repo, model_poll_s=0.2)
        with run_service(settings) as live, live.client() as c:
            scratch.version(broken).path.rename(store.version(broken).path)
            deadline = time.monotonic() + 30
            while (models(live.url)["versions"]["refused"] or {}).get("version") != "3":
                assert time.monotonic() < deadline, models(live.url)
                time.sleep(0.1)
            r = c.post("/v1/detect", files={"image": ("a.jpg", JPEG)})
            assert r.json()["model"]["version"] == "2"
            store.retire(2)
            while (r := c.post("/v1/detect", files={"image": ("a.jpg", JPEG)})).json()["model"][
                "version"
            ] != "1":
                assert r.status_code == 200, r.text
                assert time.monotonic() < deadline + 30, models(live.url)
                time.sleep(0.1)
            assert models(live.url)["versions"]["served"] == "1"


@pytest.mark.triton
def test_triton_explicit_mode_loads_exactly_the_versions_the_gateway_chose(tmp_path):
    """v1, v2 served; v3 broken (refused, never loaded); v4 good: Triton is asked for exactly
    v4 and v2 (under the config's own ``latest: 2`` it would take v3 and v4, and fail on v3).
    Then v4 and v2 are both retired: nothing loaded is left to fall back on, and the newest
    servable version, v1, is loaded and served (not the retired v4, nor the refused v3)."""
    repo = tmp_path / "repo"
    write_version(repo, "python", 1)
    write_version(repo, "python", 2)
    store = ModelStore(repo, "ssd300_python")
    scratch = ModelStore(tmp_path / "scratch", "ssd300_python")
    write_version(scratch.root, "python", 3, version=3)
    write_version(scratch.root, "python", 4, version=4)
    model_file = scratch.version(3).file("model.onnx")
    model_file.write_bytes(model_file.read_bytes()[:4096])

    with running_triton(repo, ["ssd300_python"], tmp_path / "triton.log") as server:
        settings = triton_settings(server.grpc_url, repo, model_poll_s=0.2)
        with run_service(settings) as live, live.client() as c:

            def answered_by(version: str, seconds: float = 60) -> None:
                deadline = time.monotonic() + seconds
                while True:
                    r = c.post("/v1/detect", files={"image": ("a.jpg", JPEG)})
                    assert r.status_code == 200, r.text
                    if r.json()["model"]["version"] == version:
                        return
                    assert time.monotonic() < deadline, (models(live.url), server.log()[-2000:])
                    time.sleep(0.1)

            answered_by("2")
            scratch.version(3).path.rename(store.version(3).path)
            deadline = time.monotonic() + 30
            while (models(live.url)["versions"]["refused"] or {}).get("version") != "3":
                assert time.monotonic() < deadline, models(live.url)
                time.sleep(0.1)
            scratch.version(4).path.rename(store.version(4).path)
            answered_by("4")
            assert "loading: ssd300_python:3" not in server.log()
            store.retire(4)
            store.retire(2)
            answered_by("1")
            assert models(live.url)["versions"]["served"] == "1"
