"""``/v1/streams`` against real sources on 127.0.0.1: an RTSP camera (GStreamer's RTSP server
playing the scene clip, killed and restarted), MJPEG over HTTP, and sources that misbehave;
events read as Server-Sent Events over real HTTP (uvicorn), the scene model detecting."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest

from devtools import rtsp_server
from devtools.videos import COUNTING_LINE, scene_hls
from loadtest.processes import free_port
from service.backends import BackendUnavailable
from service.backends.onnx import OnnxBackend
from service.settings import Settings
from service.streams.manager import Subscriber
from ssdcore.labels import ClassList
from ssdcore.repository import ModelStore
from tests.service.conftest import LiveService, run_service
from tests.service.versions import copy_version, write_version
from tests.service.video.stream_sources import Sources, scene_jpegs, sse_events
from tests.service.video.test_videos_api import track_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(scene_repo) -> Iterator[LiveService]:
    settings = Settings(
        model_repository=scene_repo,
        model_name="ssd300_onnx",
        max_streams=3,
        stream_timeout_s=2.0,
        stream_fail_after_s=5.0,
        stream_heartbeat_s=1.0,
    )
    with run_service(settings) as service:
        yield service


@pytest.fixture(scope="module")
def sources() -> Iterator[Sources]:
    server = Sources(scene_jpegs(), fps=25)
    yield server
    server.close()


@pytest.fixture
def camera_port() -> int:
    why = rtsp_server.available()
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the RTSP server cannot run: {why}")
        pytest.skip(why)
    return free_port()


def start(live: LiveService, **body) -> dict:
    with live.client() as c:
        r = c.post("/v1/streams", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def stop(live: LiveService, stream_id: str) -> None:
    with live.client() as c:
        assert c.delete(f"/v1/streams/{stream_id}").status_code == 204
        assert c.get(f"/v1/streams/{stream_id}").status_code == 404


def described(live: LiveService, stream_id: str) -> dict:
    with live.client() as c:
        return c.get(f"/v1/streams/{stream_id}").json()


def wait_state(live: LiveService, stream_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = described(live, stream_id)
        if body["state"] == state:
            return body
        time.sleep(0.1)
    raise AssertionError(f"never {state}: {body}")


def events_until(live: LiveService, stream_id: str, done, timeout: float = 60) -> list:
    """Events of the stream (kind, data) until ``done(kind, data)`` is true."""
    seen = []
    with (
        httpx.Client(base_url=live.url, timeout=timeout) as c,
        c.stream("GET", f"/v1/streams/{stream_id}/events") as r,
    ):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + timeout
        for kind, data in sse_events(r):
            seen.append((kind, data))
            if done(kind, data):
                return seen
            assert time.monotonic() < deadline, seen[-5:]
    return seen


def test_rtsp_camera_tracked_counted_and_reconnected(live, scene_clip, camera_port, tmp_path):
    """The clip over RTSP: tracks and line counts as the ground truth says; the clip's end and
    the server killed are reconnections (state events), the server back is running again."""
    clip, truth = scene_clip
    log = tmp_path / "rtsp.log"
    camera = rtsp_server.start(clip, camera_port, log)
    try:
        stream = start(
            live,
            source=f"rtsp://127.0.0.1:{camera_port}/live",
            fps=10,
            lines=[list(COUNTING_LINE)],
            name="gate",
        )
        sid = stream["id"]
        assert stream["name"] == "gate" and stream["state"] in ("connecting", "running")
        events = events_until(live, sid, lambda k, d: k == "state" and d["state"] == "reconnecting")
        frames = [d for k, d in events if k == "frame"]
        # one pass of the clip (75 frames, 3 s), detected at most 10 a second, the newest each
        # time: the indices grow, what the model had no time for is counted as skipped
        indices = [f["frame"] for f in frames]
        assert indices == sorted(set(indices)) and len(frames) >= 10, indices
        assert all(f["skipped"] == b - a - 1 for f, a, b in zip(frames[1:], indices, indices[1:]))
        assert max(indices) >= 70, indices  # the clip's end reached
        assert {f["width"] for f in frames} == {640} and {f["model_version"] for f in frames} == {
            "1"
        }
        # the scene's three objects, each under one track id in most frames it was found in
        # (None: found, its track not confirmed yet, as on a track's first frame)
        for index, ids in track_ids(frames, truth).items():
            hits = [i for i in ids if i != "miss"]
            assert len(hits) >= 0.6 * len(ids), (index, ids)
            tracked = [i for i in hits if i is not None]
            (_, most), *_ = collections.Counter(tracked).most_common(1)
            assert most >= 0.7 * len(tracked), (index, ids)
        body = described(live, sid)
        (line,) = body["lines"]
        assert line["in"] == {"car": 1} and line["out"] == {"person": 1}, line
        # lag bounded: the newest frame each time, so no growth along the pass
        lags = [f["lag_ms"] for f in frames]
        third = len(lags) // 3
        assert statistics.median(lags[-third:]) <= 2 * statistics.median(lags[:third]) + 100, lags

        # the clip ended: the stream reconnects and runs the clip again
        body = wait_state(live, sid, "running")
        assert body["reconnects"] >= 1
        ended = body["reconnects"]
        # the camera's power cut: reconnecting (with the reason), then back once it is
        rtsp_server.stop(camera)
        wait_state(live, sid, "reconnecting")
        camera = rtsp_server.start(clip, camera_port, log)
        body = wait_state(live, sid, "running", timeout=30)
        assert body["reconnects"] > ended
        assert live.metric("ssd_stream_reconnects_total", stream=sid) == body["reconnects"]
        assert live.metric("ssd_stream_running", stream=sid) == 1
        stop(live, sid)
        assert live.metric("ssd_stream_running", stream=sid) == 0  # the series is gone
    finally:
        rtsp_server.stop(camera)


def test_mjpeg_source_latest_frame_and_subscribers(live, sources):
    """MJPEG at 25 fps detected at 4: most frames skipped and counted, never queued. A fast
    subscriber, one that stops reading (a small receive buffer, so the server's writes to it
    block) and one that leaves: the fast one misses nothing, the stream's rate is unchanged
    while the stalled one reads nothing, and every one that left is forgotten."""
    stream = start(live, source=sources.url + "/mjpeg", fps=4)
    sid = stream["id"]
    wait_state(live, sid, "running")

    def processed_over(seconds: float) -> int:
        before = described(live, sid)["frames_processed"]
        time.sleep(seconds)
        return described(live, sid)["frames_processed"] - before

    alone = processed_over(3.0)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", int(live.url.rsplit(":", 1)[1])))
    stalled.sendall(f"GET /v1/streams/{sid}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    fast: list = []

    def listen() -> None:
        with (
            httpx.Client(base_url=live.url, timeout=60) as c,
            c.stream("GET", f"/v1/streams/{sid}/events") as r,
        ):
            for kind, data in sse_events(r):
                fast.append((kind, data))
                if sum(k == "frame" for k, _ in fast) >= 16:
                    return

    leaving = httpx.Client(base_url=live.url, timeout=60)
    gone = leaving.send(leaving.build_request("GET", f"/v1/streams/{sid}/events"), stream=True)
    next(gone.iter_lines())
    listener = threading.Thread(target=listen)
    listener.start()
    gone.close()
    leaving.close()
    crowded = processed_over(3.0)
    listener.join(timeout=60)
    assert described(live, sid)["subscribers"] == 1  # the stalled one
    stalled.close()
    frames = [d for k, d in fast if k == "frame"]
    assert len(frames) >= 16 and not any("missed" in d for _, d in fast), fast[-3:]
    # the newest frame each time, 25 a second sent and 4 detected: most are skipped
    assert statistics.median(f["skipped"] for f in frames[1:]) >= 3, [f["skipped"] for f in frames]
    assert crowded >= 0.7 * alone, (alone, crowded)
    deadline = time.monotonic() + 15
    while described(live, sid)["subscribers"] and time.monotonic() < deadline:
        time.sleep(0.2)
    body = described(live, sid)
    assert body["subscribers"] == 0, body  # every subscriber that left is forgotten
    assert body["frames_skipped"] > body["frames_processed"] > 0, body
    assert 2.0 <= body["processed_fps"] <= 5.0, body
    assert body["width"] == 640 and body["height"] == 360 and body["codec"] == "mjpeg"
    stop(live, sid)


def test_a_slow_subscriber_loses_its_oldest_events_and_is_told():
    asyncio.run(_slow_subscriber())


async def _slow_subscriber() -> None:
    subscriber = Subscriber(size=4)
    for i in range(10):
        subscriber.offer({"event": "frame", "frame": i})
    got = [await subscriber.next(0.01) for _ in range(4)]
    assert [e["frame"] for e in got] == [6, 7, 8, 9]
    assert got[0]["missed"] == 6 and all("missed" not in e for e in got[1:])
    assert await subscriber.next(0.01) is None  # nothing more: a heartbeat's turn
    subscriber.offer({"event": "frame", "frame": 10})
    subscriber.closed = True
    assert (await subscriber.next(0.01))["frame"] == 10  # what came before the end first
    assert await subscriber.next(5) is None  # then at once: closed


@pytest.mark.parametrize(
    "source, code",
    [
        ("file:///etc/passwd", "source_refused"),
        ("ftp://127.0.0.1/clip.mp4", "source_refused"),
        ("http://169.254.169.254/latest/meta-data/", "source_refused"),
        ("http://[::ffff:169.254.169.254]/", "source_refused"),
        ("rtsp://[fd00:ec2::254]/live", "source_refused"),
        ("http://no-such-host.invalid/mjpeg", "source_unresolvable"),
        ("http:///mjpeg", "invalid_source"),
        ("rtsps://127.0.0.1/live", "source_refused"),  # its certificate would not be checked
    ],
)
def test_refused_sources_are_a_clear_client_error(live, source, code):
    with live.client() as c:
        r = c.post("/v1/streams", json={"source": source})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == code, r.text
        assert all(s["source"] != source for s in c.get("/v1/streams").json()["streams"])


@pytest.mark.parametrize(
    "path, state, reason",
    [
        ("/redirect", "failed", "source_redirected"),  # never followed: not checked
        ("/snapshot.jpg", "failed", "unsupported_source"),
        ("/silent", "failed", "no frame for 5 s"),  # accepts, never answers
        ("/garbage", "failed", "no frame for 5 s"),
    ],
)
def test_sources_that_misbehave_end_the_stream_with_the_reason(live, sources, path, state, reason):
    stream = start(live, source=sources.url + path)
    body = wait_state(live, stream["id"], state, timeout=30)
    assert reason in body["reason"], body
    assert body["frames_processed"] == 0
    # its events end with the state; the service still detects
    events = events_until(live, stream["id"], lambda k, d: False, timeout=10)
    assert events[0][1]["state"] == "failed", events
    stop(live, stream["id"])


def test_limits_and_bad_requests(live, sources):
    with live.client() as c:
        for body in (
            {"source": sources.url + "/mjpeg", "fps": 0},
            {"source": sources.url + "/mjpeg", "fps": 1e-300},
            {"source": sources.url + "/mjpeg", "colour": "red"},
            {"source": sources.url + "/mjpeg", "lines": [[1, 2, 3]]},
            {"source": sources.url + "/mjpeg", "lines": [[1, 1, 1, 1]]},
            {"source": sources.url + "/mjpeg", "classes": ["unicorn"]},
            {"source": "x" * 3000},
            {},
        ):
            r = c.post("/v1/streams", json=body)
            assert r.status_code == 422, (body, r.text)
        assert c.get("/v1/streams/nope").status_code == 404
        assert c.delete("/v1/streams/nope").status_code == 404
        ids = [start(live, source=sources.url + "/mjpeg")["id"] for _ in range(3)]
        r = c.post("/v1/streams", json={"source": sources.url + "/mjpeg"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_streams"
        for sid in ids:
            stop(live, sid)
        assert c.get("/v1/streams").json()["streams"] == []


def test_stream_routes_need_the_key(scene_repo, sources):
    settings = Settings(model_repository=scene_repo, model_name="ssd300_onnx", api_key="k3y")
    with run_service(settings) as service, service.client() as c:
        assert c.get("/v1/streams").status_code == 401
        assert c.post("/v1/streams", json={"source": sources.url + "/mjpeg"}).status_code == 401
        r = c.post(
            "/v1/streams", json={"source": sources.url + "/mjpeg"}, headers={"X-API-Key": "k3y"}
        )
        assert r.status_code == 201, r.text


def test_streams_declared_in_a_file_follow_its_changes(scene_repo, sources, tmp_path):
    """SSD_STREAMS_FILE: read at start-up, then every change applied (added, changed, removed);
    a broken file changes nothing and says why; bad entries are skipped with their reason."""
    declared = tmp_path / "streams.yaml"
    mjpeg = sources.url + "/mjpeg"

    def write(text: str) -> None:
        declared.write_text(text)
        stamp = time.time() + write.count  # a new modification time even within a second
        write.count += 1
        os.utime(declared, (stamp, stamp))

    write.count = 1
    write(
        f"streams:\n"
        f"  - {{id: gate, source: '{mjpeg}', fps: 2}}\n"
        f"  - {{id: yard, source: '{mjpeg}', fps: 3, lines: [[0, 180, 640, 180]]}}\n"
        f"  - {{id: meta, source: 'http://169.254.169.254/'}}\n"
        f"  - {{id: odd, source: '{mjpeg}', classes: [unicorn]}}\n"
        f"  - {{id: 'bad id!', source: '{mjpeg}'}}\n"
    )
    settings = Settings(
        model_repository=scene_repo, model_name="ssd300_onnx", streams_file=declared
    )

    def listing(c: httpx.Client) -> tuple[dict, dict]:
        body = c.get("/v1/streams").json()
        return {s["id"]: s for s in body["streams"]}, body["file"]

    def until(c: httpx.Client, ok, timeout: float = 20) -> tuple[dict, dict]:
        deadline = time.monotonic() + timeout
        while True:
            streams, file = listing(c)
            if ok(streams, file) or time.monotonic() > deadline:
                return streams, file
            time.sleep(0.2)

    with run_service(settings) as service, service.client() as c:
        streams, file = until(c, lambda s, f: s.get("gate", {}).get("state") == "running")
        assert set(streams) == {"gate", "yard"}, streams
        assert streams["gate"]["fps"] == 2 and streams["yard"]["fps"] == 3
        assert file["error"] is None and file["entries"] == ["gate", "yard"]
        assert "never connected to" in file["entry_errors"]["meta"]
        assert "unicorn" in file["entry_errors"]["odd"]
        assert "#4" in file["entry_errors"]
        # changed: gate's rate; removed: yard; added: dock
        write(
            f"streams:\n"
            f"  - {{id: gate, source: '{mjpeg}', fps: 4}}\n"
            f"  - {{id: dock, source: '{mjpeg}'}}\n"
        )
        streams, file = until(c, lambda s, f: set(s) == {"gate", "dock"})
        assert set(streams) == {"gate", "dock"} and streams["gate"]["fps"] == 4, streams
        assert file["entry_errors"] == {} and file["error"] is None
        # broken: nothing changes, the reason is told
        write("streams: [unclosed\n")
        streams, file = until(c, lambda s, f: f["error"] is not None)
        assert "not applied" in file["error"] and set(streams) == {"gate", "dock"}, file
        # a stream created through the API is the file's to leave alone
        api_id = start(service, source=mjpeg)["id"]
        write("streams: []\n")
        streams, file = until(c, lambda s, f: "gate" not in s)
        assert set(streams) == {api_id}, streams


def test_a_camera_password_is_sent_and_never_shown(live, sources):
    """MJPEG behind HTTP Basic: the URL's credentials reach the camera, not the listing, the
    events or the worker's command line (which every local user can read)."""
    source = sources.url.replace("http://", "http://admin:s3cret@") + "/private?pwd=s3cret"
    stream = start(live, source=source, fps=2)
    body = wait_state(live, stream["id"], "running")
    assert "s3cret" not in json.dumps(body) and "***@" in body["source"], body["source"]
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            assert "s3cret" not in " ".join(proc.cmdline()), proc.cmdline()
    stop(live, stream["id"])


def test_starts_and_stops_at_random_never_exceed_the_limit(live, sources):
    """Concurrent POSTs and DELETEs (randomized): running streams never exceed SSD_MAX_STREAMS
    (3 here), every 201 is a stream that exists until deleted, and none is left behind."""
    rng = random.Random(7)
    started: list[str] = []
    lock = threading.Lock()
    seen_running: list[int] = []

    def client(seed: int) -> None:
        r = random.Random(seed)
        with live.client() as c:
            for _ in range(6):
                if r.random() < 0.6:
                    resp = c.post("/v1/streams", json={"source": sources.url + "/mjpeg", "fps": 1})
                    assert resp.status_code in (201, 503), resp.text
                    if resp.status_code == 201:
                        with lock:
                            started.append(resp.json()["id"])
                else:
                    with lock:
                        sid = started.pop(r.randrange(len(started))) if started else None
                    if sid is not None:
                        assert c.delete(f"/v1/streams/{sid}").status_code == 204
                listing = c.get("/v1/streams").json()["streams"]
                running = [s for s in listing if s["state"] not in ("failed", "stopped")]
                seen_running.append(len(running))
                time.sleep(r.random() * 0.05)

    threads = [threading.Thread(target=client, args=(rng.random(),)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert max(seen_running) <= 3, seen_running
    with live.client() as c:
        listed = {s["id"] for s in c.get("/v1/streams").json()["streams"]}
        assert listed == set(started), (listed, started)
        for sid in started:
            stop(live, sid)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and [
        p for p in psutil.Process().children(recursive=True) if _is_stream_worker(p)
    ]:
        time.sleep(0.1)
    assert not [p for p in psutil.Process().children(recursive=True) if _is_stream_worker(p)]


def _is_stream_worker(proc: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return "service.streams.worker" in " ".join(proc.cmdline())
    return False


class FaultyBackend(OnnxBackend):
    """Fault injection: ``fault`` set, each inference fails with it."""

    fault: Exception | None = None

    async def infer(self, images, timeout=None, pin=None):
        if self.fault is not None:
            raise self.fault
        return await super().infer(images, timeout, pin)


def test_model_trouble_keeps_the_camera_and_a_fault_of_ours_reconnects(scene_repo, sources):
    """The backend unavailable: frames are lost (said in events), the camera stays connected;
    an unexpected error: the stream reconnects with the reason, never a dead task that still
    says running."""
    backend = FaultyBackend(scene_repo, "ssd300_onnx")
    settings = Settings(model_repository=scene_repo, model_name="ssd300_onnx")
    with run_service(settings, backend=backend) as service:
        sid = start(service, source=sources.url + "/mjpeg", fps=5)["id"]
        wait_state(service, sid, "running")
        backend.fault = BackendUnavailable("injected")
        lost = events_until(service, sid, lambda k, d: k == "frame_lost", timeout=30)
        assert lost[-1][1]["reason"] == "injected"
        body = described(service, sid)
        assert body["state"] == "running" and body["reconnects"] == 0, body
        backend.fault = RuntimeError("injected crash")
        body = wait_state(service, sid, "reconnecting")
        assert "internal error" in body["reason"], body
        backend.fault = None
        before = body["frames_processed"]
        body = wait_state(service, sid, "running")
        deadline = time.monotonic() + 20
        while described(service, sid)["frames_processed"] <= before:
            assert time.monotonic() < deadline, "no frame detected after the fault"
            time.sleep(0.2)
        stop(service, sid)


def test_a_new_version_reaches_a_running_stream_at_a_frame(scene_repo, tmp_path):
    """A version with the same class list: the next frames name it, one event says so, tracks
    go on under their ids. A version with another class list: tracks start again, under ids
    above every one given before. (A camera looking at a still scene: every object stays put,
    so its id is the tracker's to keep.)"""
    still = Sources(scene_jpegs(31)[30:], fps=25)
    repo = tmp_path / "repo"
    shutil.copytree(scene_repo, repo)
    store = ModelStore(repo, "ssd300_onnx")
    settings = Settings(model_repository=repo, model_name="ssd300_onnx", model_poll_s=0.5)
    with run_service(settings) as service:
        sid = start(service, source=still.url + "/mjpeg", fps=5)["id"]
        wait_state(service, sid, "running")
        time.sleep(2)  # tracks confirmed on the first version
        copy_version(store.version(1).path, store, 2)
        events = events_until(
            service, sid, lambda k, d: k == "frame" and d["model_version"] == "2", timeout=60
        )
        changed = [d for k, d in events if k == "model_version_changed"]
        assert changed and changed[-1]["from"] == "1" and changed[-1]["to"] == "2", events[-3:]
        frames = [d for k, d in events if k == "frame"]
        before = {d["track_id"] for d in frames[-2]["detections"]} - {None}
        after = {d["track_id"] for d in frames[-1]["detections"]} - {None}
        assert len(before) == 3 and after == before, (before, after)  # the same ids
        seen = max(i for f in frames for i in {d["track_id"] for d in f["detections"]} - {None})
        write_version(repo, "onnx", seed=3, classes=ClassList((1, 3), ("person", "car")))
        events = events_until(
            service,
            sid,
            lambda k, d: (
                k == "frame"
                and d["model_version"] == "3"
                and any(x["track_id"] is not None for x in d["detections"])
            ),
            timeout=90,
        )
        frames = [d for k, d in events if k == "frame" and d["model_version"] == "3"]
        ids = {d["track_id"] for d in frames[-1]["detections"]} - {None}
        assert ids and all(i > seen for i in ids), (seen, ids)
        stop(service, sid)
    still.close()


def test_zone_entries_and_exits_of_the_scene(live, sources):
    """A zone over the lower left of the scene (x 100..320, y 200..360): each pass of the looping
    clip, the first person walks down into it and vanishes there (an exit once lost), the second
    walks left through it (an entry, then an exit at x 100); the car (x 470) never enters. Per
    track, entries and exits alternate; the stream's tallies are the events'."""
    zone = [[100, 200], [320, 200], [320, 360], [100, 360]]
    sid = start(live, source=sources.url + "/mjpeg", fps=10, zones=[zone])["id"]
    t0 = time.monotonic()
    events = events_until(live, sid, lambda k, d: time.monotonic() - t0 > 10)
    body = described(live, sid)
    stop(live, sid)
    moves = [z for k, d in events if k == "frame" for z in d.get("zones", [])]
    by_track: dict[int, list[str]] = collections.defaultdict(list)
    for z in moves:
        assert z["zone"] == 0 and z["event"] in ("enter", "exit"), z
        by_track[z["track_id"]].append(z["event"])
    for track, seen in by_track.items():  # enter, exit, enter, ...: never twice in a row
        assert seen[::2] == ["enter"] * len(seen[::2]), (track, seen)
        assert seen[1::2] == ["exit"] * len(seen[1::2]), (track, seen)
    entered = [z for z in moves if z["event"] == "enter"]
    assert {z["label"] for z in entered} == {"person"}, entered  # never the car
    assert len(entered) >= 4, moves  # two people a pass, ~3 passes
    assert any(z.get("lost") for z in moves), moves  # the first person, gone inside
    assert any(z["event"] == "exit" and not z.get("lost") for z in moves), moves  # the second
    (tally,) = body["zones"]
    assert tally["zone"] == zone
    assert tally["entered"]["person"] >= len(entered)  # the events we read, and any since
    assert "car" not in tally["entered"] and sum(tally["inside"].values()) <= 2, tally


@pytest.fixture(scope="module")
def media(sources, scene_clip, tmp_path_factory):
    """The scene served over HTTP as an MP4 file (its index at the end: read with byte ranges),
    as HLS (a playlist that ends, three MPEG-TS segments) and as a live HLS playlist (a window
    of three segments moving on each second, never ending); and playlists that lead elsewhere."""
    clip, _ = scene_clip
    segments, playlist = scene_hls(tmp_path_factory.mktemp("hls"))
    sources.files["/clip.mp4"] = (clip.read_bytes(), "video/mp4")
    sources.files["/scene.m3u8"] = (playlist.encode(), "application/vnd.apple.mpegurl")
    for path in segments:
        sources.files["/" + path.name] = (path.read_bytes(), "video/mp2t")
    sources.live_segments = [path.name for path in segments]
    head = "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n"
    evil = {
        "/file.m3u8": head + "file:///etc/passwd\n",
        "/metadata.m3u8": head + "http://169.254.169.254/latest/meta-data/seg.ts\n",
        "/concat.m3u8": head + "concat:/etc/passwd|/etc/hostname\n",
        "/master.m3u8": "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=1,RESOLUTION=640x360\n"
        "http://[fd00:ec2::254]/v.m3u8\n",
        "/encrypted.m3u8": "#EXTM3U\n#EXT-X-TARGETDURATION:1\n"
        '#EXT-X-KEY:METHOD=AES-128,URI="k.bin"\n#EXTINF:1.0,\nscene0.ts\n',
        "/fmp4.m3u8": '#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXT-X-MAP:URI="init.mp4"\n'
        "#EXTINF:1.0,\nscene0.ts\n",
    }
    for path, text in evil.items():
        sources.files[path] = (text.encode(), "application/vnd.apple.mpegurl")
    return sources


@pytest.mark.parametrize("path", ["/clip.mp4", "/scene.m3u8"])
def test_a_video_file_and_hls_over_http_tracked_and_counted(live, media, scene_clip, path):
    """The scene clip as an MP4 file over HTTP and as HLS, each played at its own pace as a live
    source: tracks and line counts as the ground truth says; its end is a reconnection (and it
    plays again)."""
    _, truth = scene_clip
    media.requests.clear()
    sid = start(live, source=media.url + path, fps=10, lines=[list(COUNTING_LINE)])["id"]
    events = events_until(live, sid, lambda k, d: k == "state" and d["state"] == "reconnecting")
    frames = [d for k, d in events if k == "frame"]
    indices = [f["frame"] for f in frames]
    # played at its pace (3 s) and detected at 10 a second: about 30 frames, not all 75 at once
    assert 15 <= len(frames) <= 40 and max(indices) >= 70, indices
    for index, ids in track_ids(frames, truth).items():
        hits = [i for i in ids if i != "miss"]
        assert len(hits) >= 0.6 * len(ids), (index, ids)
    body = described(live, sid)
    (line,) = body["lines"]
    assert line["in"] == {"car": 1} and line["out"] == {"person": 1}, line
    assert body["codec"] == "h264" and body["width"] == 640
    wait_state(live, sid, "running")  # played again
    stop(live, sid)
    if path == "/clip.mp4":  # its index is at its end: read there first, with a byte range
        assert any(r.startswith("bytes=") for p, r in media.requests if p == path), media.requests
    else:
        assert [p for p, _ in media.requests[:4]] == [
            path,
            "/scene0.ts",
            "/scene1.ts",
            "/scene2.ts",
        ]


def test_a_live_hls_playlist_is_followed_from_its_newest_segment(live, media):
    sid = start(live, source=media.url + "/live.m3u8", fps=5)["id"]
    wait_state(live, sid, "running")
    media.requests.clear()
    time.sleep(4)
    body = described(live, sid)
    stop(live, sid)
    assert body["state"] == "running" and body["reconnects"] == 0, body
    assert body["frames_processed"] >= 10, body
    asked = [p for p, _ in media.requests]
    assert asked.count("/live.m3u8") >= 3, asked  # reloaded as segments come
    assert len([p for p in asked if p.endswith(".ts")]) >= 3, asked  # the new segments fetched


@pytest.mark.parametrize(
    "path, reason",
    [
        ("/file.m3u8", "source_refused"),
        ("/concat.m3u8", "source_refused"),  # FFmpeg's concat: protocol, a scheme here
        ("/metadata.m3u8", "source_refused"),
        ("/master.m3u8", "source_refused"),
        ("/encrypted.m3u8", "unsupported_source"),
        ("/fmp4.m3u8", "unsupported_source"),
    ],
)
def test_playlists_never_lead_elsewhere(live, media, path, reason):
    """What a playlist names is checked as the source itself is: a file, FFmpeg's concat of local
    files, the metadata address (as a segment, as a variant in IPv6): the stream fails at once
    with the reason, nothing fetched from there; encrypted and fragmented-MP4 playlists are
    refused as unsupported."""
    media.requests.clear()
    sid = start(live, source=media.url + path)["id"]
    body = wait_state(live, sid, "failed", timeout=20)
    stop(live, sid)
    assert body["reason"].startswith(reason), body
    assert body["reconnects"] == 0 and body["frames_processed"] == 0, body
    assert {p for p, _ in media.requests} == {path}, media.requests  # nothing else was asked
