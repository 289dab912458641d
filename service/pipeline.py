"""The request flow of ``POST /v1/detect``: decode -> preprocess -> infer -> postprocess -> respond."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import numpy as np

from service.backends import Backend, BackendTimeout, BackendUnavailable, ModelInfo
from service.batching import BatchResult, MicroBatcher
from service.errors import ApiError
from service.imaging import DecodedImage, ImageLimits, decode_image
from service.metrics import Metrics
from ssdcore.labels import ClassList
from ssdcore.postprocess import postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS, Postprocess


@dataclass(frozen=True)
class DetectParams:
    """A request's parameters: the postprocess's (the contract's type, with the request's
    thresholds and cap) and the classes it keeps."""

    postprocess: Postprocess
    # class names or category ids to keep (None: all), resolved against the class list of the
    # version that answers (ClassList.resolve_filter)
    classes: tuple[str, ...] | None = None

    @classmethod
    def of(
        cls,
        score_threshold: float,
        iou_threshold: float,
        max_detections: int,
        classes: tuple[str, ...] | None = None,
    ) -> DetectParams:
        """The reference's per-class top-K with a request's thresholds and cap."""
        pp = replace(
            REFERENCE_POSTPROCESS,
            score_threshold=score_threshold,
            iou_threshold=iou_threshold,
            max_detections=max_detections,
        )
        return cls(pp, classes)

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

    async def detect(self, uploads: list[bytes], params: DetectParams) -> dict:
        """One request, from image bytes to the response body; every image of it is answered
        by the same model version, the one the response names."""
        t0 = time.perf_counter()
        pin = self.backend.pin()  # the version this request is admitted to (embedded backend)
        try:
            pinned = pin.info if pin is not None else self.backend.info
            params.allowed(pinned.classes)  # an unknown class: 422 before any work
            async with asyncio.timeout(self.timeout_s):
                images = await self._decode(uploads)
                t_decoded = time.perf_counter()
                results = await self._infer([im.pixels for im in images], t0, pin)
                t_inferred = time.perf_counter()
                # the version that answered: the pinned one, or the one Triton names
                info = (
                    pinned
                    if pin is not None
                    else self.backend.info_for(results[0].candidates.version)
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
        body["timings_ms"] = {k: round(v * 1e3, 3) for k, v in timings.items()}
        return body

    async def _infer(self, pixels: list[np.ndarray], t0: float, pin: object) -> list[BatchResult]:
        """Candidates for every image, all from one version. Where the server picks the version
        (Triton) and moved to another one between two batches of this request, the request's
        images are run again (a switch is rare and quick; the embedded backend pins instead)."""
        deadline = t0 + self.timeout_s
        for _ in range(1 + MAX_VERSION_RETRIES):
            results = await self.batcher.submit(pixels, deadline=deadline, pin=pin)
            if len({r.candidates.version for r in results}) == 1:
                return results
        raise BackendUnavailable("the model version changed during the request; retry it")

    async def _decode(self, uploads: list[bytes]) -> list[DecodedImage]:
        loop = asyncio.get_running_loop()
        tasks = [loop.run_in_executor(self.pool, self._decode_one, data) for data in uploads]
        outcome = await asyncio.gather(*tasks, return_exceptions=True)
        for index, result in enumerate(outcome):
            if isinstance(result, ApiError):
                if len(uploads) > 1:
                    result.message = f"image {index}: {result.message}"
                raise result
            if isinstance(result, BaseException):
                raise result
        return outcome

    def _decode_one(self, data: bytes) -> DecodedImage:
        return decode_image(data, self.limits, dct_scaling=self.dct_scaling)

    def _respond(
        self,
        images: list[DecodedImage],
        results: list[BatchResult],
        params: DetectParams,
        info: ModelInfo,
    ) -> dict:
        allowed = params.allowed(info.classes)
        out = []
        for index, (image, result) in enumerate(zip(images, results)):
            c = result.candidates
            det = postprocess(
                c.boxes[result.row],
                c.scores[result.row],
                c.classes[result.row],
                params.postprocess,
                allowed_classes=allowed,
            )
            out.append(
                {
                    "index": index,
                    "width": image.width,
                    "height": image.height,
                    "detections": to_pixel_detections(
                        det.boxes, det.scores, det.classes, image.width, image.height, info.classes
                    ),
                }
            )
        return {
            "model": {
                "name": info.name,
                "version": info.version,
                "backend": info.backend,
                "random_weights": info.random_weights,
            },
            "images": out,
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
