"""Write a new version of each requested model into a Triton model repository.

Each format becomes ``<output>/<model>/<N>/`` (``ssdcore.repository`` owns the layout): the model
file(s), ``classes.json``, ``labels.txt`` and ``metadata.json``, staged in a temporary folder and
renamed into place once complete, so the versions being served are never touched. One export
gives every model it writes the same number: the next one after the newest of them.
"""

from __future__ import annotations

import logging
import shutil
import time
import warnings
from pathlib import Path

import torch

from ssdcore.labels import ClassList
from ssdcore.repository import (
    CLASSES,
    LABELS,
    MODEL_NAMES,
    ModelStore,
    RepositoryError,
    VersionMetadata,
    exclusive,
    write_json_atomic,
    write_text_atomic,
)
from ssdcore.spec import SSD300 as SPEC
from ssdcore.spec import TENSOR_NAMES
from training.export.config_pbtxt import ExportOptions, triton_config
from training.export.served import ServedSSD
from training.export.weights import Weights, load_weights, random_weights

log = logging.getLogger("export")

FORMATS = ("onnx", "torchscript", "python")  # the default ones; onnx_int8 on request
ALL_FORMATS = (*FORMATS, "onnx_int8")
ONNX_OPSET = 17
DEFAULT_KEEP = 3
PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")


def export_onnx(module: torch.nn.Module, path: Path, raw: bool, classes: ClassList) -> None:
    n = TENSOR_NAMES
    outputs = [n.raw_locs, n.raw_logits] if raw else [n.boxes, n.scores, n.classes]
    example = torch.zeros(2, SPEC.image_size, SPEC.image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[n.images],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in [n.images, *outputs]},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    import onnx

    proto = onnx.load(str(path))
    for key, value in class_metadata(classes).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def class_metadata(classes: ClassList) -> dict[str, str]:
    """What the model file itself says about its classes (ONNX metadata, TorchScript extra)."""
    import json

    return {
        "classes": json.dumps(classes.to_json(), ensure_ascii=False),
        "num_classes": str(classes.num_classes),
    }


def export_torchscript(module: torch.nn.Module, path: Path, classes: ClassList) -> None:
    example = torch.zeros(2, SPEC.image_size, SPEC.image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    extra = {"classes.json": class_metadata(classes)["classes"]}
    traced.save(str(path), _extra_files=extra)


def export(
    output: Path,
    formats: list[str],
    checkpoint: Path | None = None,
    random_init: bool = False,
    backbone: str | None = None,
    opts: ExportOptions = ExportOptions(),  # noqa: B008 - frozen, never mutated
    raw: bool = False,
    classes: ClassList | None = None,
    weights: Weights | None = None,
    calibration: Path | None = None,
    calibration_images: int = 300,
    version: int | None = None,
    keep: int | None = DEFAULT_KEEP,
) -> dict[str, VersionMetadata]:
    """Write a new version of each requested model into ``output``; returns their metadata.

    ``version``: its number (default: one after the newest of these models); ``keep``: then
    remove the versions older than the newest ``keep`` servable ones (None: keep all).
    ``onnx_int8`` needs ``calibration`` (a folder of images or a COCO layout)."""
    if "onnx_int8" in formats and calibration is None:
        raise SystemExit("--formats onnx_int8 needs --calibration-data DIR (images or COCO)")
    if weights is None:
        if checkpoint is None and not random_init:
            raise SystemExit(
                "refusing to export without weights: pass --checkpoint CKPT, or --random-init "
                "to export an untrained model (marked as such)"
            )
        weights = (
            load_weights(checkpoint, backbone, classes)
            if checkpoint is not None
            else random_weights(backbone, classes, None)
        )
    model, classes = weights.model.eval(), weights.classes
    limit = SPEC.num_anchors * len(classes)
    if not 1 <= opts.topk <= limit:
        raise SystemExit(f"--topk must be in 1..{limit} for {len(classes)} classes")
    wanted = [*formats, "raw"] if raw else list(formats)
    stores = {fmt: ModelStore(Path(output), MODEL_NAMES[fmt]) for fmt in wanted}
    waiting = lambda: log.info("another export is writing into %s: waiting for it", output)  # noqa: E731
    with exclusive(Path(output), wait=waiting):  # one export at a time: its number is its own
        return _write_versions(
            stores, model, classes, weights, opts, version, keep, calibration, calibration_images
        )


def _write_versions(
    stores: dict[str, ModelStore],
    model,
    classes: ClassList,
    weights: Weights,
    opts: ExportOptions,
    version: int | None,
    keep: int | None,
    calibration: Path | None,
    calibration_images: int,
) -> dict[str, VersionMetadata]:
    number = version or max(store.next_number() for store in stores.values())
    for store in stores.values():
        if store.version(number).path.exists():
            raise SystemExit(f"error: {store.version(number).path} exists (versions are kept)")
        if number < store.next_number():  # an explicit --version below one handed out before
            raise SystemExit(
                f"error: {store.name} has had version {store.next_number() - 1}: numbers only "
                f"go up (a retired number names the retired model to gateways and S3 copies); "
                f"use --version {store.next_number()} or leave it out"
            )
        store.remove_stale_staging()
    written: dict[str, VersionMetadata] = {}
    onnx_file: Path | None = None
    for fmt, store in stores.items():
        t0 = time.perf_counter()
        served = ServedSSD(model, topk=opts.topk, raw=fmt == "raw").eval()
        with store.staging(number) as folder:
            extra = write_model_files(
                fmt, served, folder, onnx_file, classes, calibration, calibration_images
            )
            (folder / LABELS).write_text(classes.labels_txt(), encoding="utf-8")
            write_json_atomic(classes.to_json(), folder / CLASSES)
            meta = version_metadata(fmt, number, weights, opts, extra)
            config = triton_config(fmt, opts, classes.num_classes)
            if not store.config.is_file() or store.config.read_text() != config:
                write_text_atomic(config, store.config)
            published = store.publish(folder, meta)
        if fmt == "onnx":
            onnx_file = published.file("model.onnx")
        written[fmt] = meta
        log.info(
            "wrote %s version %d (%s, %d classes) in %.1f s",
            store.name,
            number,
            fmt,
            len(classes),
            time.perf_counter() - t0,
        )
    if keep is not None:
        for store in stores.values():
            if removed := store.prune(keep):
                log.info("removed %s versions %s (keeping %d)", store.name, removed, keep)
    return written


def write_model_files(
    fmt: str,
    served: ServedSSD,
    folder: Path,
    onnx_file: Path | None,
    classes: ClassList,
    calibration: Path | None,
    calibration_images: int,
) -> dict:
    """The model file(s) of one format into ``folder``; returns facts for the metadata."""
    if fmt == "torchscript":
        export_torchscript(served, folder / "model.pt", classes)
    elif fmt == "onnx_int8":
        from training.export.int8 import export_int8

        return export_int8(served, folder, onnx_file, classes, calibration, calibration_images)
    elif fmt == "python" and onnx_file is not None:
        shutil.copyfile(onnx_file, folder / "model.onnx")
    else:
        export_onnx(served, folder / "model.onnx", fmt == "raw", classes)
    if fmt == "python":
        shutil.copyfile(PYTHON_MODEL, folder / "model.py")
    return {}


def version_metadata(
    fmt: str, number: int, weights: Weights, opts: ExportOptions, extra: dict
) -> VersionMetadata:
    source = {
        k: v for k, v in weights.source.items() if k not in ("random_init_reason", "backbone")
    }
    return VersionMetadata(
        name=MODEL_NAMES[fmt],
        format=fmt,
        version=number,
        num_classes=weights.classes.num_classes,
        topk=0 if fmt == "raw" else opts.topk,
        backbone=weights.source["backbone"],
        random_init=weights.source["checkpoint"] is None,
        precision="int8" if fmt == "onnx_int8" else "fp32",
        source=source,
        options={"topk": opts.topk, "onnx_opset": ONNX_OPSET, "torch": torch.__version__},
        random_init_reason=weights.source.get("random_init_reason"),
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        extra=extra,
    )


def up_to_date(
    output: Path, formats: list[str], sha256: str | None, opts: ExportOptions, backbone: str
) -> bool:
    """The newest servable version of every model of ``formats`` was exported from the
    checkpoint with this SHA-256 (None: an untrained ``backbone`` model) with these options
    (``--ensure``). A truncated or unfinished version does not count."""
    for fmt in formats:
        store = ModelStore(Path(output), MODEL_NAMES[fmt])
        servable = store.servable()
        if not servable:
            return False
        try:
            meta = servable[-1].metadata()
        except RepositoryError:
            return False
        if meta.source.get("sha256") != sha256 or meta.topk != opts.topk:
            return False
        if sha256 is None and (not meta.random_init or meta.backbone != backbone):
            return False
        if not store.config.is_file() or store.config.read_text() != triton_config(
            fmt, opts, meta.num_classes
        ):
            return False
    return True


def has_servable(output: Path, formats: list[str]) -> bool:
    """Every model of ``formats`` has a version that can be served."""
    return all(ModelStore(Path(output), MODEL_NAMES[f]).servable(hashes=False) for f in formats)
