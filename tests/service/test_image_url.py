"""``{"image_url": ...}`` on ``POST /v1/detect`` against real HTTP servers on 127.0.0.1: the
image fetched and detected as an upload of the same bytes; refused schemes and addresses (the
metadata address, written as IPv6 too, a name resolving to it, a redirect to it, an address
outside SSD_STREAM_SOURCES) get 403 with nothing connected; size, time and redirect limits."""

from __future__ import annotations

import contextlib
import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from devtools.images import encode, photo
from service.addresses import LOOKUP_THREADS
from service.settings import Settings
from tests.service.conftest import run_service

JPEG = encode(photo(320, 240, seed=3), "JPEG")
BIG = 64 * 1024  # the body limit of these services


class Origin:
    """A real HTTP server on 127.0.0.1 whose paths say what it answers; counts its requests."""

    def __init__(self) -> None:
        origin = self
        self.requests: list[str] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                origin.requests.append(self.path)
                path = self.path
                if path == "/photo.jpg":
                    self._send(200, JPEG, "image/jpeg")
                elif path.startswith("/hop/"):  # /hop/N: N more redirects, then the photo
                    left = int(path.rsplit("/", 1)[1])
                    where = "/photo.jpg" if left == 0 else f"/hop/{left - 1}"
                    self._redirect(where)
                elif path == "/to-metadata":
                    self._redirect("http://169.254.169.254/latest/meta-data/")
                elif path == "/to-file":
                    self._redirect("file:///etc/passwd")
                elif path == "/big":
                    self._send(200, b"\xff" * (BIG + 1), "image/jpeg")
                elif path == "/big-chunked":  # no Content-Length: cut as it arrives
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Connection", "close")
                    self.end_headers()
                    for _ in range(BIG // 1024 + 4):
                        self.wfile.write(b"\xff" * 1024)
                elif path == "/garbage":
                    self._send(200, b"this is not an image at all" * 10, "image/jpeg")
                else:
                    self._send(404, b"no", "text/plain")

            def _send(self, status: int, body: bytes, ctype: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _redirect(self, where: str) -> None:
                self.send_response(302)
                self.send_header("Location", where)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[tuple[int, list]]:
    """Accepts connections and never sends a byte; yields (port, accepted connections)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(sock.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], accepted
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        sock.close()


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.close()


def settings_for(model_repo, **overrides) -> Settings:
    return Settings(
        model_repository=model_repo,
        model_name="ssd300_onnx",
        max_body_bytes=BIG,
        image_url_timeout_s=2.0,
        **overrides,
    )


@pytest.fixture(scope="module")
def open_service(model_repo) -> Iterator:
    """SSD_STREAM_SOURCES unset: any address but the always-refused ones."""
    with run_service(settings_for(model_repo)) as live:
        yield live


def detect_url(live, url: str, **params) -> httpx.Response:
    return httpx.post(
        live.url + "/v1/detect",
        json={"image_url": url},
        params={"score_threshold": 0.01, **params},
        timeout=30,
    )


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_the_fetched_image_is_detected_as_its_upload(open_service, origin):
    fetched = detect_url(open_service, origin.url("/photo.jpg"))
    assert fetched.status_code == 200, fetched.text
    uploaded = httpx.post(
        open_service.url + "/v1/detect",
        content=JPEG,
        headers={"content-type": "image/jpeg"},
        params={"score_threshold": 0.01},
        timeout=30,
    )
    assert uploaded.status_code == 200
    mine, theirs = fetched.json()["images"][0], uploaded.json()["images"][0]
    assert mine["detections"] and mine["detections"] == theirs["detections"]
    assert (mine["width"], mine["height"]) == (320, 240)
    # a host name resolves and is connected to at a checked address, Host kept
    by_name = detect_url(open_service, origin.url("/photo.jpg", host="localhost"))
    assert by_name.status_code == 200, by_name.text


def test_redirects_are_followed_within_the_limit(open_service, origin):
    assert detect_url(open_service, origin.url("/hop/4")).status_code == 200  # 5 redirects
    r = detect_url(open_service, origin.url("/hop/5"))
    assert r.status_code == 422 and "more than 5" in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "gopher://127.0.0.1:70/",
        "ftp://127.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::1]/",
        "http://0.0.0.0:80/",
        "http://224.0.0.1/",
    ],
)
def test_refused_schemes_and_addresses(open_service, url):
    t0 = time.monotonic()
    r = detect_url(open_service, url)
    assert r.status_code == 403 and error_code(r) == "address_refused", r.text
    assert time.monotonic() - t0 < 1.5  # refused before any connection (it would time out)


def test_a_redirect_to_a_refused_address_is_not_followed(open_service, origin):
    before = len(origin.requests)
    for path in ("/to-metadata", "/to-file"):
        t0 = time.monotonic()
        r = detect_url(open_service, origin.url(path))
        assert r.status_code == 403 and error_code(r) == "address_refused", r.text
        assert time.monotonic() - t0 < 1.5
    assert origin.requests[before:] == ["/to-metadata", "/to-file"]


def test_a_name_that_resolves_to_the_metadata_address_is_refused(open_service, monkeypatch):
    """A DNS answer pointing a name at the metadata service (rebinding, or a hostile zone)."""
    real = socket.getaddrinfo

    def answer(host, port, *args, **kwargs):
        if host == "camera.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    t0 = time.monotonic()
    r = detect_url(open_service, "http://camera.example/snapshot.jpg")
    assert r.status_code == 403 and "never connected" in r.json()["error"]["message"], r.text
    assert "169.254" not in r.text  # where a name points is not told (internal DNS)
    assert time.monotonic() - t0 < 1.5


def test_the_connection_goes_to_the_address_that_was_checked(open_service, origin, monkeypatch):
    """DNS rebinding: the name answers 127.0.0.1 to the check and the metadata address after;
    the fetch connects to the checked address (one lookup), never to the second answer."""
    real, lookups = socket.getaddrinfo, []

    def answer(host, port, *args, **kwargs):
        if host == "rebind.example":
            lookups.append(host)
            address = "127.0.0.1" if len(lookups) == 1 else "169.254.169.254"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    r = detect_url(open_service, origin.url("/photo.jpg", host="rebind.example"))
    assert r.status_code == 200, r.text
    assert lookups == ["rebind.example"]


def test_urls_with_control_characters_and_other_scripts(open_service, origin):
    for url in (origin.url("/a\u0001b"), origin.url("/x?\u007f"), origin.url("/a b")):
        r = detect_url(open_service, url)
        assert r.status_code == 422 and error_code(r) == "invalid_image_url", (url, r.text)
    # fullwidth digits are digits (NFKC); a name in another script is looked up as its A-label
    assert (
        detect_url(
            open_service, origin.url("/photo.jpg", host="\uff11\uff12\uff17.0.0.1")
        ).status_code
        == 200
    )
    r = detect_url(open_service, "http://b\u00fccher.invalid/x.jpg")
    assert r.status_code == 422 and "xn--bcher-kva.invalid" in r.text, r.text


def test_slow_lookups_refuse_rather_than_queue(open_service, origin, monkeypatch):
    """Names whose servers do not answer hold the lookup threads (a lookup cannot be
    cancelled): a further lookup gets 503 at once; an address literal needs none."""
    real = socket.getaddrinfo

    def answer(host, port, *args, **kwargs):
        if host.endswith(".slow.example"):
            time.sleep(3)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", answer)
    slow = [
        threading.Thread(target=detect_url, args=(open_service, f"http://a{i}.slow.example/"))
        for i in range(LOOKUP_THREADS)
    ]
    for t in slow:
        t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    r = detect_url(open_service, origin.url("/photo.jpg", host="localhost"))
    assert r.status_code == 503 and time.monotonic() - t0 < 1.0, r.text
    assert detect_url(open_service, origin.url("/photo.jpg")).status_code == 200
    for t in slow:
        t.join()
    time.sleep(1.5)  # the lookups have ended
    assert detect_url(open_service, origin.url("/photo.jpg", host="localhost")).status_code == 200


def test_the_allow_list_when_set(model_repo, origin):
    before = len(origin.requests)
    with run_service(settings_for(model_repo, stream_sources=["10.0.0.0/8"])) as live:
        for host in ("127.0.0.1", "localhost"):
            r = detect_url(live, origin.url("/photo.jpg", host=host))
            assert r.status_code == 403 and "SSD_STREAM_SOURCES" in r.text, r.text
    assert len(origin.requests) == before  # nothing connected
    with run_service(settings_for(model_repo, stream_sources=["127.0.0.0/8"])) as live:
        assert detect_url(live, origin.url("/photo.jpg")).status_code == 200
        r = detect_url(live, "http://169.254.169.254/")  # never, even where listed networks
        assert r.status_code == 403
    with run_service(settings_for(model_repo, stream_sources=["localhost"])) as live:
        assert detect_url(live, origin.url("/photo.jpg", host="localhost")).status_code == 200
        assert detect_url(live, origin.url("/photo.jpg")).status_code == 403  # not by address
    with pytest.raises(ValueError, match="SSD_STREAM_SOURCES"):
        Settings(stream_sources=["10.0.0.0/8", "not a/host"])


def test_limits_of_an_upload(open_service, origin):
    for path in ("/big", "/big-chunked"):
        r = detect_url(open_service, origin.url(path))
        assert r.status_code == 413 and error_code(r) == "payload_too_large", (path, r.text)
    r = detect_url(open_service, origin.url("/garbage"))
    assert r.status_code == 400, r.text
    r = detect_url(open_service, origin.url("/missing"))
    assert r.status_code == 422 and "404" in r.json()["error"]["message"], r.text
    with silent_server() as (port, accepted):
        t0 = time.monotonic()
        r = detect_url(open_service, f"http://127.0.0.1:{port}/never")
        took = time.monotonic() - t0
        assert r.status_code == 422 and error_code(r) == "image_url_unreachable", r.text
        assert 1.9 < took < 5 and accepted  # connected, then the 2 s deadline
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    r = detect_url(open_service, f"http://127.0.0.1:{port}/")
    assert r.status_code == 422 and error_code(r) == "image_url_unreachable", r.text
    r = detect_url(open_service, "http://name.invalid/x.jpg")
    assert r.status_code == 422 and error_code(r) == "image_url_unreachable", r.text


def test_bad_json_bodies(open_service):
    post = lambda body: httpx.post(  # noqa: E731
        open_service.url + "/v1/detect",
        content=body,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert post(b"{not json").status_code == 400
    for body in (b"{}", b"[]", b'{"image": "x"}'):  # JSON, not an image_url: as any other
        r = post(body)
        assert r.status_code == 415 and error_code(r) == "unsupported_media_type", (body, r.text)
    for body in (b'{"image_url": 3}', b'{"image_url": ""}', b'{"image_url": null}'):
        r = post(body)
        assert r.status_code == 422 and error_code(r) == "invalid_image_url", (body, r.text)
    r = post(b'{"image_url": "http://[::1"}')
    assert r.status_code == 422, r.text
    assert post(b'{"image_url": "' + b"a" * 20_000 + b'"}').status_code == 413


def test_fetches_beyond_the_limit_get_503(model_repo):
    with (
        run_service(settings_for(model_repo, max_url_fetches=1)) as live,
        silent_server() as (port, accepted),
    ):
        first = threading.Thread(
            target=detect_url, args=(live, f"http://127.0.0.1:{port}/slow"), daemon=True
        )
        first.start()
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        r = detect_url(live, f"http://127.0.0.1:{port}/second")
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        first.join()


def test_a_client_that_leaves_frees_its_fetch(model_repo, origin):
    with (
        run_service(settings_for(model_repo, max_url_fetches=1)) as live,
        silent_server() as (port, accepted),
    ):
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(
                live.url + "/v1/detect",
                json={"image_url": f"http://127.0.0.1:{port}/never"},
                timeout=0.5,
            )
        assert accepted
        time.sleep(0.3)  # the fetch is cancelled with its request, long before its deadline
        assert detect_url(live, origin.url("/photo.jpg")).status_code == 200
        assert live.metric("ssd_rejected_total", reason="client_disconnected") >= 1


def test_https_names_the_host_to_tls_and_checks_its_certificate(model_repo, tmp_path):
    ca_file, cert_file, key_file = make_certificates(tmp_path, "localhost")
    seen = {"sni": [], "host": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            seen["host"].append(self.headers.get("Host"))
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(JPEG)))
            self.end_headers()
            self.wfile.write(JPEG)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    context.sni_callback = lambda sock, name, ctx: seen["sni"].append(name)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with run_service(settings_for(model_repo, image_url_ca_file=ca_file)) as live:
            r = detect_url(live, f"https://localhost:{port}/photo.jpg")
            assert r.status_code == 200, r.text
            assert seen == {"sni": ["localhost"], "host": [f"localhost:{port}"]}
            r = detect_url(live, f"https://127.0.0.1:{port}/photo.jpg")  # not the cert's name
            assert r.status_code == 422 and "CERTIFICATE_VERIFY_FAILED" in r.text, r.text
        with run_service(settings_for(model_repo)) as live:  # the public bundle: not trusted
            r = detect_url(live, f"https://localhost:{port}/photo.jpg")
            assert r.status_code == 422 and "CERTIFICATE_VERIFY_FAILED" in r.text, r.text
    finally:
        server.shutdown()
        server.server_close()


def make_certificates(folder, name: str):
    """A throwaway CA and a certificate for ``name`` it signed: (ca.pem, leaf.pem, leaf.key)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def sign(subject, key, issuer, issuer_key, ca, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = sign("test CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = sign(name, key, ca_name, ca_key, False, name)
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (folder / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "ca.pem", folder / "leaf.pem", folder / "leaf.key"
