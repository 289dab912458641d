"""The web page in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil

import pytest

from devtools.images import encode, photo

pytestmark = [pytest.mark.browser, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        if __import__("os").environ.get("CI"):
            pytest.fail("chromium is required in CI (make system-deps installs it)")
        pytest.skip("Debian chromium not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield b
        b.close()


def test_upload_draws_boxes(service, browser, tmp_path):
    path = tmp_path / "street.jpg"
    path.write_bytes(encode(photo(640, 480, seed=2), "JPEG"))
    page = browser.new_page()
    page.goto(service.url + "/")
    page.wait_for_selector("#warning", state="visible")  # random weights are announced
    page.set_input_files("#file", str(path))
    page.wait_for_selector("tr.detection", timeout=30_000)
    boxes = int(page.get_attribute("#canvas", "data-boxes"))
    assert boxes > 0
    assert page.evaluate("document.getElementById('canvas').width") == 640
    # moving the threshold up removes boxes, client-side
    page.fill("#threshold", "1")
    page.dispatch_event("#threshold", "input")
    assert int(page.get_attribute("#canvas", "data-boxes")) < boxes
    page.close()


def test_many_detections_list_the_strongest_and_keep_the_image_in_view(service, browser, tmp_path):
    path = tmp_path / "street.jpg"
    path.write_bytes(encode(photo(640, 480, seed=2), "JPEG"))
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(service.url + "/")
    page.fill("#threshold", "0.05")
    page.dispatch_event("#threshold", "input")
    page.set_input_files("#file", str(path))
    page.wait_for_selector("tr.detection", timeout=30_000)
    drawn = int(page.get_attribute("#canvas", "data-boxes"))
    assert drawn > 20, "the random model gives many candidates at 0.05"
    assert page.locator("tr.detection").count() == 20  # the strongest, in score order
    assert page.inner_text("#more") == f"show all {drawn}"
    assert page.evaluate("document.documentElement.scrollHeight") < 1600
    page.click("#more")
    assert page.locator("tr.detection").count() == drawn
    page.mouse.wheel(0, 3000)  # the list scrolls in its own box; the image stays in view
    box = page.locator("#canvas").bounding_box()
    assert box is not None and box["y"] + box["height"] > 0 and box["y"] < 800
    page.click("#more")
    assert page.locator("tr.detection").count() == 20
    page.close()


def test_error_is_shown(service, browser, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"definitely not an image")
    page = browser.new_page()
    page.goto(service.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "invalid_image" in page.text_content("#error")
    page.close()


def test_own_classes_and_the_random_weights_reason_are_shown(browser, tmp_path):
    """A 3-class model exported as the fallback of a failed download: the page lists the
    model's names and ids, filters by them, and says why the weights are random."""
    from service.settings import Settings
    from ssdcore.labels import ClassList
    from tests.service.conftest import run_service
    from training.export import ExportOptions, export, random_weights

    own = ClassList((40, 7, 12), ("Zebra crossing", "Café table", "señal de tráfico"))
    repo = tmp_path / "repo"
    reason = "the checkpoint 'nvidia' could not be had: cannot download (offline)"
    weights = random_weights("resnet18", own, reason)
    export(repo, ["onnx"], opts=ExportOptions(gpu=False), weights=weights)
    path = tmp_path / "street.jpg"
    path.write_bytes(encode(photo(640, 480, seed=2), "JPEG"))
    with run_service(Settings(model_repository=repo)) as live:
        page = browser.new_page()
        page.goto(live.url + "/")
        page.wait_for_selector("#warning", state="visible")
        page.wait_for_function("document.getElementById('warningReason').textContent.length > 0")
        assert reason in page.text_content("#warningReason")
        listed = page.text_content("#classes")
        assert "3 classes: Zebra crossing (40), Café table (7), señal de tráfico (12)" in listed
        options = page.eval_on_selector_all(
            "#classFilter option", "os => os.map(o => o.textContent)"
        )
        assert options == ["all classes", *own.names]
        page.set_input_files("#file", str(path))
        page.wait_for_selector("tr.detection", timeout=30_000)
        page.fill("#threshold", "0.05")
        page.dispatch_event("#threshold", "input")
        every = int(page.get_attribute("#canvas", "data-boxes"))
        with page.expect_response(lambda r: "classes=7" in r.url):  # filtered by the server
            page.select_option("#classFilter", "7")
        page.wait_for_function(
            "document.getElementById('status').textContent.includes('detection')"
        )
        only = int(page.get_attribute("#canvas", "data-boxes"))
        labels = {
            t.strip()
            for t in page.eval_on_selector_all(
                "tr.detection td:first-child", "tds => tds.map(t => t.textContent)"
            )
        }
        assert 0 < only < every and labels == {"Café table"}
        page.close()
