"""The request flow of ``POST /v1/detect``: decode -> preprocess -> infer -> postprocess -> respond."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from service.backends import Backend, BackendTimeout, BackendUnavailable, ModelInfo
from service.batching import BatchResult, MicroBatcher
from service.errors import ApiError
from service.imaging import DecodedImage, ImageLimits, TiledImage, decode_image, decode_tiled
from service.metrics import Metrics
from ssdcore import tiling
from ssdcore.labels import ClassList
from ssdcore.postprocess import Detections, postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS, Postprocess
from ssdcore.tiling import TileSpec

# the overlap (intersection over the smaller box) at which two tiles' boxes are one object
TILE_MATCH_THRESHOLD = 0.5


@dataclass(frozen=True)
class DetectParams:
    """A request's parameters: the postprocess's (the contract's type, with the request's
    thresholds and cap), the classes it keeps, its tiles."""

    postprocess: Postprocess
    # class names or category ids to keep (None: all), resolved against the class list of the
    # version that answers (ClassList.resolve_filter)
    classes: tuple[str, ...] | None = None
    tiling: TileSpec | None = None  # None: each image run whole, once

    @classmethod
    def of(
        cls,
        score_threshold: float,
        iou_threshold: float,
        max_detections: int,
        classes: tuple[str, ...] | None = None,
        tiling: TileSpec | None = None,
    ) -> DetectParams:
        """The reference's per-class top-K with a request's thresholds and cap."""
        pp = replace(
            REFERENCE_POSTPROCESS,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
        )
        return cls(pp, classes, tiling)

    def allowed(self, classes: ClassList) -> frozenset[int] | None:
        if self.classes is None:
            return None
        try:
            return frozenset(classes.resolve_filter(list(self.classes)))
        except ValueError as exc:
            raise ApiError(422, "invalid_parameter", str(exc)) from None


MAX_VERSION_RETRIES = 3  # a request whose images were answered by two versions is re-run


@dataclass
class Pipeline:
    backend: Backend
    batcher: MicroBatcher
    pool: ThreadPoolExecutor  # decoding and postprocessing, off the event loop
    limits: ImageLimits
    timeout_s: float
    metrics: Metrics
    dct_scaling: bool = True
    max_tiles: int = 64  # model runs a tiled request may cause
    tile_merge: str = "nmm"  # how boxes tiles found twice become one (ssdcore.tiling.merge)

    def check_tiles(self, params: DetectParams, images: int = 1) -> None:
        """422 where a tile grid asks for more model runs than a request may cause."""
        per_image = params.tiling.runs_per_image() if params.tiling is not None else None
        if per_image is not None and per_image * images > self.max_tiles:
            raise ApiError(
                422,
                "too_many_tiles",
                f"{images} image(s) of {per_image} model runs each (tiles and the whole "
                f"image) exceed the limit of {self.max_tiles} per request; ask for a coarser "
                "grid or tiles=auto",
            )

    async def detect(self, uploads: list[bytes], params: DetectParams) -> dict:
        """One request, from image bytes to the response body; every image of it is answered
        by the same model version, the one the response names."""
        t0 = time.perf_counter()
        pin = self.backend.pin()  # the version this request is admitted to (embedded backend)
        try:
            pinned = pin.info if pin is not None else self.backend.info
            params.allowed(pinned.classes)  # an unknown class: 422 before any work
            async with asyncio.timeout(self.timeout_s):
                self.check_tiles(params, len(uploads))
                images = await self._decode(uploads, params.tiling)
                t_decoded = time.perf_counter()
                results = await self._infer([p for im in images for p in _inputs(im)], t0, pin)
                t_inferred = time.perf_counter()
                # the version that answered: the pinned one, or the one Triton names (Triton
                # answers with another where the pinned one was unloaded under the request)
                answered = results[0].candidates.version
                info = (
                    pinned
                    if pin is not None and answered == pinned.version
                    else self.backend.info_for(answered)
                )
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(
                    self.pool, self._respond, images, results, params, info
                )
        except TimeoutError:
            raise BackendTimeout(f"the request did not finish within {self.timeout_s} s") from None
        finally:
            if pin is not None:
                self.backend.unpin(pin)
        t_done = time.perf_counter()
        timings = {
            "decode": t_decoded - t0,
            "queue": max(r.queued_s for r in results),
            "infer": max(r.infer_s for r in results),
            "postprocess": t_done - t_inferred,
            "total": t_done - t0,
        }
        for stage, seconds in timings.items():
            self.metrics.stage_seconds.labels(stage).observe(seconds)
        self.metrics.images.inc(len(images))
        if params.tiling is not None:
            body["model_runs"] = len(results)
        body["timings_ms"] = {k: round(v * 1e3, 3) for k, v in timings.items()}
        return body

    async def _infer(self, pixels: list[np.ndarray], t0: float, pin: object) -> list[BatchResult]:
        return await self.infer_one_version(pixels, t0 + self.timeout_s, pin)

    async def infer_one_version(
        self,
        pixels: list[np.ndarray],
        deadline: float,
        pin: object,
        background: bool = False,
        first: list[BatchResult] | None = None,
    ) -> list[BatchResult]:
        """Candidates for every image, all from one version. Where the server picks the version
        (Triton) and moved to another one between two batches of these images, they are run
        again (a switch is rare and quick; the embedded backend pins instead). ``first``: the
        results of a submission already made (a video frame's)."""
        results = first
        for _ in range(1 + MAX_VERSION_RETRIES):
            if results is None:
                results = await self.batcher.submit(
                    pixels, deadline=deadline, pin=pin, background=background
                )
            if len({r.candidates.version for r in results}) == 1:
                return results
            results = None
        raise BackendUnavailable("the model version changed during the request; retry it")

    async def _decode(
        self, uploads: list[bytes], tiles: TileSpec | None
    ) -> list[DecodedImage | TiledImage]:
        loop = asyncio.get_running_loop()
        if tiles is None:
            tasks = [loop.run_in_executor(self.pool, self.decode_one, d) for d in uploads]
        else:  # auto shares the request's budget of model runs between its images
            budget = max(1, self.max_tiles // len(uploads))

            def plan_for(width: int, height: int) -> tiling.TilePlan:
                return tiles.plan(width, height, budget)

            tasks = [
                loop.run_in_executor(self.pool, self._decode_tiled, d, plan_for) for d in uploads
            ]
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
        for index, result in enumerate(outcome):
            if isinstance(result, ApiError):
                if len(uploads) > 1:
                    result.message = f"image {index}: {result.message}"
                raise result
            if isinstance(result, BaseException):
                raise result
        return outcome

    def decode_one(self, data: bytes) -> DecodedImage:
        return decode_image(data, self.limits, dct_scaling=self.dct_scaling)

    def _decode_tiled(
        self, data: bytes, plan_for: Callable[[int, int], tiling.TilePlan]
    ) -> TiledImage:
        return decode_tiled(data, self.limits, plan_for, dct_scaling=self.dct_scaling)

    def _respond(
        self,
        images: list[DecodedImage | TiledImage],
        results: list[BatchResult],
        params: DetectParams,
        info: ModelInfo,
    ) -> dict:
        allowed = params.allowed(info.classes)
        out = []
        start = 0
        for index, image in enumerate(images):
            runs = results[start : start + len(_inputs(image))]
            start += len(runs)
            dets = [run_detections(r, params.postprocess, allowed) for r in runs]
            entry = {"index": index, "width": image.width, "height": image.height}
            if isinstance(image, TiledImage):
                det = merge_tiles(image.plan, dets, self.tile_merge, params.postprocess)
                entry["tiles"] = describe(image.plan)
            else:
                det = dets[0]
            entry["detections"] = to_pixel_detections(
                det.boxes, det.scores, det.classes, image.width, image.height, info.classes
            )
            out.append(entry)
        return {
            "model": {
                "name": info.name,
                "version": info.version,
                "backend": info.backend,
                "random_weights": info.random_weights,
            },
            "images": out,
        }


def _inputs(image: DecodedImage | TiledImage) -> list[np.ndarray]:
    """The model inputs of an image: one, or one per tile (and the whole image)."""
    return image.pixels if isinstance(image, TiledImage) else [image.pixels]


def run_detections(
    result: BatchResult, params: Postprocess, allowed: frozenset[int] | None
) -> Detections:
    """One model run's detections: the request's postprocess over its candidates."""
    c = result.candidates
    return postprocess(
        c.boxes[result.row],
        c.scores[result.row],
        c.classes[result.row],
        params,
        allowed_classes=allowed,
    )


def merge_tiles(
    plan: tiling.TilePlan, dets: list[Detections], method: str, params: Postprocess
) -> Detections:
    """Each run's detections (the plan's tiles, then the whole image) -> the image's: boxes
    mapped to the whole image, the whole image's kept for large objects only, found twice
    merged, the request's cap applied."""
    if plan.trivial:
        return dets[0]
    boxes = [tiling.to_image(d.boxes, t, plan.width, plan.height) for d, t in zip(dets, plan.tiles)]
    scores = [d.scores for d in dets[: len(plan.tiles)]]
    classes = [d.classes for d in dets[: len(plan.tiles)]]
    if plan.whole:
        whole = dets[len(plan.tiles)]
        large = tiling.large_enough(whole.boxes, plan)
        boxes.append(whole.boxes[large])
        scores.append(whole.scores[large])
        classes.append(whole.classes[large])
    merged = tiling.merge(
        np.concatenate(boxes),
        np.concatenate(scores),
        np.concatenate(classes),
        TILE_MATCH_THRESHOLD,
        method,
    )
    keep = slice(0, params.max_detections)
    return Detections(merged[0][keep], merged[1][keep], merged[2][keep])


def describe(plan: tiling.TilePlan) -> dict:
    """What the response says of an image's tiles."""
    first = plan.tiles[0]
    return {
        "grid": [plan.cols, plan.rows],
        "count": 0 if plan.trivial else len(plan.tiles),
        "size": [first.width, first.height],
        "whole_image": plan.whole or plan.trivial,
        "model_runs": plan.runs,
    }


def to_pixel_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    width: int,
    height: int,
    classes: ClassList,
) -> list[dict]:
    """Normalised xyxy -> pixel boxes of the displayed image, clipped to it; contiguous labels
    -> the model's category ids and names."""
    if labels.size and (labels.min() < 1 or labels.max() > len(classes)):
        # a model that names labels its class list does not have: its fault, never a 500
        raise ApiError(
            502,
            "bad_model_output",
            f"the model answered labels {labels.min()}..{labels.max()}; "
            f"its class list has 1..{len(classes)}",
        )
    scale = np.array([width, height, width, height], dtype=np.float64)
    px = np.clip(boxes.astype(np.float64) * scale, 0, scale)
    ids = classes.category_ids(labels).tolist()
    return [
        {
            "box": {
                "x1": round(float(b[0]), 2),
                "y1": round(float(b[1]), 2),
                "x2": round(float(b[2]), 2),
                "y2": round(float(b[3]), 2),
            },
            "score": float(s),
            "category_id": int(cid),
            "label": classes.name(c),
        }
        for b, s, c, cid in zip(px, scores, labels.tolist(), ids)
    ]
