"""INT8 for the CPU: static QDQ quantization of the served ONNX graph with ONNX Runtime
(the only module that imports ``onnxruntime.quantization``).

- Calibration images go through exactly the gateway's preprocessing (``ssdcore.imaging``:
  the format sniffed from the bytes, decode with DCT scaling, EXIF, RGB, 300x300 bilinear,
  uint8); a folder of images or a COCO-layout folder (its ``train2017/``: its ``val2017/`` is
  what the INT8 accuracy is measured on), a few hundred by default, with a progress bar; the
  metadata names the folder used.
- U8 activations, S8 per-channel weights; only convolutions are quantized: the backbone, the
  extra blocks and the heads. The outputs of the box and class heads of levels 1-5 stay fp32
  (their weights are INT8, dequantized): measurement says so. With those outputs quantized to
  8 bits a trained model's mAP fell from 0.405 to 0.25 (MinMax ranges; 0.31 with percentile
  ranges); with them in fp32 it is 0.415, and the level-0 (38x38) heads, 80 % of the heads'
  FLOPs, stay fully INT8 without loss. The input normalisation, box decoding, softmax and
  top-K stay fp32 too, so the uint8 NHWC input and the top-K outputs of the contract are
  unchanged.
- Activation ranges from MinMax calibration (the tests hold the detections to >= 99 % of the
  fp32 mAP).
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ssdcore.imaging import model_input, sniffed_format
from ssdcore.labels import ClassList
from ssdcore.spec import SSD300, TENSOR_NAMES
from training.export.served import ServedSSD
from training.export.writer import class_metadata, export_onnx

log = logging.getLogger("export.int8")
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
DEFAULT_IMAGES = 300


def calibration_folder(folder: Path) -> Path:
    """Where the calibration images are: a COCO layout's training images (its train2017/; its
    val2017/ only when it has no training images: those are what the INT8 model's accuracy is
    measured on), else the folder itself."""
    folder = Path(folder)
    for sub in ("train2017", "val2017"):
        if (folder / sub).is_dir():
            return folder / sub
    return folder


def calibration_files(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` image files of ``folder`` (:func:`calibration_folder`), drawn evenly at random
    (seeded) when there are more."""
    folder = calibration_folder(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no JPEG, PNG or WebP images under {folder}")
    if len(files) > count:
        pick = np.random.default_rng(seed).choice(len(files), count, replace=False)
        files = [files[i] for i in sorted(pick)]
    return files


def calibration_images(
    folder: Path, count: int = DEFAULT_IMAGES, seed: int = 0, dct_scaling: bool = True
) -> np.ndarray:
    """(n, 300, 300, 3) uint8: the model's inputs for the calibration images, decoded as the
    gateway decodes uploads (the format sniffed from the bytes, ``dct_scaling`` as its
    SSD_JPEG_DCT_SCALING); files that are not JPEG, PNG or WebP are skipped."""
    out = []
    for path in tqdm(calibration_files(folder, count, seed), desc="calibration images"):
        data = path.read_bytes()
        fmt = sniffed_format(data)
        if fmt is None:
            log.warning("%s is not a JPEG, PNG or WebP image: not used for calibration", path)
            continue
        with Image.open(io.BytesIO(data), formats=[fmt]) as img:
            pixels, _, _ = model_input(img, fmt == "JPEG", SSD300.image_size, dct_scaling)
        out.append(pixels)
    if not out:
        raise ValueError(f"no JPEG, PNG or WebP images under {calibration_folder(folder)}")
    return np.stack(out)


def head_convolutions(model: Path, levels: tuple[int, ...] = (1, 2, 3, 4, 5)) -> list[str]:
    """The Conv nodes of the box and class heads of ``levels`` (their names come from the
    module tree: ``/model/loc.3/Conv``, ``/model/conf.3/Conv``)."""
    import onnx

    wanted = {f"/model/{head}.{level}/Conv" for head in ("loc", "conf") for level in levels}
    names = [n.name for n in onnx.load(str(model)).graph.node if n.op_type == "Conv"]
    found = [n for n in names if n in wanted]
    if len(found) != len(wanted):
        raise RuntimeError(f"expected the head convolutions {sorted(wanted)} in the graph")
    return found


def quantize(fp32: Path, out: Path, images: np.ndarray, batch: int = 8) -> dict:
    """Write the INT8 QDQ model of ``fp32`` to ``out``; returns the calibration facts."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(images, max(1, -(-len(images) // batch))))
            self.bar = tqdm(total=len(images), desc="calibration")

        def get_next(self):
            chunk = next(self.batches, None)
            if chunk is None:
                self.bar.close()
                return None
            self.bar.update(len(chunk))
            return {TENSOR_NAMES.images: chunk}

    t0 = time.perf_counter()
    prepared = out.with_name(out.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        fp32_heads = head_convolutions(prepared)
        quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["Conv"],
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
        keep_outputs_fp32(out, fp32_heads)
    finally:
        prepared.unlink(missing_ok=True)
        for leftover in out.parent.glob("augmented_model*.onnx"):
            leftover.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    log.info("quantized %s -> %s in %.1f s on %d images", fp32.name, out, seconds, len(images))
    return {
        "quantization": "static QDQ, U8 activations (asymmetric), S8 per-channel weights, Conv only",
        "calibration_method": "MinMax",
        "calibration_images": len(images),
        "calibration_seconds": round(seconds, 1),
        "fp32_ops": "outputs of the level 1-5 box and class heads, input normalisation, box "
        "decoding, softmax, top-K",
        "fp32_outputs": fp32_heads,
    }


def keep_outputs_fp32(path: Path, nodes: list[str]) -> None:
    """Drop the Quantize/Dequantize pair after each of ``nodes``: their consumers read the fp32
    output (the node's inputs and weights stay quantized)."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    done = 0
    for node in [n for n in graph.node if n.name in nodes]:
        out = node.output[0]
        for q in [c for c in consumers.get(out, []) if c.op_type == "QuantizeLinear"]:
            for dq in [
                c for c in consumers.get(q.output[0], []) if c.op_type == "DequantizeLinear"
            ]:
                for user in consumers.get(dq.output[0], []):
                    user.input[:] = [out if i == dq.output[0] else i for i in user.input]
                graph.node.remove(dq)
            graph.node.remove(q)
            done += 1
    if done != len(nodes):
        raise RuntimeError(f"found the output quantization of {done} of {len(nodes)} heads")
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)  # the removed pairs' scales and zero points
    onnx.save(model, str(path))


def export_int8(
    served: ServedSSD,
    folder: Path,
    onnx_file: Path | None,
    classes: ClassList,
    calibration: Path,
    count: int,
) -> dict:
    """``folder/model.onnx``: the INT8 model of the fp32 ONNX graph (this export's, or one made
    for it); returns the calibration facts for the metadata."""
    import onnx

    fp32 = onnx_file
    if fp32 is None:
        fp32 = folder.parent / f"{folder.name}.fp32.onnx"
        export_onnx(served, fp32, False, classes)
    try:
        facts = quantize(fp32, folder / "model.onnx", calibration_images(calibration, count))
    finally:
        if onnx_file is None:
            fp32.unlink(missing_ok=True)
    path = folder / "model.onnx"
    proto = onnx.load(str(path))
    kept = {p.key for p in proto.metadata_props}
    for key, value in {**class_metadata(classes), "precision": "int8"}.items():
        if key not in kept:
            proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    facts["calibration_data"] = str(calibration_folder(calibration))
    facts["calibration_dct_scaling"] = True  # the gateway's default (SSD_JPEG_DCT_SCALING)
    return facts
