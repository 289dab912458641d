"""NVIDIA's published checkpoint layout loads strictly; unsafe files are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.training.checkpoints import nvidia_key_list, nvidia_like_state
from training.checkpoint import (
    CheckpointError,
    FolderBusy,
    atomic_save,
    load_manifest,
    load_model_weights,
    lock_folder,
    prune_checkpoints,
    read_checkpoint,
    record_checkpoint,
    remove_partial_writes,
    resolve_checkpoint,
)
from training.model import build_model


def test_keys_and_shapes_match_our_model():
    ours = {k: tuple(v.shape) for k, v in build_model().state_dict().items()}
    theirs = {e["key"]: tuple(e["shape"]) for e in nvidia_key_list()}
    assert ours == theirs


def _outputs(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("prefix", ["", "module."])
@pytest.mark.parametrize("half", [False, True])
def test_nvidia_checkpoint_loads_strictly(tmp_path, prefix, half):
    state = nvidia_like_state()
    if half:  # apex O2 wrote conv weights in fp16
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    nvidia = {
        "model": {prefix + k: v for k, v in state.items()},
        "epoch": 65,
        "iteration": 123,
        "label_map": {0: "background", 1: "person"},
    }
    torch.save(nvidia, tmp_path / "nvidia.pt")
    # the same tensors in fp32 under our own names, in our own format
    ours = {
        "format": "ssd300-checkpoint/1",
        "model": {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
    }
    torch.save(ours, tmp_path / "ours.pt")

    a, b = build_model(), build_model()
    load_model_weights(a, tmp_path / "nvidia.pt")
    load_model_weights(b, tmp_path / "ours.pt")
    assert a.conf[0].weight.dtype == torch.float32
    x = torch.randn(1, 3, 300, 300)
    for oa, ob in zip(_outputs(a, x), _outputs(b, x)):
        assert torch.equal(oa, ob)


def test_missing_key_is_an_error(tmp_path):
    state = nvidia_like_state()
    del state["conf.5.bias"]
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model_weights(build_model(), tmp_path / "bad.pt")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ssd300-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = Path("/tmp/ssd300-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"model": {}, "payload": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def test_truncated_and_missing(tmp_path):
    torch.save({"model": nvidia_like_state()}, tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "trunc.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pt")


def test_atomic_save_leaves_no_temp(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(read_checkpoint(tmp_path / "x.pt")["a"], torch.ones(2))


def test_pruning_keeps_the_newest_epochs_and_the_interrupted_one(tmp_path):
    """Epochs saved out of name order (10 after 9): the manifest's order decides what is
    newest, an interrupted checkpoint is never counted nor removed, keep=0 keeps all."""
    for name in ["epoch_8.pt", "epoch_9.pt", "interrupted.pt", "epoch_10.pt", "epoch_11.pt"]:
        atomic_save({"name": name}, tmp_path / name)
        record_checkpoint(tmp_path, name)
    assert prune_checkpoints(tmp_path, 0) == []
    assert prune_checkpoints(tmp_path, 2) == ["epoch_8.pt", "epoch_9.pt"]
    left = ["interrupted.pt", "epoch_10.pt", "epoch_11.pt"]
    assert [e["file"] for e in load_manifest(tmp_path)] == left
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted(left)
    assert prune_checkpoints(tmp_path, 2) == []
    # the fallback survives: the newest corrupted, the one before it is chosen
    (tmp_path / "epoch_11.pt").write_bytes(b"cut")
    chosen, warnings = resolve_checkpoint(tmp_path / "epoch_11.pt")
    assert chosen == tmp_path / "epoch_10.pt" and len(warnings) == 1


def test_remove_partial_writes_only_touches_temporaries(tmp_path):
    atomic_save({"x": torch.zeros(2)}, tmp_path / "epoch_0.pt")
    (tmp_path / ".epoch_1.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".checkpoints.json.tmp").write_text("{")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    removed = remove_partial_writes(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoints.json.tmp", ".epoch_1.pt.abc123.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0.pt", "notes.tmp"]
    assert remove_partial_writes(tmp_path / "missing") == []


def test_one_job_per_save_folder(tmp_path):
    first = lock_folder(tmp_path / "run")
    with pytest.raises(FolderBusy, match="another training job"):
        lock_folder(tmp_path / "run")
    first.close()  # the first job ends (or dies): the folder is free again
    lock_folder(tmp_path / "run").close()
    with lock_folder(tmp_path / "run"), pytest.raises(FolderBusy):  # a context manager too
        lock_folder(tmp_path / "run")
    dropped = lock_folder(tmp_path / "run")
    del dropped  # dropped without close(): the claim goes with it
    lock_folder(tmp_path / "run").close()


def test_save_folder_lock_dies_with_the_job_not_with_its_workers(tmp_path, figures):
    """A SIGKILLed job frees the folder at once even while a forked child (a DataLoader worker)
    outlives it: a restart must not be refused as 'busy'."""
    import subprocess
    import sys
    import time

    ready = tmp_path / "child.pid"
    script = f"""
import os, signal, time
from training.checkpoint import lock_folder
lock = lock_folder({str(tmp_path / "run")!r})
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
open({str(ready)!r}, "w").write(str(pid))
os.kill(os.getpid(), signal.SIGKILL)
"""
    from tests.training.conftest import ROOT

    job = subprocess.run([sys.executable, "-c", script], cwd=ROOT, timeout=60)
    assert job.returncode == -9
    child = int(ready.read_text())
    try:
        os.kill(child, 0)  # the worker is still alive ...
        t0 = time.monotonic()
        lock_folder(tmp_path / "run").close()  # ... and the folder is free
        waited = time.monotonic() - t0
    finally:
        os.kill(child, 9)
        time.sleep(0.1)
    figures(
        "SIGKILL of a training job whose forked worker outlives it",
        "the save folder is free for a restart at once",
        "the worker still ran; the folder was claimed again",
        f"claimed {1e3 * waited:.1f} ms after the job died",
    )


def test_lock_folder_clear_error_for_an_unusable_folder(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match="cannot lock the save folder"):
        lock_folder(tmp_path / "file")
