"""Export a checkpoint to a Triton model repository (ONNX, TorchScript, Python backend).

    python -m training.export --checkpoint CKPT --output model_repository \\
        [--formats onnx torchscript python] [--topk K] [--max-batch-size B] [--raw] [--random-init]

Each format becomes ``<output>/<model>/{config.pbtxt, labels.txt, metadata.json, 1/model.*}``.
The served graph (``training.served.ServedSSD``) takes uint8 [N, 300, 300, 3] RGB and returns
top-K candidates; ``--raw`` adds a model with the raw (locs, logits) outputs.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ssdcore.labels import LABEL_NAMES
from ssdcore.spec import SSD300 as SPEC
from ssdcore.spec import TENSOR_NAMES
from training.checkpoint import CheckpointError, file_sha256, load_model_weights, write_json_atomic
from training.model import BACKBONES, build_model, calibrate_random_model
from training.served import ServedSSD

log = logging.getLogger("export")

FORMATS = ("onnx", "torchscript", "python")
MODEL_NAMES = {
    "onnx": "ssd300_onnx",
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


def triton_config(fmt: str, opts: ExportOptions) -> str:
    """config.pbtxt text for one model of the repository.

    It depends on the export options only, not on the weights: whether they are random is
    recorded in metadata.json, so the checked-in configs stay valid for every export.
    """
    n = TENSOR_NAMES
    size = SPEC.image_size
    lines = [f'name: "{MODEL_NAMES[fmt]}"']
    lines += {
        "onnx": ['backend: "onnxruntime"', 'platform: "onnxruntime_onnx"'],
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
            (n.raw_logits, "TYPE_FP32", (SPEC.num_classes, SPEC.num_anchors), ""),
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
    kind = "KIND_GPU" if opts.gpu and fmt != "python" else "KIND_CPU"
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
    params = {"topk": str(opts.topk)}
    if fmt == "python":
        params["intra_op_threads"] = "0"
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- model files


def export_onnx(module: torch.nn.Module, path: Path, raw: bool) -> None:
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


def export_torchscript(module: torch.nn.Module, path: Path) -> None:
    example = torch.zeros(2, SPEC.image_size, SPEC.image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    traced.save(str(path))


def has_model(repo: Path, fmt: str) -> bool:
    name = MODEL_NAMES[fmt]
    files = {"onnx": "model.onnx", "raw": "model.onnx", "python": "model.onnx"}
    return (repo / name / "1" / files.get(fmt, "model.pt")).is_file()


def export(
    output: Path,
    formats: list[str],
    checkpoint: Path | None = None,
    random_init: bool = False,
    backbone: str = "resnet50",
    opts: ExportOptions = ExportOptions(),
    raw: bool = False,
) -> dict:
    """Write the requested models into ``output``; returns the metadata written with them."""
    if checkpoint is None and not random_init:
        raise SystemExit(
            "refusing to export without weights: pass --checkpoint CKPT, or --random-init to "
            "export an untrained model (marked as such)"
        )
    torch.manual_seed(0)  # a random-init export is reproducible
    model = build_model(backbone)
    if checkpoint is not None:
        obj = load_model_weights(model, checkpoint)
        source = {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint)}
        source["epoch"] = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    else:
        calibrate_random_model(model)
        source = {"checkpoint": None, "sha256": None}
    model.eval()
    metadata = {
        "source": source,
        "random_init": checkpoint is None,
        "backbone": backbone,
        "topk": opts.topk,
        "onnx_opset": ONNX_OPSET,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "inputs": {"images": ["N", SPEC.image_size, SPEC.image_size, 3], "dtype": "uint8"},
    }
    wanted = [*formats, "raw"] if raw else list(formats)
    onnx_file: Path | None = None
    for fmt in wanted:
        name = MODEL_NAMES[fmt]
        model_dir = output / name
        version = model_dir / "1"
        version.mkdir(parents=True, exist_ok=True)
        served = ServedSSD(model, topk=opts.topk, raw=fmt == "raw").eval()
        t0 = time.perf_counter()
        if fmt == "torchscript":
            export_torchscript(served, version / "model.pt")
        elif fmt == "python" and onnx_file is not None:
            shutil.copyfile(onnx_file, version / "model.onnx")
        else:
            export_onnx(served, version / "model.onnx", raw=fmt == "raw")
            if fmt == "onnx":
                onnx_file = version / "model.onnx"
        if fmt == "python":
            shutil.copyfile(
                Path(__file__).with_name("triton_python_model.py"), version / "model.py"
            )
        (model_dir / "config.pbtxt").write_text(triton_config(fmt, opts))
        (model_dir / "labels.txt").write_text("\n".join(LABEL_NAMES) + "\n")
        write_json_atomic({**metadata, "format": fmt, "name": name}, model_dir / "metadata.json")
        log.info("wrote %s (%s) in %.1f s", name, fmt, time.perf_counter() - t0)
    return metadata


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, help="our checkpoint or NVIDIA's published one")
    p.add_argument("--output", type=Path, default=Path("model_repository"))
    p.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    p.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help="candidates per image returned by the graph (see README: choice of K)",
    )
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--backbone", choices=BACKBONES, default="resnet50")
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
        "--ensure", action="store_true", help="do nothing when the requested models already exist"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.topk < 1 or args.topk > SPEC.num_anchors * (SPEC.num_classes - 1):
        raise SystemExit(f"--topk must be in 1..{SPEC.num_anchors * (SPEC.num_classes - 1)}")
    if args.ensure and all(has_model(args.output, f) for f in args.formats):
        log.info("models already present in %s; nothing to do", args.output)
        return 0
    if args.random_init and args.checkpoint is None:
        log.warning("EXPORTING A RANDOMLY INITIALISED MODEL: its detections are meaningless")
    opts = ExportOptions(
        topk=args.topk, max_batch_size=args.max_batch_size, tensorrt=args.tensorrt, gpu=not args.cpu
    )
    try:
        export(
            args.output,
            args.formats,
            args.checkpoint,
            args.random_init,
            args.backbone,
            opts,
            raw=args.raw,
        )
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
