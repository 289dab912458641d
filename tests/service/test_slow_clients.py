"""Slow and stalled clients against ``python -m service`` over raw sockets (reliability spec §5).

The service runs as its own process (so its open files can be counted) with short timeouts:
headers within 2 s, at most 3 s between body reads, 20 kB/s on average after 1 s of grace,
2 s of keep-alive, and only 4 requests at inference: the stalled uploads below outnumber that,
so a server that let them hold inference slots would answer the normal request with 503.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

import httpx
import psutil
import pytest

from devtools.images import encode, photo
from devtools.raw_uploads import request_head
from tests.service.conftest import start_service
from tests.service.uploads import multipart, normal_request, port_of

pytestmark = pytest.mark.slow
LARGE = encode(photo(1280, 960, seed=3), "JPEG")  # 46 kB
TIMEOUTS = {
    "SSD_HEADER_TIMEOUT_S": "2",
    "SSD_BODY_READ_TIMEOUT_S": "3",
    "SSD_BODY_MIN_RATE": "20000",
    "SSD_BODY_GRACE_S": "1",
    "SSD_KEEP_ALIVE_S": "2",
    "SSD_MAX_IN_FLIGHT": "4",
}


@pytest.fixture
def slow_service(model_repo, monkeypatch):
    def start(**extra: str):
        for key, value in {**TIMEOUTS, **extra}.items():
            monkeypatch.setenv(key, value)
        proc, url = start_service(model_repo)
        started.append(proc)
        return proc, url

    started: list = []
    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=30)


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s


def seconds_until_closed(sock: socket.socket, t0: float, limit: float = 30) -> tuple[float, bytes]:
    """Read until the server closes the connection; (seconds since t0, what it sent)."""
    sock.settimeout(limit)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return time.monotonic() - t0, got


def watch(socks: list[socket.socket], t0: float) -> list[tuple[float, bytes]]:
    """seconds_until_closed for every socket, in threads; in order."""
    out: list = [None] * len(socks)

    def one(i: int) -> None:
        out[i] = seconds_until_closed(socks[i], t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(socks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_stalled_uploads_and_idle_connections_take_nothing_from_others(slow_service, figures):
    """N uploads that stop after two bytes of body and M connections that send nothing: a
    normal request is served as usual beside them; the server drops them within their
    timeouts; its open files are back to the baseline afterwards."""
    proc, url = slow_service()
    port = port_of(url)
    ps = psutil.Process(proc.pid)
    for _ in range(2):
        normal_request(url)  # warm-up
    baseline = statistics.median(normal_request(url)[1] for _ in range(3))
    fds0 = ps.num_fds()
    n_stalled, n_idle = 12, 12
    body, ctype = multipart()
    t0 = time.monotonic()
    stalled = []
    for _ in range(n_stalled):
        s = connect(port)
        s.sendall(request_head(port, len(body), ctype) + body[:2])
        stalled.append(s)
    idle = [connect(port) for _ in range(n_idle)]
    time.sleep(0.3)  # let the server take them all in
    status, beside = normal_request(url)
    assert status == 200, status
    results = watch(stalled + idle, t0)
    stalled_s = [r[0] for r in results[:n_stalled]]
    idle_s = [r[0] for r in results[n_stalled:]]
    # a stalled upload: 408 (or closed) once the body stopped for longer than the deadline
    assert all(b"408" in r[1].split(b"\r\n", 1)[0] for r in results[:n_stalled])
    assert max(stalled_s) < 3 + 2, stalled_s  # read deadline 3 s (after 1 s of grace), + slack
    assert max(idle_s) < 2 + 2, idle_s  # header deadline 2 s, + slack
    for s in stalled + idle:
        s.close()
    time.sleep(0.5)
    fds1 = ps.num_fds()
    figures(
        f"{n_stalled} stalled uploads + {n_idle} idle connections",
        "normal requests served as usual; stalled ones 408/closed at the body deadline, idle "
        "ones at the header deadline; open files back to the baseline",
        f"a normal request took {beside * 1e3:.0f} ms beside them ({baseline * 1e3:.0f} ms alone)"
        f"; stalled closed after {min(stalled_s):.1f}-{max(stalled_s):.1f} s (deadline 3 s), "
        f"idle after {min(idle_s):.1f}-{max(idle_s):.1f} s (deadline 2 s)",
        f"open files {fds0} before, {fds1} after",
    )
    assert beside < 3 * baseline + 1.0, (beside, baseline)
    assert abs(fds1 - fds0) <= 2, (fds0, fds1)


def test_trickle_is_cut_and_a_slow_steady_upload_completes(slow_service, figures):
    _proc, url = slow_service()
    port = port_of(url)
    body, ctype = multipart()
    # a byte every 0.2 s (5 B/s, far under 20 kB/s): cut once the 1 s grace is over
    s = connect(port)
    t0 = time.monotonic()
    s.sendall(request_head(port, len(body), ctype))
    sent, closed = 0, None
    s.settimeout(0.2)
    while time.monotonic() - t0 < 15:
        try:
            s.sendall(body[sent : sent + 1])
            sent += 1
            reply = s.recv(65536)
            if reply or reply == b"":
                closed = (time.monotonic() - t0, reply)
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = (time.monotonic() - t0, b"")
            break
    s.close()
    assert closed is not None, "the trickle was never cut"
    assert closed[0] < 1 + 2 and sent < len(body) // 10, (closed, sent)
    assert closed[1].startswith(b"HTTP/1.1 408"), closed[1][:80]
    # 40 kB/s, twice the minimum rate, for longer than the grace period: completes
    body, ctype = multipart(image=LARGE)
    s = connect(port)
    t1 = time.monotonic()
    s.sendall(request_head(port, len(body), ctype))
    chunk = 4000
    for i in range(0, len(body), chunk):
        s.sendall(body[i : i + chunk])
        time.sleep(0.1)
    upload_s = time.monotonic() - t1
    _, reply = seconds_until_closed_or_response(s)
    s.close()
    assert upload_s > 1.0  # it really was slower than the grace period
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    figures(
        "trickling upload vs slow steady upload",
        "a trickle under the minimum rate gets 408; a steady upload above it completes",
        f"5 B/s: 408 after {closed[0]:.1f} s ({sent} of {len(body)} bytes sent); "
        f"40 kB/s over {upload_s:.1f} s: 200",
        "minimum rate 20 kB/s after 1 s (defaults 8 kB/s after 10 s)",
    )


def seconds_until_closed_or_response(sock: socket.socket) -> tuple[float, bytes]:
    """Read one response (headers + Content-Length body) or until closed."""
    sock.settimeout(60)
    t0, got = time.monotonic(), b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(65536)
        if not chunk:
            return time.monotonic() - t0, got
        got += chunk
    head, _, rest = got.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")), 0,
    )  # fmt: skip
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return time.monotonic() - t0, head + b"\r\n\r\n" + rest


def test_headers_that_never_end_are_closed_at_the_header_timeout(slow_service, figures):
    _proc, url = slow_service()
    port = port_of(url)
    s = connect(port)
    t0 = time.monotonic()
    s.sendall(f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
    s.settimeout(0.3)
    closed_after = None
    while time.monotonic() - t0 < 15:
        try:
            s.sendall(b"a")  # a header that grows forever, a byte at a time
            if s.recv(1024) == b"":
                closed_after = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed_after = time.monotonic() - t0
            break
    s.close()
    assert closed_after is not None and 1.5 < closed_after < 2 + 1.5, closed_after
    # keep-alive: a connection idle after a response is closed after 2 s too
    s = connect(port)
    s.sendall(f"GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    t1 = time.monotonic()
    kept_s, got = seconds_until_closed(s, t1)
    s.close()
    assert got.startswith(b"HTTP/1.1 200") and kept_s < 2 + 1.5, (kept_s, got[:60])
    figures(
        "headers that never end; idle keep-alive",
        "closed at the header timeout; idle kept-alive connections after the keep-alive timeout",
        f"endless header closed after {closed_after:.1f} s (deadline 2 s); idle kept-alive "
        f"closed {kept_s:.1f} s after its response (2 s)",
        "defaults 10 s and 5 s",
    )


def test_connections_beyond_the_cap_are_refused_fast(slow_service, figures):
    _proc, url = slow_service(SSD_MAX_CONNECTIONS="8", SSD_HEADER_TIMEOUT_S="3")
    port = port_of(url)
    held = [connect(port) for _ in range(8)]
    time.sleep(0.3)
    t0 = time.perf_counter()
    with httpx.Client(timeout=10) as c:
        r = c.get(url + "/livez")
    refused_ms = (time.perf_counter() - t0) * 1e3
    assert r.status_code == 503 and refused_ms < 1000, (r.status_code, refused_ms)
    for s in held:
        s.close()
    time.sleep(0.3)
    assert httpx.get(url + "/livez", timeout=10).status_code == 200  # served again
    figures(
        "connections past the cap (SSD_MAX_CONNECTIONS=8)",
        "new ones refused quickly, the service keeps serving once below the cap",
        f"the 9th connection's request: 503 in {refused_ms:.0f} ms; 200 once the others closed",
        "default cap 1024",
    )
