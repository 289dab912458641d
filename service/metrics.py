"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STAGES = ("decode", "queue", "infer", "postprocess", "total")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ssd_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "ssd_stage_seconds",
            "Seconds per request stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "ssd_batch_size",
            "Images per backend call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "ssd_in_flight_requests", "Detection requests being processed", registry=self.registry
        )
        self.upload_buffer = Gauge(
            "ssd_upload_buffer_bytes",
            "Bytes of partial request bodies held (SSD_UPLOAD_BUFFER_BYTES bounds them)",
            registry=self.registry,
        )
        self.batch_queue = Gauge(
            "ssd_batch_queue_images",
            "Images waiting for a batch (SSD_BATCH_MAX_QUEUED_IMAGES bounds them)",
            registry=self.registry,
        )
        self.images = Counter("ssd_images", "Images processed", registry=self.registry)
        self.rejected = Counter(
            "ssd_rejected", "Requests refused for overload", ["reason"], registry=self.registry
        )
        self.model_version = Gauge(
            "ssd_model_version", "The model version new requests go to", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.version_switches = Counter(
            "ssd_model_version_switches", "Moves to another model version", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.model_stale = Gauge(
            "ssd_model_stale_seconds",
            "How long the newest version in the repository has not been served, once that is "
            "longer than SSD_MODEL_STALE_AFTER_S (0: not stale)",
            ["model"],
            registry=self.registry,
        )
        self.versions_refused = Counter(
            "ssd_model_versions_refused",
            "New model versions refused (failed to load, inconsistent class list, failed warm-up)",
            ["model"],
            registry=self.registry,
        )
        self.stream_processed_fps = Gauge(
            "ssd_stream_processed_fps", "Frames a second detected on a live stream", ["stream"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_input_fps = Gauge(
            "ssd_stream_input_fps", "Frames a second a live stream's source sends", ["stream"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_lag = Gauge(
            "ssd_stream_lag_seconds",
            "From a frame's arrival to its detections, of a live stream's last frame",
            ["stream"],
            registry=self.registry,
        )
        self.stream_frames_skipped = Counter(
            "ssd_stream_frames_skipped",
            "Frames of a live stream never detected on (beyond its rate, or while the model was "
            "busy: newer ones were)",
            ["stream"],
            registry=self.registry,
        )
        self.stream_late_frames = Counter(
            "ssd_stream_late_frames",
            "Frames of a live stream taken a period or more after their turn (the model could "
            "not keep the stream's rate)",
            ["stream"],
            registry=self.registry,
        )
        self.stream_reconnects = Counter(
            "ssd_stream_reconnects", "Reconnections of a live stream to its source", ["stream"],
            registry=self.registry,
        )  # fmt: skip
        self.stream_up = Gauge(
            "ssd_stream_running", "1 while a live stream is running, else 0", ["stream"],
            registry=self.registry,
        )  # fmt: skip

    def forget_stream(self, stream: str) -> None:
        """A stopped stream's series leave the scrape."""
        for metric in (
            self.stream_processed_fps, self.stream_input_fps, self.stream_lag,
            self.stream_frames_skipped, self.stream_late_frames, self.stream_reconnects,
            self.stream_up,
        ):  # fmt: skip
            with contextlib.suppress(KeyError):
                metric.remove(stream)
