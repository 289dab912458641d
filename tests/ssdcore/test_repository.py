"""The repository contract without a model: versions appear complete or not at all, a servable
version is checked file by file, and hostile files are refused with the file named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssdcore.labels import COCO, ClassList
from ssdcore.repository import (
    CLASSES,
    HIGHEST,
    METADATA,
    ModelStore,
    RepositoryError,
    VersionMetadata,
    write_json_atomic,
)

PETS = ClassList((7, 8), ("cat", "dog"))


def publish(store: ModelStore, number: int, classes: ClassList = PETS, payload: bytes = b"onnx"):
    with store.staging(number) as folder:
        (folder / "model.onnx").write_bytes(payload)
        write_json_atomic(classes.to_json(), folder / CLASSES)
        meta = VersionMetadata(
            name=store.name, format="onnx", version=number, num_classes=classes.num_classes,
            topk=100, backbone="resnet18", random_init=True,
        )  # fmt: skip
        return store.publish(folder, meta)


def test_a_published_version_is_complete_and_checked(tmp_path):
    store = ModelStore(tmp_path, "ssd300_onnx")
    v = publish(store, 1)
    assert [x.number for x in store.versions()] == [1]
    assert v.verify().files["model.onnx"].size == 4 and v.classes() == PETS
    assert sorted(p.name for p in store.path.iterdir()) == [HIGHEST, "1"]  # no staging folder left
    assert store.highest_published() == 1
    v.file("model.onnx").write_bytes(b"onnx but longer")
    with pytest.raises(RepositoryError, match=r"model.onnx has 15 bytes, 4 were written"):
        v.verify()
    v.file("model.onnx").write_bytes(b"ONNX")  # same size, other bytes
    with pytest.raises(RepositoryError, match="SHA-256"):
        v.verify()
    assert v.verify(hashes=False)  # sizes only
    with pytest.raises(RepositoryError, match="versions are never overwritten"):
        publish(store, 1)


def test_unfinished_and_foreign_folders_are_not_versions(tmp_path):
    store = ModelStore(tmp_path, "m")
    publish(store, 2)
    (store.path / ".staging-3-999999999").mkdir()  # a writer that was killed
    (store.path / "3").mkdir()  # a number without metadata: never written to the end
    (store.path / "latest").mkdir()
    assert [v.number for v in store.versions()] == [2, 3]
    assert store.newest().number == 2 and [v.number for v in store.servable()] == [2]
    store.remove_stale_staging()
    assert not (store.path / ".staging-3-999999999").exists()


def test_class_list_must_agree_with_the_metadata(tmp_path):
    store = ModelStore(tmp_path, "m")
    v = publish(store, 1)
    write_json_atomic(COCO.to_json(), v.file(CLASSES))
    with pytest.raises(RepositoryError, match=r"lists 80 classes .* has 2"):
        v.classes()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 200_000 + b"]" * 200_000, "nests too deeply"),
        (b'{"classes": [', "not JSON"),
        (b" " * (17 << 20), "larger than"),
    ],
)
def test_hostile_files_are_refused_naming_the_file(tmp_path, content, message):
    store = ModelStore(tmp_path, "m")
    v = publish(store, 1)
    v.file(CLASSES).write_bytes(content)
    with pytest.raises(RepositoryError, match=message) as err:
        v.classes()
    assert str(v.file(CLASSES)) in str(err.value)


def test_metadata_that_is_not_ours_is_refused(tmp_path):
    store = ModelStore(tmp_path, "m")
    v = publish(store, 1)
    doc = json.loads(v.file(METADATA).read_text())
    v.file(METADATA).write_text(json.dumps({**doc, "version": 9}))
    with pytest.raises(RepositoryError, match="says version 9"):
        v.metadata()
    v.file(METADATA).write_text(json.dumps({"name": "m"}))
    with pytest.raises(RepositoryError, match="not version metadata"):
        v.metadata()


def test_prune_and_retire(tmp_path: Path):
    store = ModelStore(tmp_path, "m")
    for n in (1, 2, 3):
        publish(store, n)
    store.version(3).file("model.onnx").write_bytes(b"broken!")
    assert store.prune(1) == [1]  # 2 is the newest servable one; 3 is newer, left alone
    assert [v.number for v in store.versions()] == [2, 3]
    store.retire(3)
    assert [v.number for v in store.versions()] == [2]
    assert sorted(p.name for p in store.path.iterdir()) == [HIGHEST, "2"]
    with pytest.raises(RepositoryError):
        store.retire(3)
