"""Live sources on 127.0.0.1 for the stream tests: MJPEG over HTTP (the scene's frames as JPEG
parts at a frame rate, looping), and sources that misbehave (silent, garbage, a redirect, a
plain JPEG), plus an SSE reader."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator

import httpx

from devtools.images import encode
from devtools.videos import TEST_SCENE, background, render


def scene_jpegs(frames: int = 75) -> list[bytes]:
    bg = background(0)
    return [encode(render(TEST_SCENE, f, bg), quality=90) for f in range(frames)]


class Sources:
    """A ThreadingHTTPServer in a background thread; ``/mjpeg`` loops ``jpegs`` at ``fps``."""

    def __init__(self, jpegs: list[bytes], fps: float = 25.0) -> None:
        sources = self
        self.jpegs, self.fps = jpegs, fps
        self.clients = 0
        self.stop = threading.Event()
        self.files: dict[str, tuple[bytes, str]] = {}  # path -> (body, content type)
        self.requests: list[tuple[str, str]] = []  # (path, Range) of the files served
        self.live_segments: list[str] = []  # /live.m3u8: these in a loop, a window of three
        self.live_started = time.monotonic()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                if self.path.startswith("/private"):  # HTTP Basic admin:s3cret, then MJPEG
                    expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
                    if self.headers.get("Authorization") != expected:
                        self.send_error(401)
                        return
                    self.path = "/mjpeg"
                if self.path == "/mjpeg":
                    sources.clients += 1
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                    self.end_headers()
                    try:
                        for jpeg in sources.frames():
                            self.wfile.write(
                                b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: "
                                + str(len(jpeg)).encode()
                                + b"\r\n\r\n"
                                + jpeg
                                + b"\r\n"
                            )
                    except OSError:
                        pass
                elif self.path == "/silent":
                    sources.stop.wait(60)  # accepts, never answers
                elif self.path == "/garbage":
                    self.send_response(200)
                    self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b"--frame\r\n\r\n" + bytes(range(256)) * 40 + b"\r\n")
                            time.sleep(0.02)
                    except OSError:
                        pass
                elif self.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                    self.end_headers()
                elif self.path in sources.files:
                    self.send_file(*sources.files[self.path])
                elif self.path == "/live.m3u8":
                    self.send_file(
                        sources.live_playlist().encode(), "application/vnd.apple.mpegurl"
                    )
                elif self.path == "/snapshot.jpg":
                    body = sources.jpegs[0]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                else:
                    self.send_error(404)

            def send_file(self, body: bytes, content_type: str) -> None:
                """The file, or the byte range asked for (``Range: bytes=N-``)."""
                asked = self.headers.get("Range", "")
                sources.requests.append((self.path, asked))
                start = int(asked[6:].split("-")[0]) if asked.startswith("bytes=") else None
                self.send_response(206 if start is not None else 200)
                self.send_header("Content-Type", content_type)
                self.send_header("Accept-Ranges", "bytes")
                if start is not None:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - (start or 0)))
                self.end_headers()
                with contextlib.suppress(OSError):
                    self.wfile.write(body[start or 0 :])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def live_playlist(self, segment_s: float = 1.0) -> str:
        """A live HLS playlist: a window of the last three segments, one more each second
        (``live_segments`` in a loop), never ending."""
        newest = int((time.monotonic() - self.live_started) / segment_s) + 2
        first = max(0, newest - 2)
        lines = ["#EXTM3U", "#EXT-X-VERSION:3", f"#EXT-X-TARGETDURATION:{segment_s:g}",
                 f"#EXT-X-MEDIA-SEQUENCE:{first}"]  # fmt: skip
        for n in range(first, newest + 1):
            lines += [f"#EXTINF:{segment_s:.3f},", self.live_segments[n % len(self.live_segments)]]
        return "\n".join(lines) + "\n"

    def frames(self) -> Iterator[bytes]:
        start, k = time.monotonic(), 0
        while not self.stop.is_set():
            yield self.jpegs[k % len(self.jpegs)]
            k += 1
            time.sleep(max(0.0, start + k / self.fps - time.monotonic()))

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def sse_events(lines: httpx.Response | Iterator[str]) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a text/event-stream response (or of its lines), as they arrive."""
    kind, data = None, []
    for line in lines.iter_lines() if isinstance(lines, httpx.Response) else lines:
        if line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and kind is not None:
            yield kind, json.loads("\n".join(data))
            kind, data = None, []
