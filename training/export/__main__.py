"""python -m training.export: write the next version of each model into a model repository.

    python -m training.export --checkpoint CKPT|nvidia --output model_repository \\
        [--formats onnx torchscript python onnx_int8] [--version N] [--keep K] [--ensure] \\
        [--topk K] [--max-batch-size B] [--raw] [--random-init] [--classes FILE]
    python -m training.export --retire N --output model_repository    (roll back)
    python -m training.export --check DIR    (before publishing a repository: exit 1 if wrong)

Each run writes ``<output>/<model>/<N+1>/`` (model file, classes.json, labels.txt,
metadata.json) atomically and leaves the served versions alone; a running service (embedded or
Triton) moves to it without a restart, and back when it is retired. The served graph takes uint8
[N, 300, 300, 3] RGB and returns top-K candidates; ``--raw`` adds a model with the raw (locs,
logits) outputs. The classes come from the checkpoint. ``--checkpoint nvidia`` fetches NVIDIA's
published COCO checkpoint (or reuses the cached one).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ssdcore.labels import ClassList
from ssdcore.repository import MODEL_NAMES, ModelStore, RepositoryError, exclusive, file_sha256
from training.checkpoint import CheckpointError
from training.downloads import DownloadError
from training.export.config_pbtxt import DEFAULT_TOPK, ExportOptions
from training.export.weights import Weights, load_weights, random_weights, read_class_file
from training.export.writer import (
    ALL_FORMATS,
    DEFAULT_KEEP,
    FORMATS,
    export,
    has_servable,
    up_to_date,
)
from training.model import BACKBONES
from training.pretrained import NVIDIA, fetch_nvidia

log = logging.getLogger("export")
NVIDIA_CHECKPOINT_HELP = "SSD_NVIDIA_CHECKPOINT_URL, default NGC's"


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
    p.add_argument("--formats", nargs="+", choices=ALL_FORMATS, default=None)
    p.add_argument(
        "--version", type=int, help="the version number to write (default: the next one)"
    )
    p.add_argument(
        "--keep",
        type=int,
        default=DEFAULT_KEEP,
        help="after writing, remove the versions older than the newest K servable ones "
        "(0: remove nothing)",
    )
    p.add_argument(
        "--retire",
        type=int,
        metavar="N",
        help="remove version N of the models (--formats, default every model that has it): "
        "the services go back to the newest version left",
    )
    p.add_argument(
        "--calibration-data",
        type=Path,
        help="images for INT8 calibration (a folder, or a COCO layout: its train2017/); "
        "they go through the gateway's decoding and preprocessing",
    )
    p.add_argument("--calibration-images", type=int, default=300)
    p.add_argument(
        "--topk",
        type=int,
        default=DEFAULT_TOPK,
        help="candidates per image returned by the graph (see docs: choice of K)",
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
        "random-init model instead and record why (kept while a servable version exists)",
    )
    p.add_argument(
        "--check",
        type=Path,
        metavar="DIR",
        help="check a repository before publishing it: every version complete, its files' sizes "
        "and SHA-256 as its metadata records, class list, labels and config consistent; exit 1 "
        "naming each version that is not, and why",
    )
    p.add_argument(
        "--ensure",
        action="store_true",
        help="write nothing when the newest servable version of every model came from this "
        "checkpoint (SHA-256) with these options; otherwise write the next version",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.check is not None:
        from ssdcore.repository import main as check

        return check(["--check", str(args.check)])
    if args.retire is not None:
        return retire(args.output, args.formats, args.retire)
    formats = args.formats or list(FORMATS)
    classes = read_class_file(args.classes) if args.classes else None
    opts = ExportOptions(
        topk=args.topk, max_batch_size=args.max_batch_size, tensorrt=args.tensorrt, gpu=not args.cpu
    )
    if args.checkpoint is None and not args.random_init:
        raise SystemExit(
            "refusing to export without weights: pass --checkpoint CKPT, or --random-init "
            "to export an untrained model (marked as such)"
        )
    try:
        weights = resolve_weights(args, formats, classes, opts)
    except (CheckpointError, DownloadError) as exc:
        log.error("%s", exc)
        return 2
    if weights is None:
        return 0
    if weights.source["checkpoint"] is None:
        log.warning("EXPORTING A RANDOMLY INITIALISED MODEL: its detections are meaningless")
    export(
        args.output,
        formats,
        opts=opts,
        raw=args.raw,
        weights=weights,
        calibration=args.calibration_data,
        calibration_images=args.calibration_images,
        version=args.version,
        keep=args.keep or None,
    )
    return 0


def resolve_weights(
    args: argparse.Namespace, formats: list[str], classes: ClassList | None, opts: ExportOptions
) -> Weights | None:
    """The weights to write, or None when ``--ensure`` finds them already served."""
    backbone = args.backbone or "resnet50"
    if args.checkpoint is None:
        if args.ensure and up_to_date(args.output, formats, None, opts, backbone):
            log.info("an untrained model is already the newest version; nothing to do")
            return None
        return random_weights(args.backbone, classes, None)
    try:
        path = fetch_nvidia() if args.checkpoint == NVIDIA else Path(args.checkpoint)
        if args.ensure and up_to_date(args.output, formats, file_sha256(path), opts, backbone):
            log.info("the newest versions in %s come from %s; nothing to do", args.output, path)
            return None
        return load_weights(path, args.backbone, classes)
    except (CheckpointError, DownloadError, OSError) as exc:
        if not args.fallback_random_init:
            if isinstance(exc, OSError):
                raise CheckpointError(f"cannot read {args.checkpoint}: {exc}") from None
            raise
        reason = f"the checkpoint {args.checkpoint!r} could not be had: {exc}"
        if args.ensure and has_servable(args.output, formats):
            log.warning("keeping the models in %s: %s", args.output, reason)
            return None
        log.warning("%s", reason)
        return random_weights(args.backbone, classes, reason)


def retire(output: Path, formats: list[str] | None, number: int) -> int:
    names = [MODEL_NAMES[f] for f in formats] if formats else sorted(MODEL_NAMES.values())
    stores = [ModelStore(output, name) for name in names]
    stores = [s for s in stores if s.version(number).path.is_dir()]
    if not stores:
        log.error("no model in %s has a version %d", output, number)
        return 2
    # the check and the retire under one lock: two retires at once (of the last two servable
    # versions) would both see the other's version left and retire both
    with exclusive(output):  # nor in the middle of an export's pruning
        for store in stores:
            left = [v for v in store.servable(hashes=False) if v.number != number]
            if not left:
                log.error(
                    "refusing to retire %s version %d: no other servable version is left",
                    store.name,
                    number,
                )
                return 2
        for store in stores:
            try:
                store.retire(number)
            except (OSError, RepositoryError) as exc:
                log.error("cannot retire %s version %d: %s", store.name, number, exc)
                return 2
            log.info("retired %s version %d", store.name, number)
    return 0


if __name__ == "__main__":
    sys.exit(main())
