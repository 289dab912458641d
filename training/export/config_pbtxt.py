"""Triton's ``config.pbtxt`` for each model of the repository (one per model, shared by its
versions)."""

from __future__ import annotations

from dataclasses import dataclass

from ssdcore.repository import MODEL_NAMES
from ssdcore.spec import SSD300 as SPEC
from ssdcore.spec import TENSOR_NAMES

DEFAULT_TOPK = 2000


@dataclass(frozen=True)
class ExportOptions:
    topk: int = DEFAULT_TOPK
    max_batch_size: int = 32
    queue_delay_us: int = 2000
    max_queue_size: int = 64
    tensorrt: bool = False
    gpu: bool = True  # instance group kind for the onnx / torchscript models


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def triton_config(fmt: str, opts: ExportOptions, num_classes: int = SPEC.num_classes) -> str:
    """config.pbtxt text for one model of the repository.

    It depends on the export options only (and, for the raw model, on the class count), never
    on the weights or the class list: those belong to each version (its metadata.json and
    classes.json), so a new version with other classes rolls out under the same config, and
    the checked-in configs stay valid for every export. Triton keeps the two newest versions
    loaded (``version_policy``): the gateway names the one it serves in each call, and while
    Triton pods pick up a new version at different moments every pod still has the one before;
    a version whose files fail to load is not served.
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
            (n.classes, "TYPE_INT32", (opts.topk,), ""),
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
    lines.append("version_policy: { latest: { num_versions: 2 } }")
    params = {"topk": str(opts.topk)}
    if fmt == "python":
        params["intra_op_threads"] = "0"
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"
