"""``/v1/camera`` (WebSocket) over real HTTP: the scene's frames sent one at a time as a camera
would, answered with tracks and line counts as the ground truth says; bad frames, the API key,
the session limit."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from devtools.images import encode
from devtools.videos import COUNTING_LINE, TEST_SCENE, background, render
from service.settings import Settings
from tests.service.conftest import LiveService, run_service
from tests.service.video.test_videos_api import track_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def live(scene_repo) -> Iterator[LiveService]:
    settings = Settings(
        model_repository=scene_repo, model_name="ssd300_onnx", max_camera_sessions=2
    )
    with run_service(settings) as service:
        yield service


def ws_url(live: LiveService) -> str:
    return live.url.replace("http://", "ws://") + "/v1/camera"


def test_frames_tracked_and_counted_as_the_scene_says(live, scene_clip):
    _, truth = scene_clip
    bg = background(0)
    every = 2  # a camera read at 12.5 frames/s
    sent = list(range(0, 75, every))
    answers = []
    with connect(ws_url(live)) as ws:
        ws.send(json.dumps({"lines": [list(COUNTING_LINE)]}))
        assert json.loads(ws.recv()) == {"configured": True}
        for f in sent:
            ws.send(encode(render(TEST_SCENE, f, bg), quality=90))
            answers.append(json.loads(ws.recv()))
    assert [a["frame"] for a in answers] == list(range(len(sent)))
    assert {(a["width"], a["height"]) for a in answers} == {(640, 360)}
    frames = [{**a, "frame": f} for a, f in zip(answers, sent)]  # the scene's frame numbers
    for index, ids in track_ids(frames, truth).items():
        hits = [i for i in ids if i != "miss"]
        assert len(hits) >= 0.75 * len(ids), (index, ids)
        tracked = [i for i in hits if i is not None]
        assert len(set(tracked)) <= 3, (index, ids)  # identity kept, an occlusion aside
    counts = answers[-1]["counts"]
    assert counts == [{"in": {"car": 1}, "out": {"person": 1}}], counts
    assert all(a["timings_ms"]["total"] > 0 for a in answers)


def test_a_bad_frame_is_an_error_and_the_session_goes_on(live):
    bg = background(0)
    with connect(ws_url(live)) as ws:
        ws.send(b"not an image")
        assert json.loads(ws.recv())["error"]["code"] == "invalid_image"
        ws.send(b"")
        assert json.loads(ws.recv())["error"]["status"] == 400
        ws.send(json.dumps({"classes": ["unicorn"]}))
        assert json.loads(ws.recv())["error"]["status"] == 422
        ws.send("[1, 2")
        assert json.loads(ws.recv())["error"]["status"] == 422
        for bad in (
            "[" * 5000 + "]" * 5000,  # deeper than the parser goes
            json.dumps({"lines": [[int("9" * 400), 0, 1, 1]]}),  # beyond a float
            json.dumps({"lines": [[0, 0, 1, 1]] * 100_000}),  # a large message, many lines
        ):
            ws.send(bad)
            assert json.loads(ws.recv())["error"]["status"] == 422
        ws.send(encode(render(TEST_SCENE, 30, bg)))
        assert "detections" in json.loads(ws.recv())


def test_the_session_limit(live):
    with connect(ws_url(live)), connect(ws_url(live)), connect(ws_url(live)) as third:
        with pytest.raises(ConnectionClosed) as closed:
            third.recv(timeout=10)
        assert closed.value.rcvd.code == 1013


def test_the_api_key_first_when_no_header_can_be_sent(scene_repo):
    bg = background(0)
    frame = encode(render(TEST_SCENE, 30, bg))
    settings = Settings(
        model_repository=scene_repo, model_name="ssd300_onnx", api_key="k3y", max_camera_sessions=2
    )
    with run_service(settings) as service:
        with connect(ws_url(service)) as ws:
            ws.send(frame)  # no key: closed, nothing detected
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 1008
        with connect(ws_url(service)) as ws:
            ws.send(json.dumps({"api_key": "k3y"}))
            ws.send(frame)
            assert "detections" in json.loads(ws.recv())
        # clients without the key hold no session's place: with every place (2) asked for by
        # them, one with the key still gets in
        with contextlib.ExitStack() as stack:
            idle = [stack.enter_context(connect(ws_url(service))) for _ in range(3)]
            with connect(ws_url(service), additional_headers={"X-API-Key": "k3y"}) as ws:
                ws.send(frame)
                assert "detections" in json.loads(ws.recv())
            for c in idle:
                with pytest.raises(ConnectionClosed) as closed:
                    c.recv(timeout=10)  # closed within the wait for the key
                assert closed.value.rcvd.code == 1008
        with connect(ws_url(service), additional_headers={"X-API-Key": "k3y"}) as ws:
            ws.send(frame)
            assert "detections" in json.loads(ws.recv())
