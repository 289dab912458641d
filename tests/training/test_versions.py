"""Versions written by the export: the next number each time, atomically, kept, pruned, retired;
``--ensure`` compares the checkpoint it is given with the one the newest version came from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssdcore.labels import COCO
from ssdcore.repository import ModelStore, file_sha256
from training.export import main
from training.model import build_model, calibrate_random_model

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--formats", "onnx", "--cpu", "--backbone", "resnet18"]


def checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = build_model("resnet18")
    calibrate_random_model(model)
    torch.save({"model": model.state_dict(), "config": {"backbone": "resnet18"},
                "classes": COCO.to_json()}, path)  # fmt: skip
    return path


def numbers(repo: Path, name: str = "ssd300_onnx") -> list[int]:
    return [v.number for v in ModelStore(repo, name).versions()]


def test_each_export_is_the_next_version_and_leaves_the_served_ones_alone(tmp_path):
    repo = tmp_path / "repo"
    assert main(["--random-init", "--output", str(repo), *FAST]) == 0
    v1 = repo / "ssd300_onnx" / "1" / "model.onnx"
    before = (v1.stat().st_mtime_ns, file_sha256(v1))
    a, b = checkpoint(tmp_path / "a.pt", 1), checkpoint(tmp_path / "b.pt", 2)
    assert main(["--checkpoint", str(a), "--output", str(repo), *FAST]) == 0
    assert main(["--checkpoint", str(b), "--output", str(repo), *FAST, "--version", "7"]) == 0
    assert numbers(repo) == [1, 2, 7]
    assert (v1.stat().st_mtime_ns, file_sha256(v1)) == before
    meta = json.loads((repo / "ssd300_onnx" / "7" / "metadata.json").read_text())
    assert meta["version"] == 7 and meta["source"]["sha256"] == file_sha256(b)
    with pytest.raises(SystemExit, match="exists"):
        main(["--checkpoint", str(a), "--output", str(repo), *FAST, "--version", "7"])
    assert main(["--checkpoint", str(a), "--output", str(repo), *FAST]) == 0
    assert numbers(repo) == [2, 7, 8]  # --keep 3 by default


def test_keep_counts_servable_versions_only(tmp_path):
    """A broken version never counts towards --keep, so the one a service falls back to stays."""
    repo = tmp_path / "repo"
    for _ in range(3):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    store = ModelStore(repo, "ssd300_onnx")
    store.version(3).file("model.onnx").write_bytes(b"cut short")
    ckpt = checkpoint(tmp_path / "a.pt", 1)
    assert main(["--checkpoint", str(ckpt), "--output", str(repo), *FAST, "--keep", "2"]) == 0
    assert numbers(repo) == [2, 3, 4]  # kept: 4 and 2 (servable); 3 is newer than 2
    assert [v.number for v in store.servable()] == [2, 4]


def test_an_export_killed_in_the_middle_leaves_no_version(tmp_path):
    repo = tmp_path / "repo"
    assert main(["--random-init", "--output", str(repo), *FAST]) == 0
    cmd = [sys.executable, "-m", "training.export", "--random-init", "--output", str(repo),
           "--formats", "onnx", "python", "--cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    model = repo / "ssd300_onnx"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".staging-") for p in model.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.5)  # in the middle of writing the ONNX file
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert numbers(repo) == [1]
    assert not (repo / "ssd300_python" / "2").exists()
    # the next export clears the dead writer's folder and takes the number
    assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert numbers(repo) == [1, 2]
    assert [p.name for p in model.iterdir() if p.name.startswith((".staging", ".retired"))] == []


def test_retire_rolls_back_and_refuses_to_leave_nothing(tmp_path):
    repo = tmp_path / "repo"
    for _ in range(2):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert main(["--retire", "2", "--output", str(repo)]) == 0
    assert numbers(repo) == [1]
    assert main(["--retire", "1", "--output", str(repo)]) == 2  # the last servable one
    assert main(["--retire", "5", "--output", str(repo)]) == 2
    assert numbers(repo) == [1]


def test_ensure_means_this_checkpoint_with_these_options(tmp_path):
    repo = tmp_path / "repo"
    a, b = checkpoint(tmp_path / "a.pt", 1), checkpoint(tmp_path / "b.pt", 2)
    args = ["--output", str(repo), *FAST, "--ensure"]
    assert main(["--checkpoint", str(a), *args]) == 0
    assert main(["--checkpoint", str(a), *args]) == 0
    assert numbers(repo) == [1]  # the same file: nothing to do
    assert main(["--checkpoint", str(b), *args]) == 0
    assert numbers(repo) == [1, 2]  # another checkpoint is the next version
    assert main(["--checkpoint", str(b), *args, "--topk", "500"]) == 0
    assert numbers(repo) == [1, 2, 3]  # other options too
    # a truncated newest version is not "present": --ensure writes a new one
    ModelStore(repo, "ssd300_onnx").version(3).file("model.onnx").write_bytes(b"x")
    assert main(["--checkpoint", str(b), *args, "--topk", "500"]) == 0
    assert numbers(repo) == [1, 2, 3, 4]  # the broken 3 does not count towards --keep


def test_numbers_only_go_up_after_a_retire(tmp_path):
    """A retired number is never handed out again (gateways, Triton's class-list cache and the
    S3 copies know it as the retired version)."""
    repo = tmp_path / "repo"
    for _ in range(3):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert main(["--retire", "3", "--output", str(repo)]) == 0
    assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert numbers(repo) == [1, 2, 4]


def test_an_explicit_version_number_below_one_handed_out_is_refused(tmp_path):
    repo = tmp_path / "repo"
    for _ in range(3):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert main(["--retire", "2", "--output", str(repo)]) == 0
    with pytest.raises(SystemExit, match="numbers only go up"):  # below the newest present
        main(["--random-init", "--output", str(repo), *FAST, "--version", "2"])
    assert main(["--retire", "3", "--output", str(repo)]) == 0
    with pytest.raises(SystemExit, match="numbers only go up"):  # the newest, retired
        main(["--random-init", "--output", str(repo), *FAST, "--version", "3"])
    assert numbers(repo) == [1]
    assert main(["--random-init", "--output", str(repo), *FAST, "--version", "7"]) == 0
    assert numbers(repo) == [1, 7]


def test_a_repository_written_before_the_record_keeps_a_retired_number(tmp_path):
    """A repository whose versions predate the record of the highest number (an older export):
    retiring its newest version records it, and the next export does not take it again."""
    from ssdcore.repository import HIGHEST

    repo = tmp_path / "repo"
    for _ in range(3):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    (repo / "ssd300_onnx" / HIGHEST).unlink()
    assert main(["--retire", "3", "--output", str(repo)]) == 0
    assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    assert numbers(repo) == [1, 2, 4]


def test_two_retires_at_once_never_leave_nothing_servable(tmp_path, monkeypatch):
    """Two `--retire` runs at once, of the only two servable versions: both reach the lock before
    either has looked (a barrier orders two threads as two processes could interleave); the
    second to hold it sees the first's retire and refuses."""
    import contextlib
    import threading

    import training.export.__main__ as cli
    from ssdcore.repository import exclusive

    repo = tmp_path / "repo"
    for _ in range(2):
        assert main(["--random-init", "--output", str(repo), *FAST, "--keep", "0"]) == 0
    both = threading.Barrier(2)

    @contextlib.contextmanager
    def once_both_are_here(root, wait=None):
        both.wait(timeout=10)
        with exclusive(root, wait):
            yield

    monkeypatch.setattr(cli, "exclusive", once_both_are_here)
    codes: dict[int, int] = {}
    threads = [
        threading.Thread(target=lambda n=n: codes.__setitem__(n, cli.retire(repo, ["onnx"], n)))
        for n in (1, 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(codes.values()) == [0, 2], codes
    assert len(numbers(repo)) == 1


def export_command(repo: Path, classes: Path) -> list[str]:
    return [sys.executable, "-m", "training.export", "--random-init", "--output", str(repo),
            "--classes", str(classes), *FAST, "--keep", "0"]  # fmt: skip


def test_exports_at_once_take_their_numbers_one_after_the_other(tmp_path):
    """Two exports into one repository at the same moment (two release revisions' export Jobs
    on one volume): each writes a whole version of its own, with its own class list."""
    import onnx

    from ssdcore.labels import ClassList
    from ssdcore.repository import CLASSES

    lists = {
        "pets": ClassList((7, 8, 9), ("cat", "dog", "bird")),
        "cars": ClassList((3, 4), ("car", "truck")),
    }
    files = {}
    for name, classes in lists.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(classes.to_json()))
    repo = tmp_path / "repo"
    procs = [
        subprocess.Popen(export_command(repo, f), cwd=ROOT, stderr=subprocess.PIPE, text=True)
        for f in files.values()
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    store = ModelStore(repo, "ssd300_onnx")
    assert numbers(repo) == [1, 2]
    seen = set()
    for version in store.versions():
        version.verify()  # every file as its metadata says
        classes = ClassList.from_json(json.loads(version.file(CLASSES).read_text()))
        props = {p.key: p.value for p in onnx.load(str(version.file("model.onnx"))).metadata_props}
        assert ClassList.from_json(json.loads(props["classes"])) == classes  # its own model
        seen.add(classes.names)
    assert seen == {c.names for c in lists.values()}
    assert [p.name for p in store.path.iterdir() if p.name.startswith(".staging")] == []


def test_an_export_waits_for_the_one_writing_and_never_removes_its_staging(tmp_path):
    """Another pod's export is writing (it holds the repository's lock; its staging folder is
    named by a PID this host does not have): a new export waits, leaves that folder alone, and
    goes on once the lock is released."""
    from ssdcore.labels import COCO
    from ssdcore.repository import exclusive

    repo = tmp_path / "repo"
    classes = tmp_path / "coco.json"
    classes.write_text(json.dumps(COCO.to_json()))
    staging = repo / "ssd300_onnx" / ".staging-1-4194301"  # no such PID here
    with exclusive(repo):
        staging.mkdir(parents=True)
        proc = subprocess.Popen(export_command(repo, classes), cwd=ROOT, stderr=subprocess.PIPE)
        time.sleep(8)  # long enough for an unlocked export to have cleared it and written
        assert proc.poll() is None and staging.is_dir() and numbers(repo) == []
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert b"another export is writing" in err
    assert numbers(repo) == [1] and not staging.exists()  # abandoned once the lock was free
