"""python -m service --host H --port P --model-repository DIR [--backend onnx|openvino|triton] [--triton-url URL]

Flags override the settings, which come from environment variables prefixed SSD_.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

import uvicorn

from service.app import create_app
from service.http_server import raise_open_files_limit, server_config
from service.memory import fix_mmap_threshold
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model-repository")
    p.add_argument("--model-name")
    p.add_argument("--backend", choices=["onnx", "openvino", "triton"])
    p.add_argument("--triton-url")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k != "log_level"}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # resident memory about half, and flat, under load (service/memory.py)
    if settings.mmap_threshold and not fix_mmap_threshold(settings.mmap_threshold):
        logging.getLogger("service").info(
            "malloc's mmap threshold left as it is (not glibc, or set by MALLOC_MMAP_THRESHOLD_ "
            "or GLIBC_TUNABLES)"
        )
    soft, hard = raise_open_files_limit()
    logging.getLogger("service").info("open files: soft limit %d (hard %d)", soft, hard)
    app = create_app(settings)
    print(
        f"SSD300 detection service on http://{settings.host}:{settings.port}/ "
        f"(backend {settings.backend}, model {settings.model_name})",
        flush=True,
    )
    config = server_config(app, settings, args.log_level)
    # uvicorn re-raises the signal after its graceful shutdown; having drained every request,
    # a SIGTERM then ends the process with status 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    DrainingServer(config, app.start_draining).run()
    return 0


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: readiness turns off at once, then uvicorn stops accepting connections,
    lets in-flight requests finish (up to 30 s) and runs the lifespan shutdown."""

    def __init__(self, config: uvicorn.Config, start_draining) -> None:
        super().__init__(config)
        self.start_draining = start_draining

    def handle_exit(self, sig, frame) -> None:
        self.start_draining()
        super().handle_exit(sig, frame)


if __name__ == "__main__":
    sys.exit(main())
