"""The web page in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil

import pytest

from tests.service.images import encode, photo

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


def test_error_is_shown(service, browser, tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_bytes(b"definitely not an image")
    page = browser.new_page()
    page.goto(service.url + "/")
    page.set_input_files("#file", str(path))
    page.wait_for_function("document.getElementById('error').textContent.length > 0")
    assert "invalid_image" in page.text_content("#error")
    page.close()
