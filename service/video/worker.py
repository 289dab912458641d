"""The decoding worker: one process per video, so that a file that crashes FFmpeg ends that
video only, never the gateway.

The gateway starts ``python -m service.video.worker SPEC`` (:class:`DecodeWorker`); the worker
opens the file (``service/video/decode.py``: allow-listed demuxers, ``file`` protocol only,
limits from the header), writes the header, then each sampled frame (300x300 RGB) on its stdout
(``service/video/protocol.py``), and ends with how many frames it decoded, or with an error.
The pipe is the flow control: the worker decodes the next frame while the gateway's model works
on the previous ones and blocks once the gateway stops reading, so memory stays flat for a video
of any length. A worker killed or crashed mid-video is an error line after the frames so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from service.video.protocol import (
    DONE,
    ERROR,
    FRAME,
    HEADER,
    INFO,
    Frame,
    VideoError,
    VideoInfo,
    VideoLimits,
    parse_frame,
)
from ssdcore.tiling import TileSpec


class DecodeWorker:
    """The gateway's side of one worker process."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.decoded = 0  # frames the worker decoded (known once it is done)
        self.frames_read = 0

    @classmethod
    async def start(
        cls,
        path: Path,
        fps: float | None,
        limits: VideoLimits,
        threads: int = 1,
        tiles: TileSpec | None = None,
        max_runs: int = 1,
    ) -> DecodeWorker:
        """``tiles``: each frame's tiles (and the whole frame) instead of the frame alone,
        planned as the gateway plans them (at most ``max_runs`` a frame)."""
        spec = {
            "path": str(path),
            "fps": fps,
            "limits": asdict(limits),
            "threads": threads,
            "tiles": asdict(tiles) if tiles is not None else None,
            "max_runs": max_runs,
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.video.worker",
            json.dumps(spec),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        return cls(process)

    async def _message(self) -> tuple[bytes, bytes]:
        assert self.process.stdout is not None
        try:
            head = await self.process.stdout.readexactly(HEADER.size)
            kind, size = HEADER.unpack(head)
            return kind, await self.process.stdout.readexactly(size)
        except asyncio.IncompleteReadError:
            code = await self.process.wait()
            how = f"signal {-code}" if code < 0 else f"exit status {code}"
            raise VideoError(
                400,
                "decoder_crashed",
                f"the decoder stopped ({how}) after {self.frames_read} frames: the video cannot "
                "be decoded further",
            ) from None

    def _raise(self, payload: bytes) -> None:
        body = json.loads(payload)
        raise VideoError(body["status"], body["code"], body["message"])

    async def info(self) -> VideoInfo:
        """The stream's header, checked against the limits (a VideoError otherwise)."""
        kind, payload = await self._message()
        if kind == ERROR:
            self._raise(payload)
        if kind != INFO:
            raise VideoError(400, "invalid_video", "the decoder did not read a header")
        return VideoInfo(**json.loads(payload))

    async def next(self) -> Frame | None:
        """The next sampled frame, or None after the last one."""
        kind, payload = await self._message()
        if kind == FRAME:
            self.frames_read += 1
            return parse_frame(payload)
        if kind == DONE:
            self.decoded = json.loads(payload)["decoded"]
            await self.process.wait()
            return None
        if kind == ERROR:
            self._raise(payload)
        raise VideoError(400, "invalid_video", f"unexpected message {kind!r} from the decoder")

    def kill(self) -> None:
        """Stops the worker if it still runs (the client went away, an error); asyncio's child
        watcher reaps it. Not a coroutine: it runs in cleanups that a cancellation interrupts
        at their first await."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


def main(argv: list[str]) -> int:
    """The worker process: decode the file named in the spec, write messages to stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway's Ctrl-C is the gateway's to handle
    from service.video import protocol
    from service.video.decode import Progress, frames, open_video, probe

    spec = json.loads(argv[0])
    limits = VideoLimits(**spec["limits"])
    out = sys.stdout.buffer
    try:
        try:
            container = open_video(Path(spec["path"]))
            with container:
                info = probe(container, limits)
                out.write(protocol.info_message(info))
                out.flush()
                progress = Progress()
                tiles = TileSpec(**spec["tiles"]) if spec["tiles"] else None
                plan = tiles.plan(info.width, info.height, spec["max_runs"]) if tiles else None
                decoded = frames(container, spec["fps"], limits, spec["threads"], progress, plan)
                for frame in decoded:
                    out.write(protocol.frame_message(frame))
                    out.flush()
                out.write(protocol.done_message(progress.decoded))
        except VideoError as exc:
            out.write(protocol.error_message(exc))
        except (MemoryError, ValueError, OverflowError, RuntimeError) as exc:  # FFmpeg's oddities
            error = VideoError(400, "invalid_video", f"the video cannot be decoded: {exc}")
            out.write(protocol.error_message(error))
        out.flush()
    except BrokenPipeError:  # the gateway stopped reading: the client went away
        with contextlib.suppress(OSError):
            os.close(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
