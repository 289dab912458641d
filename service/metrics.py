"""Prometheus metrics of one app instance (own registry, so several apps can live in one process)."""

from __future__ import annotations

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
        self.images = Counter("ssd_images", "Images processed", registry=self.registry)
        self.rejected = Counter(
            "ssd_rejected", "Requests refused for overload", ["reason"], registry=self.registry
        )
