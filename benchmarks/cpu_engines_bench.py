"""The embedded CPU engines side by side in one run: ONNX Runtime and OpenVINO on the same files.

1. speed: the served graph (ResNet-50, random weights: the cost does not depend on them), fp32
   ``ssd300_onnx`` and its QDQ INT8 ``ssd300_onnx_int8``, through ONNX Runtime (fp32, INT8) and
   OpenVINO (fp32, bf16 where the CPU has it, INT8), all cores, batch 1 and 8, interleaved,
   medians; ms/image and the ratio to ONNX Runtime fp32;
2. shapes: OpenVINO INT8 compiled with a dynamic batch (what the backend does) against shapes
   fixed per batch size, and each one's compile time;
3. profile: where OpenVINO's INT8 graph spends its time (its per-node counters, batch 8):
   the share of int8 kernels and of the fp32 decode (softmax over 8732 x C, top-K, the rest);
4. accuracy: a ResNet-18 trained as the INT8 test trains it, pycocotools mAP of fp32, INT8
   (both engines) and OpenVINO bf16;
5. gateway: ``python -m service`` end to end (640x480 JPEGs, 8 client threads), HTTP images/s
   per engine and model, each run twice in alternation.

Run: .venv/bin/python benchmarks/cpu_engines_bench.py [--parts speed shapes profile accuracy
     gateway] [--seconds 20]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import onnxruntime as ort
import openvino as ov

from benchmarks.common import cpu_flags, cpu_name, goal, machine, table
from benchmarks.gateway_bench import jpeg, load, start
from loadtest.processes import free_port, service_command
from training.export import ExportOptions, export
from training.synthetic import generate

PARTS = ("speed", "shapes", "profile", "accuracy", "gateway")
Run = Callable[[np.ndarray], object]


def has_bf16(core: ov.Core) -> bool:
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def ort_run(path: Path) -> Run:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the service
    options.enable_cpu_mem_arena = False
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def ov_compile(core: ov.Core, path: Path, precision: str = "f32", batch: int | None = None,
               profile: bool = False) -> ov.CompiledModel:  # fmt: skip
    model = core.read_model(str(path))
    if batch is not None:
        model.reshape({"images": [batch, 300, 300, 3]})
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
    if profile:
        config["PERF_COUNT"] = True
    return core.compile_model(model, "CPU", config)


def ov_run(compiled: ov.CompiledModel) -> Run:
    request = compiled.create_infer_request()
    return lambda images: request.infer({0: images}, share_inputs=True)


def interleaved(runs: dict[str, Run], batch: int, repeats: int) -> dict[str, float]:
    """ms/image, median over ``repeats`` rounds that run every engine once in turn."""
    images = np.random.default_rng(0).integers(0, 255, (batch, 300, 300, 3), dtype=np.uint8)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(images)  # warm-up
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(images)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) / batch for name, t in times.items()}


def exported(tmp: Path) -> Path:
    data = generate(tmp / "calib", train=8, val=64, num_classes=4, seed=5)
    repo = tmp / "repo"
    export(repo, ["onnx", "onnx_int8"], random_init=True, opts=ExportOptions(gpu=False),
           calibration=data, calibration_images=64)  # fmt: skip
    return repo


def files(repo: Path) -> tuple[Path, Path]:
    return tuple(repo / f"ssd300_{n}" / "1" / "model.onnx" for n in ("onnx", "onnx_int8"))


def speed(repo: Path, repeats: int) -> list[list[object]]:
    fp32, int8 = files(repo)
    core = ov.Core()
    runs = {
        "ONNX Runtime fp32": ort_run(fp32),
        "ONNX Runtime INT8": ort_run(int8),
        "OpenVINO fp32": ov_run(ov_compile(core, fp32)),
    }
    if has_bf16(core):
        runs["OpenVINO bf16"] = ov_run(ov_compile(core, fp32, "bf16"))
    runs["OpenVINO INT8"] = ov_run(ov_compile(core, int8))
    rows = []
    for batch in (1, 8):
        ms = interleaved(runs, batch, repeats)
        base = ms["ONNX Runtime fp32"]
        rows += [[batch, name, f"{v:.1f}", f"{base / v:.2f}x"] for name, v in ms.items()]
    return rows


def shapes(repo: Path, repeats: int) -> list[list[object]]:
    _, int8 = files(repo)
    core = ov.Core()
    rows = []
    for batch in (1, 8):
        t0 = time.perf_counter()
        dynamic = ov_compile(core, int8)
        t1 = time.perf_counter()
        fixed = ov_compile(core, int8, batch=batch)
        t2 = time.perf_counter()
        ms = interleaved({"dynamic": ov_run(dynamic), "fixed": ov_run(fixed)}, batch, repeats)
        rows.append([batch, f"{ms['dynamic']:.1f}", f"{t1 - t0:.1f}", f"{ms['fixed']:.1f}",
                     f"{t2 - t1:.1f}", f"{ms['dynamic'] / ms['fixed']:.2f}"])  # fmt: skip
    return rows


def profile(repo: Path, runs: int = 5) -> list[list[object]]:
    _, int8 = files(repo)
    compiled = ov_compile(ov.Core(), int8, profile=True)
    request = compiled.create_infer_request()
    images = np.random.default_rng(0).integers(0, 255, (8, 300, 300, 3), dtype=np.uint8)
    request.infer({0: images})
    by_kind: collections.Counter[str] = collections.Counter()
    for _ in range(runs):
        request.infer({0: images})
        for node in request.profiling_info:
            seconds = node.real_time.total_seconds()
            kind = node.node_type
            if kind in ("Softmax", "TopK"):
                by_kind[kind] += seconds
            elif "I8" in node.exec_type.upper() or "U8" in node.exec_type.upper():
                by_kind["int8 kernels (convolutions and their fused ops)"] += seconds
            else:
                by_kind[f"other fp32 ({kind})"] += seconds
    total = sum(by_kind.values())
    top = by_kind.most_common()
    shown = [(k, v) for k, v in top if not k.startswith("other") or v / total >= 0.02]
    rest = total - sum(v for _, v in shown)
    rows = [[k, f"{1e3 * v / runs / 8:.2f}", f"{v / total:.1%}"] for k, v in shown]
    rows.append(["everything else", f"{1e3 * rest / runs / 8:.2f}", f"{rest / total:.1%}"])
    return rows


def accuracy(tmp: Path) -> list[list[object]]:
    """Train as tests/training/conftest.py::overfit_run does, then the mAPs of tests/training/
    devtools.int8_accuracy.int8_maps."""
    from devtools.int8_accuracy import int8_maps

    data = generate(tmp / "overfit", train=8, val=0, num_classes=2, seed=3, max_objects=2)
    shutil.rmtree(data / "val2017")
    shutil.copytree(data / "train2017", data / "val2017")
    shutil.copy(data / "annotations" / "instances_train2017.json",
                data / "annotations" / "instances_val2017.json")  # fmt: skip
    save = tmp / "run"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "training" / "train.py"), "--data", str(data), "--epochs", "25",
         "--batch-size", "4", "--data-backend", "torch", "--no-augment", "--evaluation", "24",
         "--learning-rate", "0.05", "--multistep", "20", "--save", str(save), "--backbone",
         "resnet18", "--backbone-weights", "none", "--num-workers", "0", "--warmup", "5",
         "--seed", "0"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    m = int8_maps(save / "epoch_24.pt", data, tmp / "acc")
    matched, worst = m["agreement"]
    return [
        [name, f"{m[key]:.4f}", f"{m[key] / m['fp32']:.1%}"]
        for name, key in (("fp32 (ONNX Runtime)", "fp32"), ("INT8 ONNX Runtime", "int8"),
                          ("INT8 OpenVINO", "int8_openvino"), ("bf16 OpenVINO", "bf16_openvino"))
    ] + [["ONNX Runtime INT8 detections (score >= 0.3) that OpenVINO INT8 gives too",
          f"{matched:.1%}", f"score difference <= {worst:.4f}"]]  # fmt: skip


def gateway(repo: Path, seconds: float) -> list[list[object]]:
    body = jpeg(640, 480)
    cases = [("onnx", "ssd300_onnx", {}), ("onnx", "ssd300_onnx_int8", {}),
             ("openvino", "ssd300_onnx", {})]  # fmt: skip
    if has_bf16(ov.Core()):
        cases.append(("openvino", "ssd300_onnx", {"SSD_OPENVINO_PRECISION": "bf16"}))
    cases.append(("openvino", "ssd300_onnx_int8", {}))
    rates: dict[int, list[float]] = collections.defaultdict(list)
    errors: collections.Counter[int] = collections.Counter()
    for _ in range(2):  # alternating, twice
        for i, (backend, model, env) in enumerate(cases):
            port = free_port()
            cmd = service_command(port, repo, "--model-name", model, "--backend", backend)
            proc = start(cmd, port, {**os.environ, **env})
            try:
                url = f"http://127.0.0.1:{port}"
                load(url, body, 8, 4)
                ok, elapsed, err = load(url, body, 8, seconds)
            finally:
                proc.terminate()
                proc.wait()
            rates[i].append(ok / elapsed)
            errors[i] += err
    base = statistics.mean(rates[0])
    rows = []
    for i, (backend, model, env) in enumerate(cases):
        rate = statistics.mean(rates[i])
        precision = env.get("SSD_OPENVINO_PRECISION", "int8" if "int8" in model else "fp32")
        rows.append([backend, model, precision, " / ".join(f"{r:.2f}" for r in rates[i]),
                     f"{rate / base:.2f}x", errors[i]])  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--repeats", type=int, default=12)
    args = p.parse_args()
    print(f"machine: {cpu_name()}, {machine()}; CPU flags: {cpu_flags()}; "
          f"onnxruntime {ort.__version__}, "
          f"openvino {ov.get_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        repo = exported(tmp) if set(args.parts) - {"accuracy"} else None
        if "speed" in args.parts:
            print("\nServed graph (ResNet-50), all cores, ms/image (medians), ratio to ORT fp32:")
            rows = speed(repo, args.repeats)
            print(table(["batch", "engine", "ms/image", "vs ORT fp32"], rows))
            int8 = [float(r[3].rstrip("x")) for r in rows if r[1] == "OpenVINO INT8"]
            print()
            print(goal("OpenVINO INT8 at least 3x ONNX Runtime fp32 at batch 1 and 8",
                       min(int8) >= 3, " / ".join(f"{v:.2f}x" for v in int8)))  # fmt: skip
        if "shapes" in args.parts:
            print("\nOpenVINO INT8: dynamic batch vs a shape fixed per batch size, ms/image:")
            print(table(["batch", "dynamic", "compile s", "fixed", "compile s", "ratio"],
                        shapes(repo, args.repeats)))  # fmt: skip
        if "profile" in args.parts:
            print("\nOpenVINO INT8, batch 8, per-node counters (5 runs):")
            print(table(["nodes", "ms/image", "share"], profile(repo)))
        if "accuracy" in args.parts:
            print("\nTrained ResNet-18 (synthetic set), mAP on its validation images:")
            rows = accuracy(tmp)
            print(table(["engine", "mAP", "vs fp32"], rows))
            kept = [float(r[2].rstrip("%")) for r in rows if r[0].startswith("INT8")]
            print()
            print(goal("INT8 mAP at least 99 % of fp32 on both engines", min(kept) >= 99,
                       " / ".join(f"{v:.1f} %" for v in kept)))  # fmt: skip
        if "gateway" in args.parts:
            print(f"\nGateway end to end, 640x480 JPEGs, 8 client threads, {args.seconds:.0f} s "
                  "per run, two runs:")  # fmt: skip
            rows = gateway(repo, args.seconds)
            print(table(["backend", "model", "precision", "images/s (runs)", "vs ORT fp32",
                         "errors"], rows))  # fmt: skip
            best = float(rows[-1][4].rstrip("x"))  # OpenVINO INT8 comes last
            print()
            print(goal("the OpenVINO INT8 service at least 2.5x the ONNX Runtime fp32 one",
                       best >= 2.5, f"{best:.2f}x"))  # fmt: skip


if __name__ == "__main__":
    main()
