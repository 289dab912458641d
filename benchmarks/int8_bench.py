"""INT8 vs fp32 on the CPU, side by side in one run:

1. the served graph (ResNet-50, random weights: the cost does not depend on them) in ONNX
   Runtime at batch 1 and 8, fp32 and INT8 interleaved, medians, and the calibration time;
2. accuracy: a ResNet-18 trained on a synthetic set (as the choice-of-K test does), exported in
   fp32 and INT8 (calibrated on its training images), pycocotools mAP of both on its validation
   images through the gateway's postprocess;
3. the gateway end to end (python -m service on the embedded backend, 640x480 JPEGs from 8
   client threads): fp32 and INT8, each with ONNX Runtime's thread spinning on and off.

Run: .venv/bin/python benchmarks/int8_bench.py [--parts speed accuracy gateway] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import onnxruntime as ort

from benchmarks.common import machine, table
from benchmarks.gateway_bench import jpeg, load, start
from loadtest.processes import free_port, service_command
from training.export import ExportOptions, export
from training.synthetic import generate

PARTS = ("speed", "accuracy", "gateway")


def cpu_flags() -> str:
    flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return " ".join(f for f in wanted if f in flags) or "none of AVX2/AVX-512/VNNI/AMX"


def session(path: Path, spinning: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speed(tmp: Path, repeats: int = 12) -> tuple[list[list[object]], dict]:
    data = generate(tmp / "calib", train=8, val=64, num_classes=4, seed=5)
    repo = tmp / "speed_repo"
    written = export(repo, ["onnx", "onnx_int8"], random_init=True, opts=ExportOptions(gpu=False),
                     calibration=data, calibration_images=64)  # fmt: skip
    facts = written["onnx_int8"].extra
    sizes = {
        name: (repo / f"ssd300_{name}" / "1" / "model.onnx").stat().st_size / 1e6
        for name in ("onnx", "onnx_int8")
    }
    sessions = {name: session(repo / f"ssd300_{name}" / "1" / "model.onnx") for name in sizes}
    rng = np.random.default_rng(0)
    rows = []
    for batch in (1, 8):
        images = rng.integers(0, 255, (batch, 300, 300, 3), dtype=np.uint8)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():
            s.run(None, {"images": images})  # warm-up
        for _ in range(repeats):
            for name, s in sessions.items():  # interleaved: the same machine state for both
                t0 = time.perf_counter()
                s.run(None, {"images": images})
                times[name].append(time.perf_counter() - t0)
        rate = {name: batch / statistics.median(t) for name, t in times.items()}
        for name in sessions:
            rows.append([batch, "fp32" if name == "onnx" else "INT8", f"{sizes[name]:.1f}",
                         f"{rate[name]:.2f}", f"{rate[name] / rate['onnx']:.2f}x"])  # fmt: skip
    return rows, facts


def accuracy(tmp: Path) -> list[list[object]]:
    """Train like tests/training/conftest.py::overfit_run, then mAP of both exports."""
    import shutil

    from tests.training.test_int8 import int8_and_fp32_map

    data = generate(tmp / "overfit", train=8, val=0, num_classes=2, seed=3, max_objects=2)
    shutil.rmtree(data / "val2017")
    shutil.copytree(data / "train2017", data / "val2017")
    shutil.copy(data / "annotations" / "instances_train2017.json",
                data / "annotations" / "instances_val2017.json")  # fmt: skip
    save = tmp / "run"
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
         str(ROOT / "training" / "train.py"), "--data", str(data), "--epochs", "25",
         "--batch-size", "4", "--data-backend", "torch", "--no-augment", "--evaluation",
         "--learning-rate", "0.2", "--multistep", "20", "--save", str(save), "--backbone",
         "resnet18", "--backbone-weights", "none", "--num-workers", "0", "--warmup", "5",
         "--seed", "0"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    fp32_map, int8_map, seconds = int8_and_fp32_map(save / "epoch_24.pt", data, tmp / "acc")
    return [[f"{fp32_map:.4f}", f"{int8_map:.4f}", f"{int8_map / fp32_map:.3f}", f"{seconds:.1f}"]]


def gateway(tmp: Path, seconds: float) -> list[list[object]]:
    repo = tmp / "speed_repo"
    body = jpeg(640, 480)
    rows = []
    for model in ("ssd300_onnx", "ssd300_onnx_int8"):
        for spinning in ("1", "0", "1", "0"):  # twice each, alternating
            port = free_port()
            env = {**os.environ, "SSD_ONNX_SPINNING": spinning}
            proc = start(service_command(port, repo, "--model-name", model), port, env)
            try:
                url = f"http://127.0.0.1:{port}"
                load(url, body, 8, 4)
                ok, elapsed, errors = load(url, body, 8, seconds)
            finally:
                proc.terminate()
                proc.wait()
            rows.append([model, "on" if spinning == "1" else "off", f"{ok / elapsed:.2f}", errors])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--seconds", type=float, default=20)
    args = p.parse_args()
    print(f"machine: {machine()}; CPU flags: {cpu_flags()}; onnxruntime {ort.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if "speed" in args.parts or "gateway" in args.parts:
            rows, facts = speed(tmp)
            print("\nServed graph (ResNet-50), ONNX Runtime, all cores, medians:")
            print(table(["batch", "precision", "model MB", "images/s", "vs fp32"], rows))
            print(f"calibration: {facts['calibration_images']} images in "
                  f"{facts['calibration_seconds']} s ({facts['calibration_method']})")  # fmt: skip
        if "accuracy" in args.parts:
            print("\nTrained ResNet-18 (synthetic set), mAP on its validation images:")
            print(table(["fp32 mAP", "INT8 mAP", "ratio", "calibration s"], accuracy(tmp)))
        if "gateway" in args.parts:
            print(f"\nGateway end to end, 640x480 JPEGs, 8 client threads, {args.seconds:.0f} s:")
            print(table(["model", "spinning", "images/s", "errors"], gateway(tmp, args.seconds)))


if __name__ == "__main__":
    main()
