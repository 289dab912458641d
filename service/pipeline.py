"""The request flow of ``POST /v1/detect``: decode -> preprocess -> infer -> postprocess -> respond."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.backends import Backend, BackendTimeout
from service.batching import BatchResult, MicroBatcher
from service.errors import ApiError
from service.imaging import DecodedImage, ImageLimits, decode_image
from service.metrics import Metrics
from ssdcore.labels import ClassList
from ssdcore.postprocess import postprocess
from ssdcore.spec import REFERENCE_POSTPROCESS, Postprocess


@dataclass(frozen=True)
class DetectParams:
    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: (
        frozenset[int] | None
    )  # contiguous labels to keep; None: all (ClassList.resolve_filter)


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
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                images = await self._decode(uploads)
                t_decoded = time.perf_counter()
                results = await self.batcher.submit(
                    [im.pixels for im in images], deadline=t0 + self.timeout_s
                )
                t_inferred = time.perf_counter()
                loop = asyncio.get_running_loop()
                body = await loop.run_in_executor(self.pool, self._respond, images, results, params)
        except TimeoutError:
            raise BackendTimeout(f"the request did not finish within {self.timeout_s} s") from None
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
        self, images: list[DecodedImage], results: list[BatchResult], params: DetectParams
    ) -> dict:
        pp = Postprocess(
            score_threshold=params.score_threshold,
            iou_threshold=params.iou_threshold,
            topk_per_class=REFERENCE_POSTPROCESS.topk_per_class,
            max_detections=params.max_detections,
        )
        info = self.backend.info
        out = []
        for index, (image, result) in enumerate(zip(images, results)):
            c = result.candidates
            det = postprocess(
                c.boxes[result.row],
                c.scores[result.row],
                c.classes[result.row],
                pp,
                allowed_classes=params.classes,
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
