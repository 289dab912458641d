"""Export a checkpoint to a Triton model repository (ONNX, TorchScript, Python backend).

    python -m training.export --checkpoint CKPT|nvidia --output model_repository \\
        [--formats onnx torchscript python] [--topk K] [--max-batch-size B] [--raw] [--random-init]

Each format becomes ``<output>/<model>/{config.pbtxt, labels.txt, classes.json, metadata.json,
1/model.*}``. The served graph (``training.served.ServedSSD``) takes uint8 [N, 300, 300, 3] RGB
and returns top-K candidates; ``--raw`` adds a model with the raw (locs, logits) outputs.

The model's classes (contiguous label -> the dataset's category id and name) come from the
checkpoint; they are written to ``classes.json`` (what the service reads), ``labels.txt``, the
ONNX metadata (``classes``, ``num_classes``) and the TorchScript extra file ``classes.json``.
``--checkpoint nvidia`` fetches NVIDIA's published COCO checkpoint (or reuses the cached one).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdcore.labels import COCO, ClassList
from ssdcore.spec import SSD300 as SPEC
from ssdcore.spec import TENSOR_NAMES
from training.checkpoint import (
    CheckpointError,
    extract_state_dict,
    file_sha256,
    read_checkpoint,
    write_json_atomic,
)
from training.downloads import DownloadError
from training.model import BACKBONES, SSD300, build_model, calibrate_random_model
from training.pretrained import (
    NVIDIA,
    fetch_nvidia,
    num_classes_of,
    recorded_classes,
)
from training.served import ServedSSD

log = logging.getLogger("export")

FORMATS = ("onnx", "torchscript", "python")  # the default ones; onnx_int8 on request
ALL_FORMATS = (*FORMATS, "onnx_int8")
MODEL_NAMES = {
    "onnx": "ssd300_onnx",
    "onnx_int8": "ssd300_onnx_int8",
    "torchscript": "ssd300_torchscript",
    "python": "ssd300_python",
    "raw": "ssd300_raw",
}
ONNX_OPSET = 17
DEFAULT_TOPK = 2000


@dataclass(frozen=True)
class ExportOptions:
    topk: int = DEFAULT_TOPK
    max_batch_size: int = 32
    queue_delay_us: int = 2000
    max_queue_size: int = 64
    tensorrt: bool = False
    gpu: bool = True  # instance group kind for the onnx / torchscript models


# ----------------------------------------------------------------------------- config.pbtxt


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def triton_config(fmt: str, opts: ExportOptions, num_classes: int = SPEC.num_classes) -> str:
    """config.pbtxt text for one model of the repository.

    It depends on the export options and the class count only, not on the weights: whether
    they are random is recorded in metadata.json, so the checked-in configs (COCO's 80 classes)
    stay valid for every COCO export. ``num_classes`` (classes + background) is also a model
    parameter, which the gateway checks against the class list it reads.
    """
    n = TENSOR_NAMES
    size = SPEC.image_size
    lines = [f'name: "{MODEL_NAMES[fmt]}"']
    lines += {
        "onnx": ['backend: "onnxruntime"', 'platform: "onnxruntime_onnx"'],
        "onnx_int8": ['backend: "onnxruntime"', 'platform: "onnxruntime_onnx"'],
        "raw": ['backend: "onnxruntime"', 'platform: "onnxruntime_onnx"'],
        "torchscript": ['backend: "pytorch"', 'platform: "pytorch_libtorch"'],
        "python": ['backend: "python"'],
    }[fmt]
    lines.append(f"max_batch_size: {opts.max_batch_size}")
    lines.append(
        f'input [ {{ name: "{n.images}" data_type: TYPE_UINT8 dims: {_dims((size, size, 3))} }} ]'
    )
    if fmt == "raw":
        outputs = [
            (n.raw_locs, "TYPE_FP32", (4, SPEC.num_anchors), ""),
            (n.raw_logits, "TYPE_FP32", (num_classes, SPEC.num_anchors), ""),
        ]
    else:
        outputs = [
            (n.boxes, "TYPE_FP32", (opts.topk, 4), ""),
            (n.scores, "TYPE_FP32", (opts.topk,), ""),
            (n.classes, "TYPE_INT32", (opts.topk,), ' label_filename: "labels.txt"'),
        ]
    lines.append("output [")
    lines.append(
        ",\n".join(
            f'  {{ name: "{name}" data_type: {dtype} dims: {_dims(dims)}{extra} }}'
            for name, dtype, dims, extra in outputs
        )
    )
    lines.append("]")
    preferred = [b for b in (4, 8, 16) if b <= opts.max_batch_size]
    lines += [
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(tuple(preferred))}",
        f"  max_queue_delay_microseconds: {opts.queue_delay_us}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    max_queue_size: {opts.max_queue_size}",
        "  }",
        "}",
    ]
    # the Python variant and INT8 (a CPU model: VNNI) run on the CPU whatever the export says
    kind = "KIND_GPU" if opts.gpu and fmt not in ("python", "onnx_int8") else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: 1 kind: {kind} }} ]")
    lines += [
        "model_warmup [ {",
        '  name: "zeros"',
        "  batch_size: 1",
        f'  inputs {{ key: "{n.images}" value {{ data_type: TYPE_UINT8 dims: '
        f"{_dims((size, size, 3))} zero_data: true }} }}",
        "} ]",
    ]
    if opts.tensorrt and fmt in ("onnx", "raw"):
        lines += [
            "optimization { execution_accelerators { gpu_execution_accelerator: [ {",
            '  name: "tensorrt"',
            '  parameters { key: "precision_mode" value: "FP16" }',
            '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            "} ] } }",
        ]
    params = {"topk": str(opts.topk), "num_classes": str(num_classes)}
    if fmt == "python":
        params["intra_op_threads"] = "0"
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- model files


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


@dataclass
class Weights:
    """The model to export, its classes and where it came from (recorded in metadata.json)."""

    model: SSD300
    classes: ClassList
    source: dict


def load_weights(checkpoint: Path, backbone: str | None, classes: ClassList | None) -> Weights:
    """A checkpoint (ours or NVIDIA's) as a model with its classes.

    The backbone is the checkpoint's (ours record it) unless given; the class list is the
    checkpoint's; a checkpoint without one is COCO when it has 81 outputs (NVIDIA's), else
    ``classes`` (``--classes FILE``) must say what it is.
    """
    obj = read_checkpoint(checkpoint)
    state = extract_state_dict(obj)
    if "conf.0.weight" not in state:
        raise CheckpointError(f"{checkpoint} is not an SSD300 checkpoint (no conf.0.weight)")
    recorded = recorded_classes(obj)
    count = num_classes_of(state)
    if classes is not None and recorded is not None and classes != recorded:
        raise CheckpointError(
            f"{checkpoint} records its classes ({recorded.summary()}); --classes says "
            f"otherwise ({classes.summary()})"
        )
    classes = classes or recorded or (COCO if count == COCO.num_classes else None)
    if classes is None:
        raise CheckpointError(
            f"{checkpoint} has {count - 1} classes and records no class list: pass "
            "--classes FILE (the instances JSON it was trained on, or a classes.json)"
        )
    if classes.num_classes != count:
        raise CheckpointError(
            f"{checkpoint} has {count - 1} classes; the class list has {len(classes)}"
        )
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    arch = backbone or config.get("backbone") or "resnet50"
    model = build_model(arch, num_classes=count)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint} does not fit a {arch} SSD300: {exc}") from exc
    source = {
        "checkpoint": str(checkpoint),
        "sha256": file_sha256(checkpoint),
        "epoch": obj.get("epoch") if isinstance(obj.get("epoch"), int) else None,
    }
    return Weights(model, classes, {**source, "backbone": arch})


def random_weights(backbone: str | None, classes: ClassList | None, reason: str | None) -> Weights:
    """An untrained (calibrated) model, marked random; reproducible."""
    classes = classes or COCO
    torch.manual_seed(0)
    arch = backbone or "resnet50"
    model = build_model(arch, num_classes=classes.num_classes)
    calibrate_random_model(model)
    return Weights(
        model,
        classes,
        {"checkpoint": None, "sha256": None, "backbone": arch, "random_init_reason": reason},
    )


def export(
    output: Path,
    formats: list[str],
    checkpoint: Path | None = None,
    random_init: bool = False,
    backbone: str | None = None,
    opts: ExportOptions = ExportOptions(),
    raw: bool = False,
    classes: ClassList | None = None,
    weights: Weights | None = None,
    calibration: Path | None = None,
    calibration_images: int = 300,
) -> dict:
    """Write the requested models into ``output``; returns the metadata written with them.

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
    metadata = {
        "source": {k: v for k, v in weights.source.items() if k != "random_init_reason"},
        "random_init": weights.source["checkpoint"] is None,
        "backbone": weights.source["backbone"],
        "num_classes": classes.num_classes,
        "topk": opts.topk,
        "onnx_opset": ONNX_OPSET,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "inputs": {"images": ["N", SPEC.image_size, SPEC.image_size, 3], "dtype": "uint8"},
    }
    if weights.source.get("random_init_reason"):
        metadata["random_init_reason"] = weights.source["random_init_reason"]
    wanted = [*formats, "raw"] if raw else list(formats)
    onnx_file: Path | None = None
    for fmt in wanted:
        name = MODEL_NAMES[fmt]
        model_dir = output / name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        served = ServedSSD(model, topk=opts.topk, raw=fmt == "raw").eval()
        t0 = time.perf_counter()
        extra: dict = {}
        if fmt == "torchscript":
            export_torchscript(served, version / "model.pt", classes)
        elif fmt == "onnx_int8":
            extra = export_int8(
                served, version, onnx_file, classes, calibration, calibration_images
            )
        elif fmt == "python" and onnx_file is not None:
            shutil.copyfile(onnx_file, version / "model.onnx")
        else:
            export_onnx(served, version / "model.onnx", fmt == "raw", classes)
            if fmt == "onnx":
                onnx_file = version / "model.onnx"
        if fmt == "python":
            shutil.copyfile(
                Path(__file__).with_name("triton_python_model.py"), version / "model.py"
            )
        (model_dir / "config.pbtxt").write_text(triton_config(fmt, opts, classes.num_classes))
        (model_dir / "labels.txt").write_text(classes.labels_txt(), encoding="utf-8")
        write_json_atomic(classes.to_json(), model_dir / "classes.json")
        write_json_atomic(
            {**metadata, "format": fmt, "name": name, "precision": "fp32", **extra},
            model_dir / "metadata.json",
        )
        log.info(
            "wrote %s (%s, %d classes) in %.1f s", name, fmt, len(classes), time.perf_counter() - t0
        )
    return metadata


def read_class_file(path: Path) -> ClassList:
    """``--classes``: an instances JSON (its ``categories``) or a ``classes.json``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(doc, dict) and "categories" in doc:
            return ClassList.from_categories(doc["categories"])
        return ClassList.from_json(doc)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: --classes {path}: {exc}") from None


def export_int8(
    served: ServedSSD,
    version: Path,
    onnx_file: Path | None,
    classes: ClassList,
    calibration: Path,
    count: int,
) -> dict:
    """The INT8 model from the fp32 ONNX graph (this export's, or one made for it)."""
    import onnx

    from training.quantize import calibration_images, quantize

    fp32 = onnx_file
    if fp32 is None:
        fp32 = version / "fp32.onnx"
        export_onnx(served, fp32, False, classes)
    try:
        images = calibration_images(calibration, count)
        facts = quantize(fp32, version / "model.onnx", images)
    finally:
        if onnx_file is None:
            fp32.unlink(missing_ok=True)
    path = version / "model.onnx"
    proto = onnx.load(str(path))
    kept = {p.key for p in proto.metadata_props}
    for key, value in {**class_metadata(classes), "precision": "int8"}.items():
        if key not in kept:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    facts["calibration_data"] = str(calibration)
    return facts


def has_model(repo: Path, fmt: str) -> bool:
    name = MODEL_NAMES[fmt]
    files = {
        "onnx": "model.onnx",
        "onnx_int8": "model.onnx",
        "raw": "model.onnx",
        "python": "model.onnx",
    }
    return (repo / name / "1" / files.get(fmt, "model.pt")).is_file()


def all_random(repo: Path, formats: list[str]) -> bool:
    """Every existing model of ``formats`` has random weights (a fallback, or older random-init
    exports): ``make serve`` may replace them with NVIDIA's checkpoint."""
    for fmt in formats:
        try:
            meta = json.loads((repo / MODEL_NAMES[fmt] / "metadata.json").read_text())
        except (OSError, ValueError):
            return False
        if not (isinstance(meta, dict) and meta.get("random_init") is True):
            return False
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        help="our checkpoint, NVIDIA's published one, or 'nvidia' to fetch that one "
        f"(cached in $TORCH_HOME/hub/checkpoints; URL: {NVIDIA_CHECKPOINT_HELP})",
    )
    p.add_argument("--output", type=Path, default=Path("model_repository"))
    p.add_argument("--formats", nargs="+", choices=ALL_FORMATS, default=list(FORMATS))
    p.add_argument(
        "--calibration-data",
        type=Path,
        help="images for INT8 calibration (a folder, or a COCO layout: its val2017/); "
        "they go through the gateway's preprocessing",
    )
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help="candidates per image returned by the graph (see README: choice of K)",
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument(
        "--backbone",
        choices=BACKBONES,
        help="the checkpoint's backbone (default: the one it records, else resnet50)",
    )
    p.add_argument(
        "--classes",
        type=Path,
        help="class list of a checkpoint that records none (an instances JSON or a "
        "classes.json); with --random-init, the classes of the untrained model (default COCO)",
    )
    p.add_argument(
        "--raw", action="store_true", help="also export raw (locs, logits) as ssd300_raw"
    )
    p.add_argument(
        "--tensorrt",
        action="store_true",
        help="enable ONNX Runtime's TensorRT accelerator (FP16) in the onnx config",
    )
    p.add_argument("--cpu", action="store_true", help="KIND_CPU instance groups for every model")
    p.add_argument(
        "--random-init",
        action="store_true",
        help="export an untrained model; it is marked random in its metadata",
    )
    p.add_argument(
        "--fallback-random-init",
        action="store_true",
        help="when the checkpoint cannot be had (offline, HTTP error, bad file), export a "
        "random-init model instead and record why",
    )
    p.add_argument(
        "--ensure",
        action="store_true",
        help="do nothing when the requested models already exist (a random fallback is "
        "replaced once NVIDIA's checkpoint is in the cache)",
    )
    return p.parse_args(argv)


NVIDIA_CHECKPOINT_HELP = "SSD_NVIDIA_CHECKPOINT_URL, default NGC's"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    classes = read_class_file(args.classes) if args.classes else None
    opts = ExportOptions(
        topk=args.topk, max_batch_size=args.max_batch_size, tensorrt=args.tensorrt, gpu=not args.cpu
    )
    if args.ensure and all(has_model(args.output, f) for f in args.formats):
        if not (args.checkpoint == NVIDIA and all_random(args.output, args.formats)):
            log.info("models already present in %s; nothing to do", args.output)
            return 0
        try:  # random models are replaced once NVIDIA's checkpoint can be had, else kept
            weights = load_weights(fetch_nvidia(), args.backbone, classes)
        except (CheckpointError, DownloadError) as exc:
            log.warning("keeping the random-init models in %s: %s", args.output, exc)
            return 0
        log.info("replacing the random-init models in %s with NVIDIA's checkpoint", args.output)
    else:
        if args.checkpoint is None and not args.random_init:
            raise SystemExit(
                "refusing to export without weights: pass --checkpoint CKPT, or --random-init "
                "to export an untrained model (marked as such)"
            )
        try:
            if args.checkpoint is None:
                weights = random_weights(args.backbone, classes, None)
            else:
                weights = checkpoint_or_fallback(args, classes)
        except (CheckpointError, DownloadError) as exc:
            log.error("%s", exc)
            return 2
    if weights.source["checkpoint"] is None:
        log.warning("EXPORTING A RANDOMLY INITIALISED MODEL: its detections are meaningless")
    export(
        args.output,
        args.formats,
        opts=opts,
        raw=args.raw,
        weights=weights,
        calibration=args.calibration_data,
        calibration_images=args.calibration_images,
    )
    return 0


def checkpoint_or_fallback(args: argparse.Namespace, classes: ClassList | None) -> Weights:
    try:
        path = fetch_nvidia() if args.checkpoint == NVIDIA else Path(args.checkpoint)
        return load_weights(path, args.backbone, classes)
    except (CheckpointError, DownloadError) as exc:
        if not args.fallback_random_init:
            raise
        reason = f"the checkpoint {args.checkpoint!r} could not be had: {exc}"
        log.warning("%s", reason)
        return random_weights(args.backbone, classes, reason)


if __name__ == "__main__":
    sys.exit(main())
