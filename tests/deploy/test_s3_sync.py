"""The chart's S3 model repository (``model.repository.kind: s3``) without a cluster: the gateway
sidecar's sync script, as the chart renders it, run with the sidecar's command and environment
by Debian's /bin/sh and the aws CLI against moto's S3 server on 127.0.0.1, while
deploy/s3_publish.sh publishes versions the export wrote. What a gateway makes of the copy is
read by the gateway's own code (service.backends.version_info). Triton reading S3 itself is not
exercised: the tritonserver here is built without S3 support.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploy.chart import one, render
from service.backends import version_info
from ssdcore.labels import COCO, ClassList
from ssdcore.repository import ModelStore
from tests.service.versions import write_version
from tests.waiting import wait_for

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("helm_python")

pytestmark = [pytest.mark.kube, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the aws CLI of the dev install
BUCKET, PREFIX, MODEL = "models", "ssd300", "ssd300_onnx"
OWN = ClassList((40, 7, 12), ("Zebra crossing", "Café table", "señal de tráfico"))
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **lower(CREDENTIALS))
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def lower(env: dict[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


def aws_env(tmp: Path, **more: str) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "HOME": str(tmp),
        **CREDENTIALS,
        **more,
    }


@pytest.fixture
def sidecar(s3, tmp_path):
    """The gateway pod's models-sync container, run here: its script from the chart's
    ConfigMap, its command and environment, with /models and /tmp/staging under tmp_path."""
    endpoint, _ = s3
    values = {
        "model": {"name": MODEL, "repository": {"kind": "s3", "s3": {
            "bucketPath": f"{BUCKET}/{PREFIX}", "endpoint": endpoint, "syncSeconds": 1}}},
        "export": {"enabled": False},
    }  # fmt: skip
    objects = render(values)
    script = one(objects, "ConfigMap")["data"]["sync.sh"]
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "sync.sh").write_text(script)
    pod = one(objects, "Deployment", "gateway")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "models-sync"]
    assert container["command"] == ["/bin/sh", "/sync/sync.sh"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SOURCE"] == f"s3://{BUCKET}/{PREFIX}" and env["ENDPOINT"] == endpoint
    models = tmp_path / "models"
    paths = {"HOME": str(tmp_path), "MODELS": str(models), "STAGING": str(tmp_path / "staging")}
    proc = subprocess.Popen(
        ["/bin/sh", str(tmp_path / "sync" / "sync.sh")],
        env={**aws_env(tmp_path), **env, **paths},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    yield models
    os.killpg(proc.pid, signal.SIGTERM)  # the shell and the aws CLI it may be running
    out, _ = proc.communicate(timeout=30)
    assert out == "", out  # --only-show-errors: anything it printed is an error


def publish(s3, tmp: Path, source: Path, wait_s: float, prefix: str = PREFIX) -> subprocess.Popen:
    endpoint, _ = s3
    return subprocess.Popen(
        ["sh", str(ROOT / "deploy" / "s3_publish.sh"), str(source), f"s3://{BUCKET}/{prefix}/"],
        env=aws_env(tmp, ENDPOINT=endpoint, WAIT_S=str(wait_s)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a group of its own: stopped with the aws CLI and sleep it runs
    )


def finished(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    return out


def keys(client) -> set[str]:
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX + "/").get("Contents", [])
    return {o["Key"].removeprefix(PREFIX + "/") for o in listed}


def test_versions_reach_the_gateways_before_triton_and_a_rollback_removes_them(
    s3, sidecar, tmp_path, figures
):
    _, client = s3
    exported = tmp_path / "exported"
    assert write_version(exported, "onnx", seed=1) == 1
    t0 = time.monotonic()
    finished(publish(s3, tmp_path, exported, 0))
    store = ModelStore(sidecar, MODEL)
    wait_for(lambda: store.version(1).has_metadata(), 30, 0.1)
    first_copy_s = time.monotonic() - t0
    copied = sorted(p.name for p in store.version(1).path.iterdir())
    assert copied == ["classes.json", "labels.txt", "metadata.json"]  # never the model file
    assert version_info(store.version(1), "triton", 0).classes == COCO
    assert {f"{MODEL}/1/model.onnx", f"{MODEL}/1/metadata.json", f"{MODEL}/config.pbtxt"} <= keys(
        client
    )

    # version 2 with its own classes, an export in progress beside it: its class list is in
    # every gateway's copy while S3 holds nothing of it where Triton looks
    assert write_version(exported, "onnx", seed=2, classes=OWN) == 2
    in_progress = exported / MODEL / ".staging-3-4242"
    in_progress.mkdir()
    (in_progress / "model.onnx").write_bytes(b"half")
    proc = publish(s3, tmp_path, exported, 8)
    labelled_s = wait_for(lambda: store.version(2).has_metadata(), 30, 0.1)
    seen_by_triton = [k for k in keys(client) if k.startswith(f"{MODEL}/2/")]
    assert seen_by_triton == [], "version 2 showed in Triton's repository before its labels"
    assert version_info(store.version(2), "triton", 0).classes == OWN
    out = finished(proc)
    assert f"published {MODEL}/2/model.onnx" in out, out
    uploaded = client.head_object(Bucket=BUCKET, Key=f"{PREFIX}/{MODEL}/2/model.onnx")
    assert uploaded["ContentLength"] == (exported / MODEL / "2" / "model.onnx").stat().st_size
    assert not any(".staging-" in k or ".next-" in k for k in keys(client)), keys(client)
    # the sidecar's staging has lost .next-2 and kept MODEL/2/: the copy stays
    staged = sidecar.parent / "staging" / MODEL
    wait_for(
        lambda: not (staged / ".next-2").exists() or not any((staged / ".next-2").iterdir()),
        30,
        0.1,
    )
    time.sleep(1.5)  # the rest of that round and the next one
    assert [v.number for v in store.versions()] == [1, 2]
    assert not (store.path / "2" / "model.onnx").exists()
    assert "nothing new" in finished(publish(s3, tmp_path, exported, 0))

    # a run that stopped right after a model file: the rerun finishes that version
    assert write_version(exported, "onnx", seed=3) == 3
    v3 = exported / MODEL / "3"
    for name in ("classes.json", "labels.txt", "metadata.json"):
        client.upload_file(str(v3 / name), BUCKET, f"{PREFIX}/{MODEL}/.next-3/{name}")
    client.upload_file(str(v3 / "model.onnx"), BUCKET, f"{PREFIX}/{MODEL}/3/model.onnx")
    out = finished(publish(s3, tmp_path, exported, 0))
    assert f"published {MODEL}/3/model.onnx" in out and "follow in" not in out, out
    assert {f"{MODEL}/3/metadata.json", f"{MODEL}/3/classes.json"} <= keys(client)
    assert not any(".next-" in k for k in keys(client))
    wait_for(lambda: store.version(3).has_metadata(), 30, 0.1)

    # a version without its metadata.json in S3 (an upload cut short) is not copied
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{MODEL}/4/classes.json", Body=b"[]")
    # rollback: version 2 removed from S3 leaves every gateway's copy
    for key in [k for k in keys(client) if k.startswith(f"{MODEL}/2/")]:
        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
    client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{MODEL}/.retired-2", Body=b"")
    rollback_s = wait_for(lambda: not store.version(2).path.exists(), 30, 0.1)
    assert "rolled back" in finished(publish(s3, tmp_path, exported, 0))  # not published again
    assert not any(k.startswith(f"{MODEL}/2/") for k in keys(client))
    time.sleep(2.5)
    assert [v.number for v in store.versions()] == [1, 3]
    assert [p.name for p in store.path.iterdir() if p.name.startswith(".")] == []
    figures(
        "S3 repository: the chart's sync sidecar and deploy/s3_publish.sh (moto S3, aws CLI)",
        "labels in the gateways' copy before Triton's repository holds any file of the version; "
        "rollback removes a version",
        f"first version in the copy {first_copy_s:.1f} s after its publish began (no wait); the "
        f"next one's labels {labelled_s:.1f} s after (its model file held back 8 s)",
        f"removed from the copy {rollback_s:.1f} s after it left S3 (sync every 1 s)",
    )


def test_publish_refuses_what_it_cannot_publish(tmp_path):
    script = str(ROOT / "deploy" / "s3_publish.sh")
    env = aws_env(tmp_path)
    two_files = tmp_path / "python"  # the python format: model.py and model.onnx
    write_version(two_files, "python", seed=6)
    for args, said in [
        ([], "usage"),
        ([str(tmp_path / "none"), "s3://b/p"], "is not a folder"),
        ([str(tmp_path), "/local/path"], "is not an s3:// URL"),
        ([str(two_files), "s3://b/p"], "nothing in"),
    ]:
        proc = subprocess.run(["sh", script, *args], env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)
    assert shutil.which("aws", path=env["PATH"]), "the aws CLI of the dev install"
    assert os.access(script, os.X_OK)


def test_publish_skips_the_python_format_and_publishes_the_rest(s3, tmp_path):
    """The export's default formats (onnx, torchscript, python): the python versions (two model
    files) are skipped, said on stderr, and the others published."""
    _, client = s3
    source = tmp_path / "repo"
    write_version(source, "onnx", seed=3)
    write_version(source, "python", seed=3)
    out = finished(publish(s3, tmp_path, source, 0, prefix="mixed"))
    assert "skipped" in out and "ssd300_python/1" in out, out
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="mixed/").get("Contents", [])
    published = {o["Key"].removeprefix("mixed/") for o in listed}
    assert {f"{MODEL}/1/model.onnx", f"{MODEL}/1/metadata.json"} <= published, published
    assert not any(k.startswith("ssd300_python/") for k in published), published


def test_an_s3_error_other_than_404_stops_the_publish(tmp_path):
    """An endpoint that cannot be reached (as a 403 or throttling would): "cannot tell whether
    it exists", exit 3, never taken for "absent"."""
    source = tmp_path / "repo"
    write_version(source, "onnx", seed=4)
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    proc = subprocess.run(
        ["sh", str(ROOT / "deploy" / "s3_publish.sh"), str(source), f"s3://{BUCKET}/{PREFIX}/"],
        env=aws_env(tmp_path, ENDPOINT=f"http://127.0.0.1:{port}", WAIT_S="0",
                    AWS_MAX_ATTEMPTS="1", AWS_RETRY_MODE="standard"),
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert "cannot tell whether" in proc.stderr, proc.stderr
    assert "published" not in proc.stdout, proc.stdout


def test_publish_checks_the_repository_first(s3, tmp_path):
    """A version copied in part (its model file short of what its metadata records) stops the
    publish before anything is uploaded, naming the version and why."""
    _, client = s3
    source = tmp_path / "repo"
    write_version(source, "onnx", seed=5)
    model = source / MODEL / "1" / "model.onnx"
    model.write_bytes(model.read_bytes()[:1000])
    proc = publish(s3, tmp_path, source, 0, prefix="checked")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    assert "failed its check" in out and f"{MODEL} version 1" in out, out
    assert not client.list_objects_v2(Bucket=BUCKET, Prefix="checked/").get("Contents"), out


def test_a_changed_config_is_refused_before_anything_is_uploaded(s3, tmp_path):
    """Version 1 published; version 2 exported with another config.pbtxt (say another max batch
    size): refused before any upload, so no MODEL/.next-2/ is left for the sidecars to install
    as a version Triton will never load (it used to upload the labels first)."""
    _, client = s3
    source = tmp_path / "repo"
    write_version(source, "onnx", seed=1)
    finished(publish(s3, tmp_path, source, 0, prefix="configs"))
    write_version(source, "onnx", seed=2)
    config = source / MODEL / "config.pbtxt"
    config.write_text(config.read_text() + "\n# changed\n")
    before = {
        o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="configs/")["Contents"]
    }
    proc = publish(s3, tmp_path, source, 0, prefix="configs")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "config.pbtxt differs" in out, out
    after = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="configs/")["Contents"]}
    assert after == before, after - before


def test_a_version_number_from_two_exports_is_told_apart_by_its_content(s3, sidecar, tmp_path):
    """A publish stopped in its wait leaves MODEL/.next-1/ (labels only), which the sidecars
    install as version 1. Another export, written into a fresh folder, is version 1 again with
    other classes: its publish replaces the .next-1/ labels and every sidecar replaces its copy
    (it used to keep the first export's, and gateways labelled the new model with the old
    names). A third export numbered 1 is refused before anything is uploaded: S3's version 1
    is another export's."""
    _, client = s3
    for key in keys(client):  # this test's own S3 (the sidecar follows PREFIX)
        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{key}")
    store = ModelStore(sidecar, MODEL)
    first, second, third = (tmp_path / name for name in ("first", "second", "third"))
    assert write_version(first, "onnx", seed=1) == 1
    stopped = publish(s3, tmp_path, first, 600)
    wait_for(lambda: store.version(1).has_metadata(), 30, 0.1)
    os.killpg(stopped.pid, signal.SIGKILL)  # the script and its sleep: a publish cut short
    stopped.communicate(timeout=30)
    assert version_info(store.version(1), "triton", 0).classes == COCO
    assert f"{MODEL}/.next-1/metadata.json" in keys(client)

    assert write_version(second, "onnx", seed=2, classes=OWN) == 1
    out = finished(publish(s3, tmp_path, second, 0))
    assert f"published {MODEL}/1/model.onnx" in out, out
    wait_for(lambda: version_info(store.version(1), "triton", 0).classes == OWN, 30, 0.1)
    published = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{MODEL}/1/metadata.json")
    assert published["Body"].read() == (second / MODEL / "1" / "metadata.json").read_bytes()

    assert write_version(third, "onnx", seed=3) == 1
    proc = publish(s3, tmp_path, third, 0)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "another export" in out, out
    again = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/{MODEL}/1/metadata.json")
    assert again["Body"].read() == (second / MODEL / "1" / "metadata.json").read_bytes()
    time.sleep(2.5)  # two more sync rounds: the copy stays the second export's, no flapping
    assert version_info(store.version(1), "triton", 0).classes == OWN
    assert [p.name for p in store.path.iterdir() if p.name.startswith(".")] == []


def test_the_triton_gateway_reads_a_rewritten_versions_class_list_again(tmp_path):
    """The gateway's side of the same case: the served version's folder replaced by another
    export's under the same number; the next repository check labels with the new names."""
    from service.backends.triton import TritonBackend
    from tests.service.versions import copy_version

    repo, other = tmp_path / "repo", tmp_path / "other"
    write_version(repo, "onnx", seed=1)
    write_version(other, "onnx", seed=2, classes=OWN)
    backend = TritonBackend("127.0.0.1:1", MODEL, 1.0, repo)
    backend._serve("1", backend.info_for("1"))
    pin = backend.pin()
    assert pin.info.classes == COCO
    store = ModelStore(repo, MODEL)
    shutil.rmtree(store.version(1).path)
    copy_version(ModelStore(other, MODEL).version(1).path, store, 1)
    backend._relabel()
    assert backend.info.classes == OWN and backend.pin().info.classes == OWN
    assert backend.pin() is not pin  # requests admitted before keep their own labels
