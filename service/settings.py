"""Service settings: environment variables with the prefix ``SSD_`` (e.g. ``SSD_BACKEND=triton``),
overridden by the command-line flags of ``python -m service``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.memory import MMAP_THRESHOLD


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    # backend: embedded ONNX Runtime (default, no server) or Triton over gRPC
    backend: Literal["onnx", "triton"] = "onnx"
    model_repository: Path = Path("model_repository")
    model_name: str = "ssd300_onnx"  # fixed at start-up, never taken from a request
    triton_url: str = "127.0.0.1:8001"
    triton_timeout_s: float = Field(5.0, gt=0)  # deadline of every Triton call
    onnx_threads: int = Field(0, ge=0)  # 0: ONNX Runtime's default
    onnx_spinning: bool = False  # ONNX Runtime's intra-op threads spin after a run (README)
    # seconds between two checks of the model repository for a new (or retired) version;
    # 0: serve the version found at start-up only. SIGHUP checks at once.
    model_poll_s: float = Field(5.0, ge=0)

    # micro-batching in front of the backend
    batch_max_size: int = Field(8, ge=1, le=256)
    batch_max_delay_ms: float = Field(5.0, ge=0)
    backend_concurrency: int = Field(1, ge=1)  # batches in flight at the backend at once

    # limits (reliability spec §1)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    max_files: int = Field(16, ge=1)
    max_pixels: int = Field(50_000_000, ge=1)
    max_side: int = Field(16_384, ge=1)
    max_in_flight: int = Field(64, ge=1)  # requests at inference (body received); excess: 503
    max_uploads: int = Field(64, ge=1)  # bodies being received at once; excess gets 503

    # slow and stalled clients (reliability spec §5; service/http_server.py)
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this
    keep_alive_s: float = Field(5.0, gt=0)  # idle kept-alive connections closed after this
    body_read_timeout_s: float = Field(30.0, gt=0)  # at most this long between two body reads
    body_min_rate: int = Field(8192, ge=0)  # bytes/s on average once the grace period is over
    body_grace_s: float = Field(10.0, ge=0)  # ... (0 rate: no rate check)
    max_connections: int = Field(1024, ge=1)  # open connections; requests beyond get 503
    decode_workers: int = Field(2, ge=1)
    jpeg_dct_scaling: bool = True  # decode large JPEGs at 1/2..1/8 scale (see imaging.py)
    request_timeout_s: float = Field(30.0, gt=0)
    # glibc malloc: buffers above this many bytes are mapped and given back on free (see
    # memory.py); 0 keeps glibc's adaptive threshold
    mmap_threshold: int = Field(MMAP_THRESHOLD, ge=0, le=32 << 20)

    # security: the key every /v1 request must send in X-API-Key; unset or empty: no key
    api_key: SecretStr | None = None
    cors_origins: list[str] = []

    # response defaults
    score_threshold: float = Field(0.3, ge=0, le=1)
    iou_threshold: float = Field(0.5, gt=0, le=1)
    max_detections: int = Field(100, ge=1, le=1000)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_no_key(cls, value: object) -> object:
        """``SSD_API_KEY=`` (what compose passes for an unset variable) means no key: an empty
        key would otherwise refuse every request that sends one and admit those that do not."""
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, SecretStr) and not value.get_secret_value().strip():
            return None
        return value
