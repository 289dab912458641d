"""The web page with a video in headless Chromium: it plays with the boxes and track ids drawn over
it and shows the counts; the page's layout holds up on a 1280 px screen; the camera mode; the
list of live streams."""

from __future__ import annotations

import httpx
import pytest

from devtools.images import encode, photo
from devtools.videos import COUNTING_LINE, scene_y4m
from tests.service.test_browser import CHROMIUM, browser  # noqa: F401 - the fixture
from tests.service.video.stream_sources import Sources, scene_jpegs

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_a_video_plays_with_its_boxes_and_counts(video_service, scene_clip, browser):  # noqa: F811
    clip, truth = scene_clip
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(video_service.url + "/")
    page.fill("#lines", ",".join(str(v) for v in COUNTING_LINE))
    page.set_input_files("#file", str(clip))
    page.wait_for_selector('#videoInfo[data-done="1"]', timeout=90_000)
    info = page.inner_text("#videoInfo")
    assert '"car":1' in info and '"person":1' in info, info
    assert "75 of 75 frames" in info, info
    # at 1.0 s (frame 25) the overlay shows the frame's objects, scaled to the player's size
    page.evaluate("document.getElementById('player').pause()")
    page.evaluate("document.getElementById('player').currentTime = 1.0")
    page.wait_for_function(
        "document.getElementById('overlay').dataset.frame === '25'", timeout=20_000
    )
    assert int(page.get_attribute("#overlay", "data-boxes")) == len(truth[25])
    shown = page.evaluate(
        "[document.getElementById('player').clientWidth, document.getElementById('overlay').width]"
    )
    assert shown[0] > 640 and shown[0] == shown[1], shown  # as wide as its column, overlay too
    labels = page.eval_on_selector_all(
        "tr.detection td:first-child", "e => e.map(x => x.textContent)"
    )
    assert all("#" in label for label in labels), labels  # track ids listed
    page.close()


def test_a_small_image_fills_its_column_and_long_names_stay_in_view(service, browser, tmp_path):  # noqa: F811
    path = tmp_path / "small.jpg"
    path.write_bytes(encode(photo(400, 300, seed=3)))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(service.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("tr.detection", timeout=30_000)
    width = page.evaluate("document.getElementById('canvas').getBoundingClientRect().width")
    assert width > 700, f"a 400 px image drawn {width:.0f} px wide on a 1280 px page"
    # a very long class name: the table stays within the page, the box column on one line
    page.evaluate("document.querySelector('tr.detection td').textContent = 'x'.repeat(300)")
    right = page.evaluate("document.querySelector('.list table').getBoundingClientRect().right")
    assert right <= 1280, right
    box_cell = page.query_selector("tr.detection td:nth-child(3)")
    height = box_cell.evaluate("e => e.getBoundingClientRect().height")
    row_height = page.evaluate(
        "document.querySelector('tr.detection td:nth-child(2)').getBoundingClientRect().height"
    )
    assert height <= row_height + 1, "the box column wraps"
    page.close()


def test_the_camera_mode_draws_live_boxes_with_track_ids(video_service, browser, tmp_path):  # noqa: F811
    """The page's camera mode in Chromium with a fake camera playing the scene: frames go over
    the WebSocket one at a time, the boxes come back with track ids, drawn over the live
    picture, and the frame rate achieved is shown."""
    y4m = scene_y4m(tmp_path / "scene.y4m")
    # a browser of its own (a fake camera), from the module's Playwright (one per process)
    camera_browser = browser.browser_type.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={y4m}",
        ],
    )
    try:
        page = camera_browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(video_service.url + "/")  # a secure context: getUserMedia needs one
        page.click("#cameraButton")
        page.wait_for_function(
            "Number(document.getElementById('videoInfo').dataset.frames || 0) >= 12",
            timeout=90_000,
        )
        fps = float(page.get_attribute("#videoInfo", "data-fps"))
        print(f"camera mode: {fps:.2f} frames/s detected")
        assert fps > 0
        assert "frames/s detected" in page.inner_text("#videoInfo")
        page.wait_for_function(
            "Number(document.getElementById('overlay').dataset.boxes || 0) >= 1", timeout=30_000
        )
        labels = page.eval_on_selector_all(
            "tr.detection td:first-child", "e => e.map(x => x.textContent)"
        )
        assert labels and any("#" in label for label in labels), labels  # track ids
        assert page.inner_text("#error") == ""
        page.click("#cameraButton")  # stop: the camera and the session end
        page.wait_for_function("document.getElementById('cameraButton').textContent === 'Camera'")
    finally:
        camera_browser.close()


def test_the_page_lists_adds_and_stops_streams(video_service, browser):  # noqa: F811
    """The page's stream list: a stream added from its form runs (rates and lag shown, refreshed);
    a stream named with markup shows the markup as text; Stop stops it and it leaves the list."""
    sources = Sources(scene_jpegs(25), fps=25)
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    try:
        named = httpx.post(
            video_service.url + "/v1/streams",
            json={"source": sources.url + "/mjpeg", "fps": 2, "name": "<b id=injected>x</b>"},
            timeout=30,
        )
        assert named.status_code == 201, named.text
        page.goto(video_service.url + "/")
        page.fill("#streamSource", sources.url + "/mjpeg")
        page.fill("#streamFps", "4")
        page.click("#streamForm button[type=submit]")
        page.wait_for_function(
            "document.getElementById('streams').dataset.count === '2' && [...document.querySelectorAll("
            "'tr.stream')].every(r => r.dataset.state === 'running' && +r.dataset.processed >= 3)",
            timeout=60_000,
        )
        assert page.query_selector("#injected") is None  # text, never markup
        first = page.inner_text(f'tr.stream[data-id="{named.json()["id"]}"] td')
        assert "<b id=injected>x</b>" in first, first
        assert "ms" in page.inner_text("tr.stream td:nth-child(4)")  # the lag
        row = page.query_selector(f'tr.stream:not([data-id="{named.json()["id"]}"])')
        ours = row.get_attribute("data-id")
        row.query_selector("button.stopStream").click()
        page.wait_for_function(  # stopped and gone from the list; the other one still runs
            f"!document.querySelector('tr.stream[data-id=\"{ours}\"]') && "
            "document.getElementById('streams').dataset.count === '1'",
            timeout=20_000,
        )
    finally:
        page.close()
        for s in httpx.get(video_service.url + "/v1/streams", timeout=30).json()["streams"]:
            httpx.delete(f"{video_service.url}/v1/streams/{s['id']}", timeout=30)
        sources.close()
