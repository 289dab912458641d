"""Tiled inference through the real service (uvicorn, the micro-batcher), golden: a backend that
finds saturated red squares in each 300x300 input by their pixels, so the boxes every tile gives
are known and their mapping back to the image can be checked to the pixel."""

from __future__ import annotations

import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from devtools.videos import still_clip
from service.backends import Candidates, ModelInfo, Refresh, VersionsState
from service.settings import Settings
from ssdcore.labels import ClassList
from ssdcore.tiling import grid_plan
from tests.service.conftest import run_service
from tests.service.video.stream_sources import Sources, sse_events

K = 16  # candidates per image


class RedSquares:
    """A backend that answers, for each input, the boxes of its red regions (class 1; score 0.9,
    0.6 where the region touches the input's border: cut, as a model scores a cut object lower)
    and records how many inputs it ran: the model's outputs are then exact and known."""

    def __init__(self) -> None:
        self.info = ModelInfo("red_squares", "1", "test", K, False)
        self.versions = VersionsState(served="1", present=["1"])
        self.inputs = 0

    async def start(self) -> None:
        pass

    def pin(self) -> object:
        return None

    def unpin(self, pin: object) -> None:
        pass

    async def infer(self, images, timeout=None, pin=None) -> Candidates:
        n = len(images)
        self.inputs += n
        boxes = np.zeros((n, K, 4), np.float32)
        scores = np.zeros((n, K), np.float32)
        for i, img in enumerate(images):
            red = (img[..., 0] > 160) & (img[..., 1] < 90) & (img[..., 2] < 90)
            labels, _count = ndimage.label(red)
            for k, found in enumerate(ndimage.find_objects(labels)[:K]):
                ys, xs = found
                boxes[i, k] = [xs.start / 300, ys.start / 300, xs.stop / 300, ys.stop / 300]
                cut = min(xs.start, ys.start) == 0 or max(xs.stop, ys.stop) == 300
                scores[i, k] = 0.6 if cut else 0.9
        return Candidates(boxes, scores, np.ones((n, K), np.int32), "1")

    def info_for(self, version: str) -> ModelInfo:
        return self.info

    async def refresh(self) -> Refresh:
        return Refresh()

    async def ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass


W, H = 1800, 1200
# tiles=3x2 with overlap 0.2: tiles 693 x 667 px; columns start at 0, 554, 1107 (the first ends
# at 693), rows at 0 and 533 (the first ends at 667)
SQUARES = [
    (100, 100, 124, 124),  # small, inside one tile
    (1500, 900, 1530, 930),  # small, inside one tile
    (650, 300, 720, 340),  # crosses the first tile's right border; whole in the second
    (480, 580, 720, 700),  # larger than the overlap, across both borders: no tile sees it whole
]
# larger than a tile: only the whole image sees it whole (its pieces are the tiles')
LARGE = (900, 100, 1700, 800)


def picture(squares=(*SQUARES, LARGE)) -> bytes:
    img = Image.new("RGB", (W, H), (128, 128, 128))
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in squares:
        d.rectangle([x0, y0, x1 - 1, y1 - 1], fill=(230, 20, 20))
    buf = io.BytesIO()
    img.save(buf, format="PNG")  # lossless: the edges where they were drawn
    return buf.getvalue()


@pytest.fixture(scope="module")
def live():
    backend = RedSquares()
    settings = Settings(model_poll_s=0, max_tiles=20, batch_max_queued_images=64)
    with run_service(settings, backend) as service:
        yield service, backend


def detect(url: str, body: bytes, **params) -> httpx.Response:
    return httpx.post(
        url + "/v1/detect",
        params=params,
        content=body,
        headers={"content-type": "image/png"},
        timeout=60,
    )


def boxes_of(image: dict) -> np.ndarray:
    return np.array(
        sorted([d["box"][k] for k in ("x1", "y1", "x2", "y2")] for d in image["detections"])
    )


def test_the_plan_the_test_relies_on():
    plan = grid_plan(W, H, 3, 2, 0.2)
    assert [(t.x0, t.x1) for t in plan.tiles[:3]] == [(0, 693), (554, 1247), (1107, 1800)]
    assert [(t.y0, t.y1) for t in plan.tiles[::3]] == [(0, 667), (533, 1200)]


@pytest.mark.parametrize("whole", [False, True])
def test_tiles_map_every_box_back_to_the_image_and_merge_cut_objects_into_one(live, whole):
    service, backend = live
    before = backend.inputs
    r = detect(service.url, picture(), tiles="3x2", tile_overlap=0.2, tile_whole=whole)
    assert r.status_code == 200, r.text
    body = r.json()
    image = body["images"][0]
    assert image["tiles"] == {
        "grid": [3, 2],
        "count": 6,
        "size": [693, 667],
        "whole_image": whole,
        "model_runs": 6 + whole,
    }
    assert body["model_runs"] == 6 + whole
    assert backend.inputs - before == 6 + whole
    got = boxes_of(image)
    outside = (got[:, 2] <= LARGE[0]) | (got[:, 1] >= LARGE[3])  # the boxes of the squares
    want = np.array(sorted(SQUARES), dtype=float)
    assert got[outside].shape == want.shape, got  # one box per square: cut pieces merged
    # a tile is 693 px shown at 300: a pixel of the input is 2.3 px of the image
    np.testing.assert_allclose(got[outside], want, atol=693 / 300 + 1)
    if whole:  # the large one: one box, the whole image's, its tiles' pieces merged into it
        assert (~outside).sum() == 1, got
        np.testing.assert_allclose(got[~outside][0], LARGE, atol=W / 300 + 1)
    else:  # in pieces, none whole: what the whole image's run is for
        assert (~outside).sum() > 1, got


def test_without_tiles_the_same_request_runs_the_image_once(live):
    service, backend = live
    before = backend.inputs
    r = detect(service.url, picture())
    assert r.status_code == 200
    assert backend.inputs - before == 1
    assert "tiles" not in r.json()["images"][0] and "model_runs" not in r.json()
    # the whole image at 300x300: 6 px of the image per pixel of the input
    got = boxes_of(r.json()["images"][0])
    want = np.array(sorted((*SQUARES, LARGE)), float)
    np.testing.assert_allclose(got, want, atol=W / 300 + 1)


def test_auto_shares_the_request_budget_between_its_images_and_an_image_no_larger_than_a_tile_runs_once(
    live,
):
    service, backend = live
    small = Image.new("RGB", (500, 400), (128, 128, 128))
    ImageDraw.Draw(small).rectangle([10, 10, 49, 49], fill=(230, 20, 20))
    buf = io.BytesIO()
    small.save(buf, format="PNG")
    files = [("images", ("a.png", picture(), "image/png")), ("images", ("b.png", buf.getvalue()))]
    before = backend.inputs
    r = httpx.post(service.url + "/v1/detect", params={"tiles": "auto"}, files=files, timeout=60)
    assert r.status_code == 200, r.text
    big, little = r.json()["images"]
    assert little["tiles"]["count"] == 0 and little["tiles"]["model_runs"] == 1
    assert big["tiles"]["model_runs"] <= 20 // 2  # SSD_MAX_TILES=20 shared by two images
    assert r.json()["model_runs"] == big["tiles"]["model_runs"] + 1
    assert backend.inputs - before == r.json()["model_runs"]
    assert len(big["detections"]) == len(SQUARES) + 1  # the large one found whole
    assert len(little["detections"]) == 1


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"tiles": "5x4"}, "too_many_tiles"),  # 21 runs > SSD_MAX_TILES=20
        ({"tiles": "4x4x4"}, "invalid_parameter"),
        ({"tiles": "0x2"}, "invalid_parameter"),
        ({"tiles": "auto", "tile_size": 8}, "invalid_parameter"),
        ({"tiles": "auto", "tile_overlap": 0.9}, "invalid_parameter"),
    ],
)
def test_bad_tile_requests_get_a_clear_422_before_any_model_run(live, params, code):
    service, backend = live
    before = backend.inputs
    r = detect(service.url, picture(), **params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == code
    assert backend.inputs == before


def test_a_batch_of_images_whose_grids_together_exceed_the_limit_gets_422(live):
    service, backend = live
    files = [("images", (f"{i}.png", picture(), "image/png")) for i in range(3)]
    before = backend.inputs
    r = httpx.post(service.url + "/v1/detect", params={"tiles": "3x2"}, files=files, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_tiles"  # 3 x 7 > 20
    assert backend.inputs == before


class RolloutMidRequest(RedSquares):
    """Fault injection: a server that picks the version itself (Triton) and moves from version 1
    to 2 after its first call, as in a rollout. Version 1 says class 2 ("car") of its list,
    version 2 class 1 ("dog") of its own: a name from one version on the other's boxes shows."""

    V1 = ModelInfo("m", "1", "test", K, False, classes=ClassList((1, 2), ("person", "car")))
    V2 = ModelInfo("m", "2", "test", K, False, classes=ClassList((1, 2), ("dog", "cat")))

    def __init__(self) -> None:
        super().__init__()
        self.info, self.calls = self.V1, 0

    def info_for(self, version: str) -> ModelInfo:
        return self.V1 if version == "1" else self.V2

    async def infer(self, images, timeout=None, pin=None) -> Candidates:
        found = await super().infer(images, timeout, pin)
        self.calls += 1
        version = "1" if self.calls == 1 else "2"
        label = np.full_like(found.classes, 2 if version == "1" else 1)
        return Candidates(found.boxes, found.scores, label, version)


def test_a_frames_tiles_and_an_images_tiles_come_from_one_version_during_a_rollout(tmp_path):
    """Batches of 2 and 7 runs per picture: the first picture's tiles are answered by two
    versions. Its boxes must all be one version's, named from that version's list (a video
    frame used to be merged and named as the first batch's version said)."""
    expected = {"1": {"car"}, "2": {"dog"}}
    settings = Settings(model_poll_s=0, max_tiles=20, batch_max_queued_images=64, batch_max_size=2)
    image = Image.open(io.BytesIO(picture()))
    clip = still_clip(tmp_path / "still.mp4", image, frames=3)
    for route in ("/v1/videos", "/v1/detect"):
        backend = RolloutMidRequest()
        with run_service(settings, backend) as service:
            if route == "/v1/videos":
                files = {"video": ("still.mp4", clip.read_bytes(), "video/mp4")}
            else:
                files = {"image": ("a.png", picture(), "image/png")}
            r = httpx.post(service.url + route, params={"tiles": "3x2"}, files=files, timeout=120)
        assert r.status_code == 200, r.text
        if route == "/v1/videos":
            answers = [json.loads(line) for line in r.text.splitlines()]
            frames = [a for a in answers if "frame" in a]
        else:
            frames = [{**r.json()["images"][0], "model_version": r.json()["model"]["version"]}]
        assert len(frames) == (3 if route == "/v1/videos" else 1)
        assert backend.calls > 4  # 7 runs in batches of 2: at least one frame ran twice
        for frame in frames:
            names = {d["label"] for d in frame["detections"]}
            assert names == expected[frame["model_version"]], (route, frame)


def test_the_tile_budget_fits_the_queue():
    """A whole tiled request must fit the batcher's queue: SSD_MAX_TILES set above it is refused;
    left at its default, a smaller queue lowers it (a queue of 16 was valid before tiles)."""
    assert Settings(batch_max_queued_images=16, max_files=16).tile_budget == 16
    assert Settings().tile_budget == 64
    with pytest.raises(ValueError, match="SSD_MAX_TILES=64"):
        Settings(batch_max_queued_images=16, max_files=16, max_tiles=64)
    assert Settings(batch_max_queued_images=16, max_files=16, max_tiles=8).tile_budget == 8


def _jpeg(png: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _first_frames(url: str, sid: str, n: int) -> list[dict]:
    frames = []
    with (
        httpx.Client(base_url=url, timeout=60) as c,
        c.stream("GET", f"/v1/streams/{sid}/events") as r,
    ):
        for kind, data in sse_events(r):
            if kind == "frame":
                frames.append(data)
                if len(frames) == n:
                    return frames
    return frames


def test_a_streams_frames_are_tiled_as_images_are(live):
    """An MJPEG camera sending the test picture, tiles=3x2 on the stream: each frame's seven
    inputs go to the model (the backend counts them), its boxes come back in the camera's pixels,
    merged across tiles, as for the image; the stream says its tiles. A grid beyond
    SSD_MAX_TILES is refused before anything connects."""
    service, backend = live
    camera = Sources([_jpeg(picture())], fps=10)
    try:
        with httpx.Client(base_url=service.url, timeout=30) as c:
            r = c.post("/v1/streams", json={"source": camera.url + "/mjpeg", "tiles": "5x4"})
            assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_tiles"
            assert camera.clients == 0
            before = backend.inputs
            r = c.post(
                "/v1/streams",
                json={"source": camera.url + "/mjpeg", "fps": 4, "tiles": "3x2",
                      "tile_overlap": 0.2},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            sid = r.json()["id"]
            frames = _first_frames(service.url, sid, 2)
            described = c.get(f"/v1/streams/{sid}").json()
            assert c.delete(f"/v1/streams/{sid}").status_code == 204
        assert described["tiles"] == {
            "grid": [3, 2], "count": 6, "size": [693, 667], "whole_image": True, "model_runs": 7
        }  # fmt: skip
        ran = backend.inputs - before
        assert ran % 7 == 0 and ran >= 14, ran  # whole frames' tiles only
        for frame in frames:
            assert (frame["width"], frame["height"]) == (W, H)
            got = boxes_of(frame)
            outside = (got[:, 2] <= LARGE[0]) | (got[:, 1] >= LARGE[3])
            want = np.array(sorted(SQUARES), dtype=float)
            assert got[outside].shape == want.shape, got  # cut pieces merged: one box each
            np.testing.assert_allclose(got[outside], want, atol=693 / 300 + 3)  # JPEG's edges
            assert (~outside).sum() == 1, got
            np.testing.assert_allclose(got[~outside][0], LARGE, atol=W / 300 + 3)
    finally:
        camera.close()


def test_a_streams_tiles_come_from_one_version_during_a_rollout():
    """The stream's frames during a rollout that moves after the first call: every frame's boxes
    are named from the one version its event names (tiles run again when two answered)."""
    expected = {"1": {"car"}, "2": {"dog"}}
    settings = Settings(model_poll_s=0, max_tiles=20, batch_max_queued_images=64, batch_max_size=2)
    backend = RolloutMidRequest()
    camera = Sources([_jpeg(picture())], fps=10)
    try:
        with run_service(settings, backend) as service:
            r = httpx.post(
                service.url + "/v1/streams",
                json={"source": camera.url + "/mjpeg", "fps": 4, "tiles": "3x2"},
                timeout=30,
            )
            assert r.status_code == 201, r.text
            frames = _first_frames(service.url, r.json()["id"], 3)
    finally:
        camera.close()
    assert len(frames) == 3 and backend.calls > 4
    for frame in frames:
        names = {d["label"] for d in frame["detections"]}
        assert names == expected[frame["model_version"]], frame
