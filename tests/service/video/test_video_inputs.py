"""Bad videos and bad clients on ``POST /v1/videos``: each a clear 4xx (or an error line once the
answer has started), never a 5xx; the decoding worker and the upload's file never outlive the
request; the service keeps serving images throughout."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from devtools.images import encode, photo
from devtools.videos import audio_only, no_frames, plain_clip, timed_clip, unknown_codec
from service.settings import Settings
from service.video.spool import VideoSpool
from tests.service.conftest import LiveService, run_service

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    good = plain_clip(d / "good.mp4", (96, 64), 10)
    truncated = d / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    hls = d / "playlist.mp4"
    hls.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n")
    concat = d / "concat.mp4"
    concat.write_text("ffconcat version 1.0\nfile 'http://169.254.169.254/latest'\n")
    fake_mkv = d / "fake.mkv"  # a Matroska signature, then a playlist
    fake_mkv.write_bytes(b"\x1a\x45\xdf\xa3" + b"#EXTM3U\nfile:///etc/passwd\n")
    return {
        "good": good,
        "truncated": truncated,
        "hls": hls,
        "concat": concat,
        "fake_mkv": fake_mkv,
        "audio": audio_only(d / "audio.mp4"),
        "empty": no_frames(d / "empty.mkv"),
        "huge_frames": plain_clip(d / "huge.mp4", (1920, 1088), 2),
        "too_long": plain_clip(d / "long.mp4", (64, 48), 120, fps=1),
        "long": plain_clip(d / "stream.mp4", (96, 64), 1500),
        "jpeg": _write(d / "photo.mp4", encode(photo(64, 48))),
        "unknown_codec": unknown_codec(d / "unknown.mkv"),
        "b_frames_avi": plain_clip(d / "b.avi", (96, 64), 50),  # x264's B-frames, in AVI
        "late_start": timed_clip(d / "late.mkv", [1000 + i / 25 for i in range(50)]),
        "pause": timed_clip(
            d / "pause.mkv", [i / 30 for i in range(61)] + [3.5 + i / 30 for i in range(60)]
        ),
    }


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def live(model_repo, tmp_path_factory) -> Iterator[LiveService]:
    settings = Settings(
        model_repository=model_repo,
        model_name="ssd300_onnx",
        max_video_bytes=16 * 1024 * 1024,
        max_video_seconds=100,
        max_video_pixels=1280 * 720,
        max_videos=1,
        video_dir=tmp_path_factory.mktemp("spool"),
    )
    with run_service(settings) as service:
        yield service


def post(live: LiveService, path: Path, **params) -> httpx.Response:
    with live.client() as c:
        return c.post("/v1/videos", params=params, files={"video": (path.name, path.read_bytes())})


def spooled(live: LiveService) -> list[Path]:
    return [p for p in Path(live.settings.video_dir).rglob("video-*")]


def workers() -> list[psutil.Process]:
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "service.video.worker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def assert_still_serving(live: LiveService) -> None:
    with live.client() as c:
        r = c.post(
            "/v1/detect", content=encode(photo(64, 48)), headers={"content-type": "image/jpeg"}
        )
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 5
    while (spooled(live) or workers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not spooled(live), "an upload's file outlived its request"
    assert not workers(), "a decoding worker outlived its request"


@pytest.mark.parametrize(
    "name, status, code",
    [
        ("jpeg", 415, "unsupported_video"),
        ("hls", 415, "unsupported_video"),
        ("concat", 415, "unsupported_video"),
        ("fake_mkv", 400, "invalid_video"),
        ("truncated", 400, None),
        ("audio", 400, "no_video_stream"),
        ("empty", 400, None),
        ("huge_frames", 413, "video_too_large"),
        ("too_long", 413, "video_too_long"),
        ("unknown_codec", 415, "unsupported_codec"),
    ],
)
def test_a_bad_video_is_a_clear_client_error(live, clips, name, status, code):
    r = post(live, clips[name])
    assert r.status_code == status, r.text
    body = r.json()["error"]
    if code is not None:
        assert body["code"] == code, body
    assert "/" not in body["message"].replace("MP4/MOV", "").replace("Matroska/WebM", ""), (
        f"a server path in the message: {body['message']}"
    )
    assert_still_serving(live)


def test_the_good_clip_is_answered_frame_by_frame(live, clips):
    r = post(live, clips["good"])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(x) for x in r.text.splitlines()]
    frames, summary = lines[:-1], lines[-1]["summary"]
    assert [f["frame"] for f in frames] == list(range(10))
    assert [f["pts_s"] for f in frames] == pytest.approx([i / 25 for i in range(10)])
    assert summary["frames_decoded"] == summary["frames_processed"] == 10
    assert (summary["width"], summary["height"]) == (96, 64)
    assert all(f["model_version"] == summary["model"]["version"] for f in frames)
    assert_still_serving(live)


def test_limits_of_the_request(live, clips):
    with live.client() as c:
        big = c.post(
            "/v1/videos",
            content=b"\0" * (live.settings.max_video_bytes + 1),
            headers={"content-type": "video/mp4"},
        )
        assert big.status_code == 413, big.text
        wrong = c.post("/v1/videos", content=b"x" * 100, headers={"content-type": "text/plain"})
        assert wrong.status_code == 415, wrong.text
        two = c.post(
            "/v1/videos",
            files=[("video", ("a.mp4", b"1")), ("video", ("b.mp4", b"2"))],
        )
        assert two.status_code == 400, two.text
        raw = c.post(
            "/v1/videos", content=clips["good"].read_bytes(), headers={"content-type": "video/mp4"}
        )
        assert raw.status_code == 200, raw.text
        form = c.post(
            "/v1/videos",
            files={"video": ("a.mp4", clips["good"].read_bytes())},
            data={"note": "x" * 1000},
        )
        assert form.status_code == 400 and form.json()["error"]["code"] == "unexpected_field"
        for bad in ("1,2,3", "0,0,0,0", "[[1,2,3,4,5]]", "nan,1,2,3", "[" * 1500 + "]" * 1500):
            r = c.post("/v1/videos", params={"lines": bad}, files={"video": ("a.mp4", b"1")})
            assert r.status_code == 422, (bad, r.text)
    assert_still_serving(live)


def _first_line(stream: Iterator[str]) -> dict:
    for line in stream:
        if line:
            return json.loads(line)
    raise AssertionError("no line")


def test_a_client_gone_mid_answer_stops_the_work(live, clips):
    """1500 frames take minutes here: the client reads one line and leaves; within seconds the
    worker is gone, the file removed and no frame of it waits at the model."""
    with (
        httpx.Client(base_url=live.url, timeout=60) as c,
        c.stream("POST", "/v1/videos", files={"video": ("s.mp4", clips["long"].read_bytes())}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        _first_line(lines)
        assert workers(), "the worker runs while the video is answered"
    left = time.monotonic()
    deadline = left + 5
    while (workers() or spooled(live)) and time.monotonic() < deadline:
        time.sleep(0.05)
    stopped = time.monotonic() - left
    assert not workers() and not spooled(live), "work went on for a client that left"
    assert stopped < 2.0, f"the work stopped {stopped:.2f} s after the client left"
    deadline = time.monotonic() + 5
    while live.metric("ssd_batch_queue_images") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.metric("ssd_batch_queue_images") == 0
    assert_still_serving(live)


def test_one_video_at_a_time_when_so_set(live, clips):
    with (
        httpx.Client(base_url=live.url, timeout=60) as c,
        c.stream("POST", "/v1/videos", files={"video": ("s.mp4", clips["long"].read_bytes())}) as r,
    ):
        lines = r.iter_lines()  # kept: a dropped iterator closes the response
        _first_line(lines)
        second = post(live, clips["good"])
        assert second.status_code == 503, second.text
        assert second.json()["error"]["code"] == "overloaded"
    assert_still_serving(live)
    assert post(live, clips["good"]).status_code == 200  # the place was given back


def test_a_crashing_decoder_ends_its_video_only(live, clips):
    """The worker dies of a segmentation fault mid-video: the answer has the frames so far, then
    an error line; the gateway serves on."""
    with (
        httpx.Client(base_url=live.url, timeout=60) as c,
        c.stream("POST", "/v1/videos", files={"video": ("s.mp4", clips["long"].read_bytes())}) as r,
    ):
        lines = r.iter_lines()
        first = _first_line(lines)
        assert first["frame"] == 0
        (worker,) = workers()
        worker.send_signal(signal.SIGSEGV)  # psutil: never a process that reused the PID
        rest = [json.loads(x) for x in lines if x]
    assert "error" in rest[-1], rest[-1]
    assert rest[-1]["error"]["code"] == "decoder_crashed"
    assert "signal 11" in rest[-1]["error"]["message"]
    assert all("frame" in x for x in rest[:-1])
    assert_still_serving(live)


def test_what_a_dead_gateway_left_is_removed_at_start(tmp_path):
    """A gateway's files live in a folder tied to an flock it holds for its life: one whose lock
    is free (its gateway ended, however) is removed by the next start; a live one's never."""
    live_one = VideoSpool(tmp_path)
    kept = live_one.new_file()
    kept.write_bytes(b"video")
    dead = tmp_path / "gateway-deadbeef0000"
    dead.mkdir()
    (dead / "video-1").write_bytes(b"left behind")
    (tmp_path / "gateway-deadbeef0000.lock").write_bytes(b"")
    other = VideoSpool(tmp_path)
    try:
        assert other.removed_at_start == 1
        assert not dead.exists()
        assert kept.exists(), "a live gateway's upload was removed"
    finally:
        other.close()
        live_one.close()
    assert not kept.exists()


def answer(live: LiveService, path: Path, **params) -> tuple[list[dict], dict]:
    r = post(live, path, **params)
    assert r.status_code == 200, r.text
    lines = [json.loads(x) for x in r.text.splitlines()]
    assert "summary" in lines[-1], lines[-1]
    return lines[:-1], lines[-1]["summary"]


def test_frame_times_that_are_not_plain(live, clips):
    """AVI carries no presentation times (FFmpeg's come out of order with B-frames): timed by
    index; a clip whose times start at 1000 s: from 0, not refused as too long; a pause in a
    variable-rate clip: never two sampled frames closer than 0.8 of a step after it."""
    frames, summary = answer(live, clips["b_frames_avi"])
    assert summary["frames_decoded"] == summary["frames_processed"] == 50
    assert [f["pts_s"] for f in frames] == pytest.approx([i / 25 for i in range(50)])
    frames, summary = answer(live, clips["late_start"])
    assert summary["frames_processed"] == 50 and frames[0]["pts_s"] == 0.0
    assert summary["duration_s"] < 3
    for fps in (1, 2, 10):
        frames, _ = answer(live, clips["pause"], fps=fps)
        pts = [f["pts_s"] for f in frames]
        gaps = [b - a for a, b in itertools.pairwise(pts)]
        assert min(gaps) >= 0.8 / fps, (fps, pts)
    assert_still_serving(live)


def _trickle(port: int, address: str = "127.0.0.1") -> socket.socket:
    """A video upload that declares 10 MB and sends its first bytes only."""
    sock = socket.create_connection((address, port))
    sock.sendall(
        b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: video/mp4\r\n"
        b"Content-Length: 10000000\r\n\r\n" + b"\0" * 1000
    )
    return sock


def test_slow_uploads_never_hold_the_model(live, clips):
    """Two uploads from one client that never finish: a third from it is refused (2 a client),
    and a video from elsewhere is processed meanwhile (SSD_MAX_VIDEOS=1 here: the places for
    processing are taken once an upload is whole)."""
    port = int(live.url.rsplit(":", 1)[1])
    slow = [_trickle(port) for _ in range(2)]
    try:
        time.sleep(0.3)
        third = post(live, clips["good"])
        assert third.status_code == 503, third.text
        # another client (uvicorn takes X-Forwarded-For from a proxy on 127.0.0.1): processed
        with httpx.Client(timeout=60, headers={"X-Forwarded-For": "10.0.0.9"}) as c:
            r = c.post(live.url + "/v1/videos", content=clips["good"].read_bytes(),
                       headers={"content-type": "video/mp4"})  # fmt: skip
        assert r.status_code == 200, r.text[:300]
        assert json.loads(r.text.splitlines()[-1])["summary"]["frames_processed"] == 10
    finally:
        for sock in slow:
            sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and post(live, clips["good"]).status_code != 200:
        time.sleep(0.2)
    assert post(live, clips["good"]).status_code == 200
    assert_still_serving(live)


def test_an_unwritable_video_folder_leaves_images_served(model_repo, tmp_path, clips):
    """SSD_VIDEO_DIR that cannot be made (here: under a file; a read-only root in a container
    without its volume): the gateway starts, images are answered, videos get a clear 503."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = Settings(
        model_repository=model_repo, model_name="ssd300_onnx", video_dir=blocker / "videos"
    )
    with run_service(settings) as service:
        with service.client() as c:
            image = c.post(
                "/v1/detect", content=encode(photo(64, 48)), headers={"content-type": "image/jpeg"}
            )
            assert image.status_code == 200, image.text
        r = post(service, clips["good"])
        assert r.status_code == 503 and r.json()["error"]["code"] == "videos_unavailable", r.text


def test_workers_start_without_python_in_the_forked_child(live, clips, tmp_path):
    """A decoding worker is started with no Python run between fork and exec: Python's
    after-fork handlers in the child free other threads' objects there, and FFmpeg's (with
    threads of their own) then hang the child and the gateway's loop (uvloop's spawn did so)."""
    mark = tmp_path / "python-ran-in-a-forked-child"

    def in_child() -> None:
        with contextlib.suppress(OSError):
            mark.write_text("x")

    os.register_at_fork(after_in_child=in_child)
    r = post(live, clips["good"])
    assert r.status_code == 200, r.text
    assert not mark.exists(), "the worker's child ran Python's after-fork handlers"
