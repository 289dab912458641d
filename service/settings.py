"""Service settings: environment variables with the prefix ``SSD_`` (e.g. ``SSD_BACKEND=triton``),
overridden by the command-line flags of ``python -m service``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.memory import MMAP_THRESHOLD


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8080, description="port to listen on")
    backend: Literal["onnx", "openvino", "triton"] = Field(
        "onnx",
        description="embedded ONNX Runtime or OpenVINO (no server; both serve the model's ONNX "
        "file), or Triton over gRPC",
    )
    model_repository: Path = Field(
        Path("model_repository"), description="the model repository (versions, class lists)"
    )
    model_name: str = Field(
        "ssd300_onnx", description="the model to serve; fixed at start-up, never from a request"
    )
    triton_url: str = Field(
        "127.0.0.1:8001",
        description="Triton's gRPC address; dns:///NAME:PORT balances the requests over every "
        "address NAME resolves to (a headless Service: every Triton pod)",
    )
    triton_model_control: Literal["explicit", "poll"] = Field(
        "explicit",
        description="explicit: the gateway asks Triton to load a new version (Triton run with "
        "--model-control-mode=explicit, one Triton); poll: every Triton polls the repository "
        "and loads it itself (many Triton pods), the gateway only follows",
    )
    triton_timeout_s: float = Field(5.0, gt=0, description="deadline of every Triton call")
    onnx_threads: int = Field(
        0, ge=0, description="ONNX Runtime's intra-op threads (0: its default)"
    )
    onnx_spinning: bool = Field(
        False,
        description="ONNX Runtime's threads spin after a run (off: measured no better under "
        "the gateway's load, and it leaves the cores to decoding)",
    )
    openvino_threads: int = Field(
        0, ge=0, description="OpenVINO's inference threads (0: its default, one per core)"
    )
    openvino_precision: Literal["f32", "bf16"] = Field(
        "f32",
        description="OpenVINO's inference precision for the fp32 parts of the graph: bf16 where "
        "the CPU has it (AVX512_BF16 or AMX; otherwise f32, said in the log and /v1/models)",
    )
    model_poll_s: float = Field(
        5.0,
        ge=0,
        description="seconds between two checks of the repository for a new or retired "
        "version (0: only on SIGHUP); SIGHUP checks at once",
    )
    model_stale_after_s: float = Field(
        180.0,
        gt=0,
        description="the newest version in the repository not served for this long is reported "
        "stale (GET /v1/models, ssd_model_stale_seconds, a warning in the log, the page): the "
        "polling period of Triton or of the S3 sync, plus loading and warming up, with margin",
    )

    # micro-batching in front of the backend
    batch_max_size: int = Field(8, ge=1, le=256, description="images per backend call at most")
    batch_max_delay_ms: float = Field(
        5.0, ge=0, description="how long an image waits for company in a batch"
    )
    backend_concurrency: int = Field(
        1, ge=1, description="batches in flight at the backend at once"
    )
    batch_max_queued_images: int = Field(
        256,
        ge=1,
        description="images waiting for a batch at most; a request beyond it gets 503 at once "
        "(so does one that, at the model's measured pace, could not be run before its deadline)",
    )

    # limits (reliability spec §1)
    max_body_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="request body cap (413), counted on the stream"
    )
    max_files: int = Field(16, ge=1, description="images per request")
    max_pixels: int = Field(50_000_000, ge=1, description="pixels per image, from its header")
    max_side: int = Field(16_384, ge=1, description="longest side of an image")
    max_in_flight: int = Field(
        64, ge=1, description="requests at inference (body received); beyond: 503"
    )
    upload_buffer_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024 * 1024,
        description="bytes of partial request bodies held at once, all uploads together; when "
        "full, the uploads slowest to finish are dropped (503) first (service/admission.py). "
        "A body that has arrived whole never waits for it",
    )
    max_uploads_per_client: int = Field(
        16, ge=1, description="partial uploads one client address may hold at once; beyond: 503"
    )
    upload_bytes_per_client: int | None = Field(
        None,
        ge=1024,
        description="bytes of partial request bodies one client address may hold at once; "
        "beyond, that address's slowest uploads are dropped (503). Unset: a quarter of "
        "SSD_UPLOAD_BUFFER_BYTES, or SSD_MAX_BODY_BYTES where that is more (one whole upload "
        "always fits), never more than the buffer",
    )
    trusted_proxies: list[str] = Field(
        [],
        description="addresses or CIDR blocks of proxies whose X-Forwarded-For names the "
        "client (a JSON list); otherwise the peer's address is the client's",
    )

    # slow and stalled clients (reliability spec §5; service/http_server.py)
    header_timeout_s: float = Field(
        10.0, gt=0, description="a request's headers must arrive within this"
    )
    keep_alive_s: float = Field(
        5.0, gt=0, description="idle kept-alive connections are closed after this"
    )
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="at most this long between two reads of a body (408)"
    )
    body_min_rate: int = Field(
        8192, ge=0, description="bytes/s a body must average once the grace period is over"
    )
    body_grace_s: float = Field(10.0, ge=0, description="seconds before the rate is checked")
    max_connections: int = Field(
        1024, ge=1, description="open connections; requests beyond get 503"
    )
    decode_workers: int = Field(2, ge=1, description="threads decoding and postprocessing")
    jpeg_dct_scaling: bool = Field(
        True, description="decode large JPEGs at 1/2..1/8 scale (service/imaging.py)"
    )
    request_timeout_s: float = Field(30.0, gt=0, description="deadline of a request (504)")
    mmap_threshold: int = Field(
        MMAP_THRESHOLD,
        ge=0,
        le=32 << 20,
        description="glibc malloc maps buffers above this many bytes and gives them back on "
        "free (service/memory.py); 0 keeps glibc's adaptive threshold",
    )

    # URLs in requests (service/addresses.py, service/url_fetch.py)
    stream_sources: list[str] = Field(
        [],
        description="networks (CIDR) and host names a URL in a request may connect to (a JSON "
        "list): image_url on POST /v1/detect. Unset: any address but those always refused "
        "(link-local 169.254.0.0/16 and fe80::/10 with the cloud metadata services, "
        "fd00:ec2::254, unspecified, multicast, broadcast); set it in production",
    )
    image_url_timeout_s: float = Field(
        10.0, gt=0, description="an image_url fetch (lookups, redirects, body) within this"
    )
    image_url_max_redirects: int = Field(
        5, ge=0, description="redirects an image_url fetch follows, each target checked again"
    )
    max_url_fetches: int = Field(
        16, ge=1, description="image_url fetches at once (each holds SSD_MAX_BODY_BYTES at most)"
    )
    image_url_ca_file: Path | None = Field(
        None,
        description="PEM bundle of the authorities an https image_url's certificate is checked "
        "against (an internal CA); unset: certifi's public bundle",
    )

    # videos (POST /v1/videos; service/video/)
    max_video_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1024,
        description="a video upload's size at most (413); written to a temporary file as it "
        "arrives, never held in memory (outside SSD_UPLOAD_BUFFER_BYTES)",
    )
    max_video_seconds: float = Field(
        600.0, gt=0, description="a video's duration at most, from its header and its frames"
    )
    max_video_pixels: int = Field(
        3840 * 2160, ge=1, description="pixels of a video frame at most, from the header (4K UHD)"
    )
    max_video_side: int = Field(4096, ge=1, description="longest side of a video frame")
    max_videos: int = Field(
        2, ge=1, description="videos processed at once (once uploaded); beyond: 503"
    )
    max_video_uploads: int = Field(
        4,
        ge=1,
        description="video uploads in progress at once, at most 2 from one client address; "
        "beyond: 503 before the upload is read",
    )
    video_upload_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a video upload must be whole within this (408); SSD_MAX_VIDEO_BYTES in "
        "it asks for 0.9 MB/s at the defaults",
    )
    video_max_fps: float = Field(
        30.0,
        gt=0,
        description="frames per second detected at most (a request's fps= may ask fewer); "
        "a 60 fps video is sampled to this",
    )
    video_dir: Path | None = Field(
        None,
        description="where uploaded videos are written while they are processed (unset: the "
        "system's temporary folder); what a crashed gateway left there is removed at start",
    )

    # live streams (/v1/streams; service/streams/)
    max_streams: int = Field(
        4,
        ge=0,
        description="live streams at once (each a worker process and a share of the "
        "model); beyond: 503. 0: no streams",
    )
    stream_fps: float = Field(
        5.0,
        gt=0,
        description="frames per second detected on a stream unless it asks for "
        "another rate (at most SSD_VIDEO_MAX_FPS)",
    )
    stream_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a stream source must connect and send its first frame within "
        "this, and may fall silent no longer than this before it counts as dropped",
    )
    stream_fail_after_s: float = Field(
        60.0,
        gt=0,
        description="a stream whose source has sent no frame for this long, "
        "through every reconnection, ends as failed (with the reason)",
    )
    streams_file: Path | None = Field(
        None,
        description="a YAML (or JSON) file declaring streams (`streams:` a list of POST "
        "/v1/streams bodies, each with an `id`), read at start-up and whenever it changes "
        "(docs/streams.md)",
    )
    max_camera_sessions: int = Field(
        8,
        ge=0,
        description="camera sessions at once (WebSocket /v1/camera: the page's camera "
        "mode); beyond: closed with 1013 (try again later)",
    )
    stream_heartbeat_s: float = Field(
        5.0,
        gt=0,
        description="an events subscriber hears at least this often (a heartbeat "
        "when nothing else happened)",
    )

    # security
    api_key: SecretStr | None = Field(
        None,
        description="the key every /v1 request (and /metrics on the service port) must send, in "
        "X-API-Key or as `Authorization: Bearer KEY`; unset or empty: none. /livez and /readyz "
        "never need it",
    )
    open_pages: bool = Field(
        True,
        description="the web page (/), /docs and /openapi.json answer without the API key (they "
        "hold no data; the page sends the key its user types); false: they need the key too",
    )
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="serve /metrics on this port of SSD_HOST only, without the key (the "
        "Prometheus convention: a scrape port that a network policy opens to the monitoring "
        "system alone); unset: /metrics on the service port, behind the API key when one is set",
    )
    cors_origins: list[str] = Field(
        [], description="origins allowed by CORS (a JSON list); off by default"
    )

    # tiled inference (POST /v1/detect?tiles=...; ssdcore/tiling.py)
    max_tiles: int = Field(
        64,
        ge=1,
        description="model runs (tiles and whole images) one request may cause; tiles=auto "
        "grows its tiles to stay within it, a grid beyond it gets 422. Must not exceed "
        "SSD_BATCH_MAX_QUEUED_IMAGES; left unset, a smaller queue lowers it to its size",
    )
    tile_size: int = Field(
        600,
        ge=32,
        le=16_384,
        description="tiles=auto's tile side in pixels: where objects look as they did in "
        "training (a model trained on photos of about 600 px, shown at 300)",
    )
    tile_overlap: float = Field(
        0.2, ge=0.0, le=0.75, description="default overlap of neighbouring tiles (of a side)"
    )
    tile_merge: Literal["nmm", "nms"] = Field(
        "nmm",
        description="how boxes found by several tiles become one: nmm merges them into their "
        "union (an object cut by a tile border comes back whole), nms keeps the best one",
    )

    # response defaults
    score_threshold: float = Field(0.3, ge=0, le=1, description="default score threshold")
    iou_threshold: float = Field(0.5, gt=0, le=1, description="default NMS IoU threshold")
    max_detections: int = Field(
        100, ge=1, le=1000, description="default detections per image at most"
    )

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

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        from service.admission import parse_networks

        try:
            parse_networks(value)
        except ValueError as exc:
            raise ValueError(f"SSD_TRUSTED_PROXIES: {exc}") from None
        return value

    @field_validator("stream_sources")
    @classmethod
    def _sources(cls, value: list[str]) -> list[str]:
        from service.addresses import parse_sources

        try:
            parse_sources(value)
        except ValueError as exc:
            raise ValueError(f"SSD_STREAM_SOURCES: {exc}") from None
        return value

    @model_validator(mode="after")
    def _a_whole_request_fits_the_queue(self) -> Settings:
        if self.batch_max_queued_images < max(self.max_files, self.batch_max_size):
            raise ValueError(
                "SSD_BATCH_MAX_QUEUED_IMAGES must hold a whole request and a whole batch "
                f"(at least SSD_MAX_FILES={self.max_files} and "
                f"SSD_BATCH_MAX_SIZE={self.batch_max_size})"
            )
        if "max_tiles" in self.model_fields_set and self.batch_max_queued_images < self.max_tiles:
            raise ValueError(
                "SSD_BATCH_MAX_QUEUED_IMAGES must hold a whole tiled request (at least "
                f"SSD_MAX_TILES={self.max_tiles})"
            )
        return self

    @property
    def tile_budget(self) -> int:
        """Model runs per request: ``SSD_MAX_TILES``; left at its default, no more than the
        queue holds (a smaller queue lowers it rather than being refused)."""
        if "max_tiles" in self.model_fields_set:
            return self.max_tiles
        return min(self.max_tiles, self.batch_max_queued_images)

    @property
    def client_upload_bytes(self) -> int:
        """What ``SSD_UPLOAD_BYTES_PER_CLIENT`` comes to (its default depends on two others)."""
        if self.upload_bytes_per_client is not None:
            return min(self.upload_bytes_per_client, self.upload_buffer_bytes)
        return min(
            self.upload_buffer_bytes,
            max(self.upload_buffer_bytes // 4, self.max_body_bytes),
        )

    @model_validator(mode="after")
    def _metrics_port_is_its_own(self) -> Settings:
        if self.metrics_port is not None and self.metrics_port == self.port:
            raise ValueError("SSD_METRICS_PORT must differ from SSD_PORT")
        return self


def settings_markdown() -> str:
    """docs/settings.md: every setting, its variable, default and meaning (``make docs``)."""
    rows = []
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = (
            "unset"
            if default is None
            else json.dumps(str(default) if isinstance(default, Path) else default)
        )
        rows.append(f"| `SSD_{name.upper()}` | `{shown}` | {field.description or ''} |")
    return (
        "# Service settings\n\n"
        "Environment variables of `python -m service` (the flags `--host`, `--port`,\n"
        "`--model-repository`, `--model-name`, `--backend` and `--triton-url` override theirs).\n"
        "Generated from `service/settings.py` by `make docs`; a test keeps the two equal.\n\n"
        "| variable | default | what |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )
