"""The stream worker's HTTP sources (service/streams/remote.py, worker.py's http_frames) against
servers on 127.0.0.1 that misbehave: a server that ignores byte ranges, a playlist over the limit,
one that breaks off, numbers in playlists that are not numbers. Each ends the connection with a
clear reason, never a hang or a silently wrong picture. (The scene through real streams, tracked
and counted: test_streams.py.)"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from service.streams.remote import (
    MAX_PLAYLIST_BYTES,
    MAX_TARGET_S,
    Fetcher,
    RemoteFile,
    parse_playlist,
)
from service.streams.worker import Newest, SourceSpec, read_source
from service.video.protocol import VideoError, VideoLimits

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


@pytest.fixture
def server() -> Iterator[tuple[dict[str, Route], int]]:
    routes: dict[str, Route] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            route = routes.get(self.path)
            if route is None:
                self.send_error(404)
            else:
                route(self)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield routes, httpd.server_port
    httpd.shutdown()
    httpd.server_close()


def send(h, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
    h.send_response(200)
    h.send_header("Content-Type", content_type)
    h.send_header("Content-Length", str(len(body)))
    for key, value in (headers or {}).items():
        h.send_header(key, value)
    h.end_headers()
    h.wfile.write(body)


def spec(port: int, path: str) -> SourceSpec:
    return SourceSpec(
        kind="http",
        url=f"http://127.0.0.1:{port}{path}",
        address="127.0.0.1",
        port=port,
        host="127.0.0.1",
        path=path,
        tls=False,
        timeout_s=3.0,
        limits=VideoLimits(4096 * 4096, 4096, float("inf")),
        max_part_bytes=1 << 20,
    )


def ended_with(source: SourceSpec, within: float = 10.0) -> VideoError | None:
    """How the worker's reading of ``source`` ended (it must end, and say why)."""
    newest = Newest()
    reader = threading.Thread(target=read_source, args=(source, newest), daemon=True)
    reader.start()
    reader.join(within)
    assert not reader.is_alive() and newest.ended, "the reading thread hung or died silently"
    return newest.error


def test_a_server_that_ignores_byte_ranges_is_not_read_out_of_order(server):
    """It says it takes ranges, then answers a range with the whole file: the bytes from 0 must
    not be taken for the bytes from the offset (FFmpeg would demux garbage)."""
    routes, port = server
    data = bytes(range(256)) * 16
    routes["/v.mp4"] = lambda h: send(h, data, "video/mp4", {"Accept-Ranges": "bytes"})
    fetcher = Fetcher(spec(port, "/v.mp4"))
    file = RemoteFile(fetcher, fetcher.url, fetcher.get(fetcher.url))
    assert file.seekable()
    with pytest.raises(VideoError, match="ignored a byte range") as raised:
        file.seek(1000)
    assert raised.value.code == "invalid_source"


def test_a_playlist_over_the_limit_is_refused_not_cut(server):
    """Cut at the limit, a VOD playlist would lose its EXT-X-ENDLIST and be played as live from a
    half URL."""
    routes, port = server
    body = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n" + b"#EXTINF:1,\nsegment.ts\n" * 60_000
    assert len(body) > MAX_PLAYLIST_BYTES
    routes["/big.m3u8"] = lambda h: send(h, body, "application/vnd.apple.mpegurl")
    error = ended_with(spec(port, "/big.m3u8"))
    assert error is not None and error.code == "video_too_large", error


def test_a_playlist_that_breaks_off_ends_the_connection_with_the_reason(server):
    def broken(h) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/vnd.apple.mpegurl")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        first = b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n" + b"#" * 400 + b"\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(first), first))
        h.wfile.write(b"1000\r\n#EXTINF:1,\nseg")  # a chunk promised, cut short
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    routes, port = server
    routes["/live.m3u8"] = broken
    t0 = time.monotonic()
    error = ended_with(spec(port, "/live.m3u8"))
    assert error is not None and error.code == "source_unavailable", error
    assert "IncompleteRead" in error.message and time.monotonic() - t0 < 3


@pytest.mark.parametrize(
    "tag",
    [
        "#EXT-X-TARGETDURATION:1e9",
        "#EXT-X-TARGETDURATION:inf",
        "#EXT-X-TARGETDURATION:nan",
        "#EXT-X-MEDIA-SEQUENCE:nan",
        "#EXT-X-MEDIA-SEQUENCE:inf",
        "#EXT-X-MEDIA-SEQUENCE:\u0661\u0662",  # Arabic-Indic digits: isdigit() says yes
        "#EXT-X-STREAM-INF:RESOLUTION=\u00b2x2,BANDWIDTH=\u00b9\nv.m3u8",
    ],
)
def test_numbers_in_a_playlist_that_are_not_numbers(tag):
    playlist = parse_playlist(f"#EXTM3U\n{tag}\n#EXTINF:1,\ns.ts\n", "http://h/a.m3u8")
    assert 0.5 <= playlist.target_s <= MAX_TARGET_S
    assert all(s.sequence >= 0 for s in playlist.segments)
    assert all(v[0] == 0 and v[1] == 0 for v in playlist.variants)


def test_urls_with_ports_that_are_not_numbers_are_refused(server):
    _, port = server
    fetcher = Fetcher(spec(port, "/a.m3u8"))
    for url in ("http://127.0.0.1:99999/x", "http://127.0.0.1:8o/x"):
        with pytest.raises(VideoError) as raised:
            fetcher.get(url)
        assert raised.value.code == "source_refused", url
