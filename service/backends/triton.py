"""Triton Inference Server over gRPC (``tritonclient.grpc.aio``): the production backend.

The only module that imports tritonclient. One client per process, created in the lifespan; every
call carries a deadline; the channel's reconnect backoff is capped (gRPC's default grows to 120 s,
which would keep the gateway unready long after Triton is back); the model name comes from the
settings, never from a request; model metadata is checked against the contract at start-up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as grpcaio
from tritonclient.utils import InferenceServerException

from service.backends import (
    BackendTimeout,
    BackendUnavailable,
    Candidates,
    ModelInfo,
    check_contract,
    declared_count,
    load_classes,
    read_metadata,
)

log = logging.getLogger("service.triton")

# No keepalive: it would also set TCP_USER_TIMEOUT, and a hung (not dead) server would then show
# up as a broken connection (503) instead of a request that missed its deadline (504).
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]
OUTPUTS = ("boxes", "scores", "classes")


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "")


class TritonBackend:
    def __init__(
        self, url: str, model_name: str, timeout_s: float, repo: Path | None = None
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.repo = repo
        self.client: grpcaio.InferenceServerClient | None = None
        self.info = ModelInfo(model_name, "", "triton", 0, None)
        self._ready_cache: tuple[float, bool] = (0.0, False)

    async def start(self, wait_s: float = 60.0) -> None:
        self.client = grpcaio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if await self.client.is_model_ready(self.model_name, client_timeout=self.timeout_s):
                    break
            except InferenceServerException as exc:
                log.info("waiting for Triton at %s: %s", self.url, exc.message())
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {self.model_name!r} not ready on Triton at {self.url}")
            await asyncio.sleep(0.5)
        meta = await self.client.get_model_metadata(
            self.model_name, as_json=True, client_timeout=self.timeout_s
        )
        k = check_contract(meta["inputs"], meta["outputs"])
        extra = read_metadata(self.repo, self.model_name) if self.repo else {}
        config = await self.client.get_model_config(
            self.model_name, as_json=True, client_timeout=self.timeout_s
        )
        params = config.get("config", config).get("parameters", {})
        counts = {
            "its Triton config": declared_count(
                params.get("num_classes", {}).get("string_value"), "the Triton config"
            ),
            "metadata.json": declared_count(extra.get("num_classes"), "metadata.json"),
        }
        classes = load_classes(self.repo, self.model_name, counts)
        version = (meta.get("versions") or [""])[-1]
        self.info = ModelInfo(
            self.model_name, version, "triton", k, extra.get("random_init"), extra, classes
        )

    async def infer(self, images: np.ndarray, timeout: float | None = None) -> Candidates:
        inp = grpcclient.InferInput("images", list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
        deadline = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        try:
            result = await self.client.infer(
                self.model_name, [inp], outputs=outputs, client_timeout=deadline
            )
        except InferenceServerException as exc:
            status, message = _status(exc), exc.message() or str(exc)
            if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
                raise BackendTimeout(
                    f"the model server did not answer within {deadline:.2f} s"
                ) from None
            if (
                "queue" in message.lower()
                or "UNAVAILABLE" in status
                or "RESOURCE_EXHAUSTED" in status
            ):
                self._ready_cache = (0.0, False)
                raise BackendUnavailable(
                    f"the model server is unavailable or overloaded: {message}"
                ) from None
            raise BackendUnavailable(f"the model server failed: {message}") from None
        return Candidates(*(result.as_numpy(n) for n in OUTPUTS))

    async def ready(self) -> bool:
        now = time.monotonic()
        checked_at, value = self._ready_cache
        if now - checked_at < 0.5:
            return value
        try:
            value = bool(await self.client.is_model_ready(self.model_name, client_timeout=1.0))
        except InferenceServerException:
            value = False
        self._ready_cache = (now, value)
        return value

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
