"""Upload attacks over raw sockets from many loopback addresses (127.0.x.y, all of which reach
the local host on Linux): partial uploads that stall, and a sender that trickles bytes into many
of them at a set rate (tests/service/test_upload_admission.py, benchmarks/upload_admission_bench.py).
"""

from __future__ import annotations

import socket
import threading
import time

BIG = 9 * 1024 * 1024  # what each attacking upload says it will send
BOUNDARY_START = b"--XyZ\r\n"


def request_head(port: int, length: int, content_type: str) -> bytes:
    return (
        f"POST /v1/detect HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def source(i: int) -> str:
    """The i-th loopback address other than 127.0.0.1 (which the normal requests use)."""
    return f"127.0.{1 + i // 250}.{2 + i % 250}"


def partial_upload(port: int, address: str, first: bytes = BOUNDARY_START) -> socket.socket:
    """A connection from ``address`` that announced a BIG multipart body and sent ``first``."""
    s = socket.socket()
    s.bind((address, 0))
    s.settimeout(30)
    s.connect(("127.0.0.1", port))
    s.sendall(request_head(port, BIG, "multipart/form-data; boundary=XyZ") + first)
    return s


def idle_connection(port: int, address: str) -> socket.socket:
    s = socket.socket()
    s.bind((address, 0))
    s.connect(("127.0.0.1", port))
    return s


class Trickler:
    """A thread sending each socket ``rate`` bytes/s in 10 pieces a second until stopped; a
    socket the server closed (a dropped upload) leaves the set, with what it answered kept."""

    def __init__(self, socks: list[socket.socket], rate: float) -> None:
        self.socks, self.rate = socks, rate
        self.answered: list[bytes] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        piece = b"x" * int(self.rate / 10)
        alive = list(self.socks)
        while alive and not self.stop.is_set():
            t0 = time.monotonic()
            for s in list(alive):
                try:
                    s.sendall(piece)
                except OSError:  # dropped: the server answered and closed
                    alive.remove(s)
                    try:
                        self.answered.append(s.recv(4096))
                    except OSError:
                        self.answered.append(b"")
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - t0)))

    def start(self) -> Trickler:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)
