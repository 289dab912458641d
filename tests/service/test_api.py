"""The HTTP API end to end over real HTTP (uvicorn), embedded ONNX Runtime backend."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket
import time

import httpx
import pytest
from PIL import Image

from devtools.images import encode, photo, with_exif_orientation
from loadtest.processes import free_port
from service.settings import Settings
from tests.service.bad_inputs import BAD_INPUTS
from tests.service.conftest import run_service

JPEG = encode(photo(), "JPEG")
ENGINES = {"onnx": "onnxruntime", "openvino": "openvino"}


@pytest.fixture(scope="module", params=list(ENGINES))
def service(request, model_repo):
    """The API's tests run on both embedded engines (the same exported ONNX file)."""
    settings = Settings(model_repository=model_repo, backend=request.param)
    with run_service(settings) as live:
        yield live


def detect(client: httpx.Client, files=None, params=None, **kw) -> httpx.Response:
    return client.post("/v1/detect", files=files, params=params or {}, **kw)


def assert_error(resp: httpx.Response, status: int | tuple, code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert resp.status_code in statuses, resp.text
    body = resp.json()["error"]
    assert set(body) == {"code", "message", "request_id"}
    if code:
        assert body["code"] == code, body
    return body


def test_detect_multipart(service):
    with service.client() as c:
        r = detect(c, {"image": ("x.jpg", JPEG, "image/jpeg")}, {"score_threshold": 0.2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {
        "name": "ssd300_onnx",
        "version": "1",
        "backend": ENGINES[service.settings.backend],
        "random_weights": True,
    }
    (image,) = body["images"]
    assert (image["width"], image["height"]) == (640, 480)
    dets = image["detections"]
    assert 0 < len(dets) <= 100
    for d in dets:
        assert d["score"] >= 0.2 and 1 <= d["category_id"] <= 90 and d["label"]
        b = d["box"]
        assert 0 <= b["x1"] <= b["x2"] <= 640 and 0 <= b["y1"] <= b["y2"] <= 480
    assert [d["score"] for d in dets] == sorted((d["score"] for d in dets), reverse=True)
    assert set(body["timings_ms"]) == {"decode", "queue", "infer", "postprocess", "total"}
    assert r.headers["x-request-id"] == body["request_id"]


def test_raw_body_and_batch_and_filters(service):
    with service.client() as c:
        raw = c.post("/v1/detect", content=JPEG, headers={"content-type": "image/jpeg"})
        batch = detect(
            c,
            [
                ("images", ("a.jpg", JPEG, "image/jpeg")),
                ("images", ("b.png", encode(photo(seed=1), "PNG"), "image/png")),
            ],
        )
        few = detect(c, {"image": ("x.jpg", JPEG)}, {"max_detections": 3, "score_threshold": 0.05})
        person = detect(
            c, {"image": ("x.jpg", JPEG)}, {"classes": "person,3", "score_threshold": 0.05}
        )
        bad_class = detect(c, {"image": ("x.jpg", JPEG)}, {"classes": "unicorn"})
    assert raw.status_code == 200 and len(raw.json()["images"]) == 1
    multi = multi_json = batch.json()
    assert batch.status_code == 200 and [i["index"] for i in multi["images"]] == [0, 1]
    assert multi_json["images"][0]["detections"] == raw.json()["images"][0]["detections"]
    assert len(few.json()["images"][0]["detections"]) == 3
    labels = {d["category_id"] for d in person.json()["images"][0]["detections"]}
    assert labels and labels <= {1, 3}
    assert_error(bad_class, 422, "invalid_parameter")


def test_sniffed_not_declared(service):
    with service.client() as c:
        r = detect(c, {"image": ("x.png", JPEG, "image/png")})
    assert r.status_code == 200


def test_exif_orientation_over_http(service):
    data = with_exif_orientation(photo(640, 480), 6)
    with service.client() as c:
        image = detect(c, {"image": ("x.jpg", data)}).json()["images"][0]
    assert (image["width"], image["height"]) == (480, 640)
    for d in image["detections"]:
        assert d["box"]["x2"] <= 480 and d["box"]["y2"] <= 640


@pytest.mark.parametrize(
    ("name", "files", "status", "code"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS]
)
def test_bad_inputs_repeated(service, name, files, status, code):
    with service.client() as c:
        for _ in range(3):
            assert_error(detect(c, files), status, code)


def test_too_many_files(service):
    files = [("images", (f"{i}.jpg", b"x")) for i in range(1001)]
    with service.client() as c:
        assert_error(detect(c, files), 400, "too_many_files")


def test_file_names_are_never_used(service):
    with service.client() as c:
        for name in ("../../etc/passwd", "a\x00b.jpg", "n" * 10240):
            assert detect(c, {"image": (name, JPEG, "image/jpeg")}).status_code == 200


def test_bodies_that_are_not_images(service):
    with service.client() as c:
        assert_error(c.post("/v1/detect", json={"image": "x"}), 415, "unsupported_media_type")
        assert_error(
            c.post("/v1/detect", content=b"hello", headers={"content-type": "text/plain"}), 415
        )
        r = c.post(
            "/v1/detect", content=b"--x\r\n\r\n", headers={"content-type": "multipart/form-data"}
        )
        assert_error(r, (400, 415))
        text = detect(c, data={"note": "x" * (2 * 1024 * 1024)}, files={"image": ("a.jpg", JPEG)})
        assert_error(text, (400, 413))


def test_body_cap(service):
    cap = service.settings.max_body_bytes
    with service.client() as c:
        big = detect(c, {"image": ("x.jpg", b"\xff\xd8\xff" + b"0" * (cap + 10))})
        assert_error(big, 413, "payload_too_large")

        def chunks():
            for _ in range(50):
                yield b"\x00" * (1024 * 1024)

        chunked = c.post("/v1/detect", content=chunks(), headers={"content-type": "image/jpeg"})
        assert_error(chunked, 413, "payload_too_large")


def test_lying_content_length(service):
    """Content-Length far larger than the body: refused at once, without waiting for the body."""
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(
            b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 999999999\r\n\r\nabc"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < int(
            reply.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]
        ):  # the head and the body may come in two writes
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    text = reply.decode("latin-1")
    assert text.startswith("HTTP/1.1 413")
    assert json.loads(text.split("\r\n\r\n", 1)[1])["error"]["code"] == "payload_too_large"


def test_huge_header_rejected_and_worker_fine(service):
    with service.client() as c:
        r = c.get("/livez", headers={"x-big": "a" * 65536})
        assert 400 <= r.status_code < 500
    with service.client() as c:
        assert c.get("/livez").status_code == 200


def test_methods_paths_params(service):
    with service.client() as c:
        assert_error(c.get("/v1/detect"), 405)
        assert_error(c.get("/nope"), 404)
        for params in (
            {"score_threshold": 2},
            {"iou_threshold": 0},
            {"max_detections": 0},
            {"max_detections": "many"},
        ):
            assert_error(detect(c, {"image": ("x.jpg", JPEG)}, params), 422, "invalid_parameter")


def test_probes_models_docs(service):
    with service.client() as c:
        assert c.get("/livez").json() == {"status": "ok"}
        assert c.get("/readyz").json() == {"ready": True}
        model = c.get("/v1/models").json()["models"][0]
        assert model["random_weights"] is True and model["candidates_per_image"] == 2000
        engine = model["engine"]
        assert engine["name"] == model["backend"] == ENGINES[service.settings.backend]
        assert engine["version"] and engine["threads"] >= 0
        if engine["name"] == "openvino":
            assert engine["precision"] == "f32" and engine["threads"] >= 1
        assert "/v1/detect" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs").status_code == 200
        assert "SSD300" in c.get("/").text


def test_concurrency_32_parallel_requests_are_batched(service):
    before_calls = service.metric("ssd_batch_size_count")
    before_images = service.metric("ssd_batch_size_sum")
    with service.client() as c, cf.ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: detect(c, {"image": ("x.jpg", JPEG)}), range(32)))
    assert [r.status_code for r in responses] == [200] * 32
    first = responses[0].json()["images"][0]["detections"]
    assert all(r.json()["images"][0]["detections"] == first for r in responses)
    calls = service.metric("ssd_batch_size_count") - before_calls
    images = service.metric("ssd_batch_size_sum") - before_images
    assert images == 32
    assert calls < 32, "requests were not batched"
    assert service.metric("ssd_requests_total", route="/v1/detect", status="200") >= 32


def test_api_key(model_repo):
    settings = Settings(model_repository=model_repo, api_key="s3cret-key")
    with run_service(settings) as live, live.client() as c:
        assert_error(detect(c, {"image": ("x.jpg", JPEG)}), 401, "unauthorized")
        assert_error(detect(c, {"image": ("x.jpg", JPEG)}, headers={"X-API-Key": "wrong"}), 401)
        ok = detect(c, {"image": ("x.jpg", JPEG)}, headers={"X-API-Key": "s3cret-key"})
        assert ok.status_code == 200
        bearer = {"Authorization": "Bearer s3cret-key"}  # what a Prometheus scrape job sends
        assert detect(c, {"image": ("x.jpg", JPEG)}, headers=bearer).status_code == 200
        assert c.get("/livez").status_code == 200  # probes stay open
        assert c.get("/readyz").status_code == 200
        assert_error(c.get("/v1/models"), 401, "unauthorized")
        assert_error(c.get("/metrics"), 401, "unauthorized")
        assert_error(c.get("/metrics", headers={"Authorization": "Bearer wrong"}), 401)
        assert "ssd_requests_total" in c.get("/metrics", headers=bearer).text
        assert c.get("/metrics", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        for page in ("/", "/docs", "/openapi.json"):  # open by default: they hold no data
            assert c.get(page).status_code == 200, page


def test_pages_behind_the_key_and_metrics_on_their_own_port(model_repo):
    scrape_port = free_port()
    settings = Settings(
        model_repository=model_repo, api_key="k3y", open_pages=False, metrics_port=scrape_port
    )
    with run_service(settings) as live, live.client() as c:
        for page in ("/", "/docs", "/openapi.json"):
            assert_error(c.get(page), 401, "unauthorized")
            assert c.get(page, headers={"X-API-Key": "k3y"}).status_code == 200, page
        assert "/v1/detect" in c.get("/openapi.json", headers={"X-API-Key": "k3y"}).json()["paths"]
        assert (
            detect(c, {"image": ("x.jpg", JPEG)}, headers={"X-API-Key": "k3y"}).status_code == 200
        )
        # the service port has no /metrics; the scrape port has it, without the key
        assert_error(c.get("/metrics", headers={"X-API-Key": "k3y"}), 404)
        scraped = httpx.get(f"http://127.0.0.1:{scrape_port}/metrics", timeout=10)
        assert scraped.status_code == 200
        assert 'ssd_requests_total{route="/v1/detect",status="200"} 1.0' in scraped.text
    with pytest.raises(httpx.ConnectError):  # closed with the service
        httpx.get(f"http://127.0.0.1:{scrape_port}/metrics", timeout=5)
    with pytest.raises(ValueError, match="SSD_METRICS_PORT must differ"):
        Settings(port=9000, metrics_port=9000)


def test_an_empty_api_key_means_no_key(model_repo, caplog):
    """``SSD_API_KEY=`` (compose's value for an unset variable) must not invert the check."""
    assert Settings(api_key="").api_key is None and Settings(api_key="  ").api_key is None
    with caplog.at_level("WARNING", logger="service"):
        settings = Settings(model_repository=model_repo, api_key="")
        with run_service(settings) as live, live.client() as c:
            assert detect(c, {"image": ("x.jpg", JPEG)}).status_code == 200
            sent = detect(c, {"image": ("x.jpg", JPEG)}, headers={"X-API-Key": "anything"})
            assert sent.status_code == 200
    assert "the API is open" in caplog.text


def test_a_client_that_goes_away_mid_upload_is_a_499_not_a_500(service, caplog):
    """Raw sockets: half a multipart body, then the connection closes."""
    host, port = service.url.removeprefix("http://").split(":")
    before = service.metric("ssd_requests_total", route="/v1/detect", status="499")
    head = (
        b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        b'Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name="image"; '
        b'filename="x.jpg"\r\n\r\n'
    ) + JPEG[:2000]
    with caplog.at_level("INFO", logger="service"):
        for _ in range(12):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(head)
                time.sleep(0.05)
        deadline = time.monotonic() + 10
        while service.metric("ssd_requests_total", route="/v1/detect", status="499") < before + 12:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert service.metric("ssd_requests_total", route="/v1/detect", status="500") == 0
    assert caplog.text.count("client went away during its upload") >= 12
    assert "Traceback" not in caplog.text


def test_in_flight_limit_gives_503(model_repo):
    settings = Settings(model_repository=model_repo, max_in_flight=1, batch_max_delay_ms=200)
    big = encode(photo(2000, 1500), "PNG")
    with run_service(settings) as live, live.client() as c, cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: detect(c, {"image": ("x.png", big)}), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert_error(rejected, 503, "overloaded")


def test_image_dimension_reported_for_png_pass_through(service):
    arr = photo(300, 300)
    with service.client() as c:
        image = detect(c, {"image": ("x.png", encode(arr, "PNG"))}).json()["images"][0]
    assert (image["width"], image["height"]) == (300, 300)
    Image.fromarray(arr)


def test_dct_scaling_setting_reaches_the_decoder(model_repo):
    """Full decoding and DCT-scaled decoding give (slightly) different pixels for a big JPEG."""
    big = encode(photo(2400, 1800, seed=4), "JPEG", quality=95)
    found = []
    for dct in (True, False):
        settings = Settings(model_repository=model_repo, jpeg_dct_scaling=dct)
        with run_service(settings) as live, live.client() as c:
            body = detect(c, {"image": ("x.jpg", big)}, {"score_threshold": 0.05}).json()
            found.append(body["images"][0]["detections"])
    assert found[0] and found[1]
    assert found[0] != found[1]


def test_model_names_never_come_from_the_request(service):
    """Path tricks and model parameters reach no other route and no other model."""
    with service.client() as c:
        for path in (
            "/v1/models/..%2F..%2Fv2%2Frepository%2Findex",
            "/v1/detect/../../v2",
            "/v1/%2e%2e/v2/health/ready",
            "/v2/repository/index",
        ):
            r = c.get(path)
            assert r.status_code in (404, 405), (path, r.status_code)
        r = detect(c, {"image": ("x.jpg", JPEG)}, {"model": "../../other", "model_name": "x"})
        assert r.status_code == 200 and r.json()["model"]["name"] == "ssd300_onnx"
