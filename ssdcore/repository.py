"""The model repository: the contract between the export (which writes it) and the service (which
reads it). numpy-free and torch-free: both sides import it.

Layout (Triton's, with this project's files inside each version)::

    <root>/<model>/config.pbtxt         Triton's configuration, shared by the versions
    <root>/<model>/<N>/model.onnx       the version's model file (model.pt; model.py + model.onnx)
    <root>/<model>/<N>/classes.json     its class list (ssdcore.labels.ClassList)
    <root>/<model>/<N>/labels.txt       the same names, one per line (for people and Triton)
    <root>/<model>/<N>/metadata.json    written last: what the version is, with the size and
                                        SHA-256 of every file above
    <root>/<model>/.staging-<N>-<id>/   a version being written; renamed to <N> once complete
    <root>/<model>/.highest-version     the highest number ever published: numbers only go up
    <root>/.export.lock                 held (flock) by the one export writing at a time

A version folder appears in one rename, complete, so Triton and the service never see half of
one; a folder killed in the middle stays a ``.staging-*`` folder that nothing serves (Triton
ignores folders whose name is not a number). Writers take the repository's lock for the whole
export (:func:`exclusive`): two exports at once (two release revisions of a chart, each with
its export Job on the same volume) take their numbers one after the other, and staging folders
found while holding it are abandoned (their writer held the lock), whatever host or PID
namespace wrote them. The lock is ``flock(2)``: local file systems, and NFS (Linux maps it to
the server's byte-range locks, NFSv4 or NFSv3 with the lock manager). A version is *servable* when its metadata parses,
its files have the recorded sizes and hashes, and its class list agrees with the class count
the metadata declares (:meth:`ModelVersion.verify`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssdcore.labels import ClassList

MODEL_NAMES = {
    "onnx": "ssd300_onnx",
    "onnx_int8": "ssd300_onnx_int8",
    "torchscript": "ssd300_torchscript",
    "python": "ssd300_python",
    "raw": "ssd300_raw",
}
MODEL_FILES = {  # the files that make a version of each format
    "onnx": ("model.onnx",),
    "onnx_int8": ("model.onnx",),
    "raw": ("model.onnx",),
    "torchscript": ("model.pt",),
    "python": ("model.py", "model.onnx"),
}
CONFIG = "config.pbtxt"
CLASSES = "classes.json"
LABELS = "labels.txt"
METADATA = "metadata.json"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
HIGHEST = ".highest-version"
LOCK = ".export.lock"
METADATA_FORMAT = "ssd300-version/1"
MAX_JSON_BYTES = 16 << 20  # classes.json / metadata.json larger than this are not ours


class RepositoryError(ValueError):
    """A model version that cannot be served; the message names the file and what is wrong."""


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json_file(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file of the repository, or RepositoryError naming it (never a bare decode error)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise RepositoryError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise RepositoryError(f"{path} is larger than {max_bytes} bytes")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RepositoryError(f"{path} is not UTF-8 (byte {exc.start})") from None
    except RecursionError:
        raise RepositoryError(f"{path} nests too deeply to be a class list or metadata") from None
    except ValueError as exc:
        raise RepositoryError(f"{path} is not JSON: {exc}") from None


def write_json_atomic(obj: Any, path: Path) -> None:
    """Write JSON via a temporary file and a rename, so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class FileFact:
    size: int
    sha256: str


@dataclass(frozen=True)
class VersionMetadata:
    """``<model>/<N>/metadata.json``: what a version is and where it came from."""

    name: str  # the model's name (ssd300_onnx, ...)
    format: str  # a key of MODEL_NAMES
    version: int
    num_classes: int  # outputs per anchor: classes + background
    topk: int  # candidates per image (0 for the raw model)
    backbone: str
    random_init: bool  # untrained weights: the detections mean nothing
    precision: str = "fp32"
    # the checkpoint it came from: {"checkpoint", "sha256", "epoch"} (None values when random)
    source: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)  # export options that shape the files
    files: dict[str, FileFact] = field(default_factory=dict)  # file name -> size, SHA-256
    random_init_reason: str | None = None
    exported_at: str = ""
    extra: dict = field(default_factory=dict)  # facts of a format (INT8 calibration, ...)

    def to_json(self) -> dict:
        doc = asdict(self)
        doc["files"] = {name: asdict(fact) for name, fact in self.files.items()}
        return {"format_version": METADATA_FORMAT, **doc}

    @classmethod
    def from_json(cls, doc: Any, where: str) -> VersionMetadata:
        if not isinstance(doc, dict) or doc.get("format_version") != METADATA_FORMAT:
            raise RepositoryError(f"{where}: not version metadata ({METADATA_FORMAT})")
        try:
            files = {
                str(name): FileFact(int(f["size"]), str(f["sha256"]))
                for name, f in doc["files"].items()
            }
            meta = cls(
                name=str(doc["name"]),
                format=str(doc["format"]),
                version=int(doc["version"]),
                num_classes=int(doc["num_classes"]),
                topk=int(doc["topk"]),
                backbone=str(doc["backbone"]),
                random_init=bool(doc["random_init"]),
                precision=str(doc.get("precision", "fp32")),
                source=dict(doc.get("source") or {}),
                options=dict(doc.get("options") or {}),
                files=files,
                random_init_reason=doc.get("random_init_reason"),
                exported_at=str(doc.get("exported_at", "")),
                extra=dict(doc.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RepositoryError(f"{where}: malformed metadata ({exc!r})") from None
        if meta.format not in MODEL_NAMES or meta.num_classes < 2:
            raise RepositoryError(f"{where}: unknown format or class count")
        return meta

    def public(self) -> dict:
        """What the service shows of it (``GET /v1/models``)."""
        doc = self.to_json()
        doc.pop("files")
        return doc


@dataclass(frozen=True)
class ModelVersion:
    """One version folder of a model."""

    path: Path
    number: int

    @property
    def label(self) -> str:
        return str(self.number)

    def file(self, name: str) -> Path:
        return self.path / name

    def has_metadata(self) -> bool:
        return (self.path / METADATA).is_file()

    def stamp(self) -> tuple[int, int]:
        """Changes when the version is rewritten (metadata.json is written last)."""
        st = (self.path / METADATA).stat()
        return st.st_mtime_ns, st.st_ino

    def metadata(self) -> VersionMetadata:
        meta = VersionMetadata.from_json(read_json_file(self.path / METADATA), str(self.path))
        if meta.version != self.number:
            raise RepositoryError(
                f"{self.path / METADATA} says version {meta.version}, its folder {self.number}"
            )
        return meta

    def classes(self, meta: VersionMetadata | None = None) -> ClassList:
        """The version's class list, checked against the class count its metadata declares."""
        path = self.path / CLASSES
        try:
            classes = ClassList.from_json(read_json_file(path))
        except RepositoryError:
            raise
        except ValueError as exc:
            raise RepositoryError(f"{path}: {exc}") from None
        meta = meta or self.metadata()
        if classes.num_classes != meta.num_classes:
            raise RepositoryError(
                f"{path} lists {len(classes)} classes but {self.path / METADATA} says the "
                f"model has {meta.num_classes - 1}: export the model and its classes together"
            )
        return classes

    def verify(self, hashes: bool = True) -> VersionMetadata:
        """The metadata of a servable version, else RepositoryError saying what is wrong."""
        meta = self.metadata()
        for name in MODEL_FILES[meta.format]:
            if name not in meta.files:
                raise RepositoryError(f"{self.path / METADATA} does not record {name}")
        for name, fact in meta.files.items():
            path = self.path / name
            try:
                size = path.stat().st_size
            except OSError:
                raise RepositoryError(f"{path} is missing") from None
            if size != fact.size:
                raise RepositoryError(
                    f"{path} has {size} bytes, {fact.size} were written (truncated or replaced)"
                )
            if hashes and file_sha256(path) != fact.sha256:
                raise RepositoryError(f"{path} does not match its recorded SHA-256")
        self.classes(meta)
        return meta


@dataclass(frozen=True)
class ModelStore:
    """One model of a repository (``<root>/<name>/``) and its versions."""

    root: Path
    name: str

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    def version(self, number: int) -> ModelVersion:
        return ModelVersion(self.path / str(number), number)

    def versions(self) -> list[ModelVersion]:
        """Every numbered folder, oldest first (complete or not)."""
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return []
        numbers = sorted(
            int(e.name)
            for e in entries
            if e.name.isascii() and e.name.isdigit() and e.is_dir() and int(e.name) > 0
        )
        return [self.version(n) for n in numbers]

    def with_metadata(self) -> list[ModelVersion]:
        """The versions that were written to the end (metadata.json present), oldest first."""
        return [v for v in self.versions() if v.has_metadata()]

    def newest(self) -> ModelVersion | None:
        found = self.with_metadata()
        return found[-1] if found else None

    def servable(self, hashes: bool = True) -> list[ModelVersion]:
        out = []
        for v in self.with_metadata():
            with contextlib.suppress(RepositoryError):
                v.verify(hashes)
                out.append(v)
        return out

    # ------------------------------------------------------------------ writing

    def next_number(self) -> int:
        """One more than any version present or ever published (a retired number is never
        handed out again: gateways and S3 copies know it as the retired version)."""
        numbers = [v.number for v in self.versions()]
        return max(*numbers, self.highest_published(), 0) + 1

    def highest_published(self) -> int:
        try:
            return int((self.path / HIGHEST).read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    @contextlib.contextmanager
    def staging(self, number: int) -> Iterator[Path]:
        """A folder to write version ``number`` into; removed unless :meth:`publish` moved it."""
        self.path.mkdir(parents=True, exist_ok=True)
        folder = self.path / f"{STAGING_PREFIX}{number}-{uuid.uuid4().hex[:12]}"
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, folder: Path, meta: VersionMetadata) -> ModelVersion:
        """Record the files of ``folder`` in its metadata (written last) and rename it into
        place as version ``meta.version``. Refuses to replace an existing version."""
        files = {}
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and entry.name != METADATA:
                files[entry.name] = FileFact(entry.stat().st_size, file_sha256(entry))
        full = VersionMetadata(**{**asdict(meta), "files": files})
        write_json_atomic(full.to_json(), folder / METADATA)
        _fsync_tree(folder)
        target = self.path / str(meta.version)
        if target.exists():
            raise RepositoryError(f"{target} exists: versions are never overwritten")
        os.rename(folder, target)
        if meta.version > self.highest_published():
            write_text_atomic(f"{meta.version}\n", self.path / HIGHEST)
        _fsync_dir(self.path)
        return self.version(meta.version)

    def retire(self, number: int) -> None:
        """Remove version ``number``: it disappears in one rename, then its files go."""
        source = self.path / str(number)
        if not source.is_dir():
            raise RepositoryError(f"{source} does not exist")
        # the number stays taken (a repository written before the record existed gets it now)
        highest = max(number, *(v.number for v in self.versions()))
        if highest > self.highest_published():
            write_text_atomic(f"{highest}\n", self.path / HIGHEST)
        gone = self.path / f"{RETIRED_PREFIX}{number}-{uuid.uuid4().hex[:12]}"
        os.rename(source, gone)
        shutil.rmtree(gone, ignore_errors=True)

    def prune(self, keep: int) -> list[int]:
        """Remove the versions older than the newest ``keep`` servable ones; returns their
        numbers. A broken or unfinished version never counts towards ``keep``, so the version
        a service falls back to stays; versions newer than the kept ones are left alone."""
        if keep < 1:
            raise ValueError("keep at least one version")
        kept = self.servable(hashes=False)[-keep:]
        if len(kept) < keep:
            return []
        oldest = kept[0].number
        removed = [v.number for v in self.versions() if v.number < oldest]
        for number in removed:
            self.retire(number)
        return removed

    def remove_stale_staging(self) -> None:
        """Staging and retired folders left by writers that died (killed exports). Call it
        holding the repository's lock (:func:`exclusive`): every writer holds it while it
        writes, so what is there then belongs to none that is running."""
        for entry in [*self.path.glob(f"{STAGING_PREFIX}*"), *self.path.glob(f"{RETIRED_PREFIX}*")]:
            shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def exclusive(root: Path, wait: Callable[[], None] | None = None) -> Iterator[None]:
    """The repository at ``root`` for one writer at a time: an exclusive ``flock`` on
    ``root/.export.lock``, held until the block ends (the kernel drops it if the process dies).
    ``wait`` is called once when another writer holds it (to say so) before blocking."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if wait is not None:
                wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_tree(folder: Path) -> None:
    for entry in folder.iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_repository(root: Path) -> tuple[list[str], list[str]]:
    """A repository checked before it is published (``python -m training.export --check``):
    (what is fine, what is wrong). Wrong: a numbered version without its metadata (half-copied),
    one whose files differ from what its metadata records (size, SHA-256), whose class list
    disagrees with the model's class count or with its labels.txt, a model without its
    config.pbtxt or whose config names another model."""
    root = Path(root)
    fine, wrong = [], []
    models = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not models:
        wrong.append(f"{root}: no model folder")
    for folder in models:
        store = ModelStore(root, folder.name)
        config = store.config
        if not config.is_file():
            wrong.append(f"{folder.name}: no {CONFIG}")
        elif f'name: "{folder.name}"' not in config.read_text(errors="replace"):
            wrong.append(f"{folder.name}: {CONFIG} names another model")
        versions = store.versions()
        if not versions:
            wrong.append(f"{folder.name}: no version")
        for version in versions:
            where = f"{folder.name} version {version.number}"
            if not version.has_metadata():
                wrong.append(f"{where}: no {METADATA} (incomplete: copied in part, or a copy "
                             "still running)")  # fmt: skip
                continue
            try:
                meta = version.verify(hashes=True)
                classes = version.classes(meta)
                labels = version.file(LABELS)
                if labels.is_file() and labels.read_text(encoding="utf-8") != classes.labels_txt():
                    raise RepositoryError(f"{labels} does not list the names of {CLASSES}")
            except RepositoryError as exc:
                wrong.append(f"{where}: {exc}")
            else:
                fine.append(f"{where}: {meta.format}, {len(classes)} classes, files as recorded")
    return fine, wrong


def main(argv: list[str] | None = None) -> int:
    """``python -m ssdcore.repository --check DIR`` (what ``training.export --check`` runs,
    without torch)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m ssdcore.repository")
    p.add_argument("--check", type=Path, required=True, metavar="DIR")
    args = p.parse_args(argv)
    fine, wrong = check_repository(args.check)
    for line in fine:
        print(f"ok    {line}")
    for line in wrong:
        print(f"WRONG {line}")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
