"""A file server on 127.0.0.1 for download tests: routes with faults, requests counted."""

from __future__ import annotations

import collections
import hashlib
import http.server
import threading
import time
from dataclasses import dataclass


@dataclass
class Route:
    body: bytes
    status: int = 200
    extra_length: int = 0  # announce this many bytes more than sent, then close the connection
    pieces: int = 1  # send the body in this many writes ...
    pause: float = 0.0  # ... sleeping this long before each
    redirect: str | None = None  # answer 302 to this location instead
    length: bool = True  # send Content-Length (False: the body ends when the connection does)


class Server:
    """A ThreadingHTTPServer in a background thread serving ``routes``; counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: collections.Counter[str] = collections.Counter()
        lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    server.requests[self.path] += 1
                route = server.routes.get(self.path)
                if route is None or route.status != 200:
                    self.send_error(404 if route is None else route.status)
                    return
                if route.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", route.redirect)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = route.body
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if route.length:
                    self.send_header("Content-Length", str(len(body) + route.extra_length))
                self.end_headers()
                step = -(-len(body) // route.pieces) or 1
                for i in range(0, len(body), step):
                    time.sleep(route.pause)
                    self.wfile.write(body[i : i + step])
                    self.wfile.flush()
                self.close_connection = True

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.stopped = False

    def serve(self, path: str, route: Route) -> str:
        self.routes[path] = route
        return self.base + path

    def stop(self) -> None:
        """Stop serving and close the listening socket: a later connection is refused."""
        if not self.stopped:
            self.stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


def hashed_name(data: bytes, stem: str = "weights") -> str:
    return f"/{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
