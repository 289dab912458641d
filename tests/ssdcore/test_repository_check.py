"""``python -m training.export --check DIR``: a repository checked before it is published."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ssdcore.repository import check_repository
from tests.service.versions import write_version

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_version(repo, "onnx", seed=1)
    write_version(repo, "onnx", seed=2)
    return repo


def copy(good: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(good, repo)
    return repo


def test_a_complete_repository_passes(good):
    fine, wrong = check_repository(good)
    assert wrong == [] and len(fine) == 2, (fine, wrong)


@pytest.mark.parametrize(
    "damage, said",
    [
        (lambda v: (v / "metadata.json").unlink(), "version 2: no metadata.json (incomplete"),
        (lambda v: (v / "model.onnx").write_bytes(b"half"), "version 2: "),  # truncated
        (lambda v: (v / "labels.txt").write_text("background\nsomething else\n"), "version 2"),
        (lambda v: (v / "classes.json").write_text('{"ids": [1], "names": ["x"]}'), "version 2"),
        (lambda v: (v.parent / "config.pbtxt").write_text('name: "other"\n'), "names another"),
    ],
)
def test_a_damaged_repository_is_refused_with_the_version_and_why(good, tmp_path, damage, said):
    repo = copy(good, tmp_path)
    damage(repo / "ssd300_onnx" / "2")
    fine, wrong = check_repository(repo)
    assert any(said in w for w in wrong), wrong
    if "version 2" in said:
        assert not any("version 2" in f for f in fine), fine


def test_the_command_exits_1_naming_the_version(good, tmp_path):
    repo = copy(good, tmp_path)
    (repo / "ssd300_onnx" / "2" / "model.onnx").write_bytes(b"truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "training.export", "--check", str(repo)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "WRONG ssd300_onnx version 2" in proc.stdout and "bytes" in proc.stdout, proc.stdout
    assert "ok    ssd300_onnx version 1" in proc.stdout
