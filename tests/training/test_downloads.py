"""training.downloads against a real HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loadtest.processes import free_port  # bound, then closed: nothing listens there
from tests.file_server import Route, Server, hashed_name
from training.downloads import DownloadError, cache_dir, cached_path, fetch

ALTERNATIVES = ", or pass --backbone-path FILE, or --backbone-weights none"


@pytest.fixture(autouse=True)
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$TORCH_HOME in tmp_path; torch.hub.set_dir (if someone called it) would win, so undo it."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert cache_dir() == home / "hub" / "checkpoints"
    return home


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def weights() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(10)}, buf)
    return buf.getvalue()


def cache_files() -> list[str]:
    """Everything in the cache folder, hidden .part files included."""
    folder = cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_cached_path_is_last_component_without_query() -> None:
    url = "https://example.com/a/b/resnet50-0676ba61.pth?download=1#frag"
    assert cached_path(url) == cache_dir() / "resnet50-0676ba61.pth"
    with pytest.raises(DownloadError, match="names no file"):
        cached_path("https://example.com/")


def test_download_then_cached_without_network(
    server: Server, weights: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    name = hashed_name(weights)
    url = server.serve(name, Route(weights))
    with caplog.at_level(logging.INFO, logger="downloads"):
        path = fetch(url, what="test weights", progress=False)
    assert path == cache_dir() / name.lstrip("/")
    assert path.read_bytes() == weights
    assert server.requests[name] == 1
    assert cache_files() == [path.name]
    messages = [r.getMessage() for r in caplog.records if r.name == "downloads"]
    assert any(m.startswith(f"downloading test weights from {url} to {path}") for m in messages)
    assert any(m.startswith("downloaded test weights") for m in messages)

    server.stop()  # a connection attempt would now be refused
    again = fetch(url, what="test weights", progress=False)
    assert again == path
    assert server.requests[name] == 1
    assert again.read_bytes() == weights


def test_verify_sees_temp_file_and_result_loads(server: Server, weights: bytes) -> None:
    name = hashed_name(weights)
    url = server.serve(name, Route(weights))
    seen: list[Path] = []

    def verify(p: Path) -> None:
        seen.append(p)
        assert p.parent == cache_dir()
        assert p.name.startswith("." + name.lstrip("/")) and p.name.endswith(".part")
        assert not (cache_dir() / name.lstrip("/")).exists()
        torch.load(p, weights_only=True)

    path = fetch(url, what="test weights", verify=verify, progress=False)
    assert len(seen) == 1 and not seen[0].exists()
    state = torch.load(path, weights_only=True)
    assert torch.equal(state["w"], torch.arange(10))


def test_progress_bar_on_stderr(
    server: Server, weights: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    name = hashed_name(weights)
    url = server.serve(name, Route(weights))
    fetch(url, what="test weights", progress=True)
    assert name.lstrip("/") in capsys.readouterr().err


def test_truncated_download_leaves_nothing(server: Server, weights: bytes) -> None:
    name = hashed_name(weights)
    url = server.serve(name, Route(weights, extra_length=1000))
    with pytest.raises(DownloadError, match="truncated") as info:
        fetch(url, what="test weights", alternatives=ALTERNATIVES, progress=False)
    assert f"got {len(weights)} of {len(weights) + 1000} bytes" in str(info.value)
    assert str(cached_path(url)) in str(info.value)
    assert cache_files() == []


def test_stalled_body_is_truncated(server: Server, weights: bytes) -> None:
    name = hashed_name(weights)
    url = server.serve(name, Route(weights, pieces=2, pause=0.6))  # headers, then silence
    with pytest.raises(DownloadError, match="truncated: got 0 of"):
        fetch(url, what="test weights", timeout=0.2, progress=False)
    assert cache_files() == []


def test_corrupted_download_leaves_nothing(server: Server, weights: bytes) -> None:
    name = hashed_name(weights)  # the name promises the hash of `weights` ...
    url = server.serve(name, Route(weights[:-1] + bytes([weights[-1] ^ 1])))  # ... bytes differ
    with pytest.raises(DownloadError, match=r"SHA-256 [0-9a-f]{64} does not start with"):
        fetch(url, what="test weights", progress=False)
    assert cache_files() == []


def test_verify_failure_leaves_nothing(server: Server) -> None:
    url = server.serve("/not-torch.pth", Route(b"this is not a torch file" * 10))
    with pytest.raises(DownloadError, match="not usable") as info:
        fetch(
            url,
            what="test weights",
            verify=lambda p: torch.load(p, weights_only=True),
            progress=False,
        )
    assert str(cached_path(url)) in str(info.value)
    assert cache_files() == []


def test_interrupt_during_verify_removes_temp_file(server: Server, weights: bytes) -> None:
    url = server.serve(hashed_name(weights), Route(weights))

    def interrupt(p: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fetch(url, what="test weights", verify=interrupt, progress=False)
    assert cache_files() == []


def test_http_404(server: Server) -> None:
    url = server.serve("/gone-12345678.pth", Route(b"", status=404))
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        fetch(url, what="test weights", alternatives=ALTERNATIVES, progress=False)
    assert str(cached_path(url)) in str(info.value)
    assert cache_files() == []


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(f"http://127.0.0.1:{free_port()}/x-00000000.pth", id="refused"),
        pytest.param("http://nonexistent.invalid/x-00000000.pth", id="unresolvable"),
    ],
)
def test_offline_message_names_path_and_alternatives(url: str) -> None:
    with pytest.raises(Exception) as info:
        fetch(
            url, what="the backbone weights", alternatives=ALTERNATIVES, timeout=5, progress=False
        )
    assert type(info.value) is DownloadError
    message = str(info.value)
    assert message.startswith(f"cannot download the backbone weights from {url}: ")
    assert f"Place the file at {cache_dir() / 'x-00000000.pth'} " in message
    assert message.endswith(ALTERNATIVES)
    assert "<urlopen error" not in message  # the reason itself, not URLError's repr
    assert cache_files() == []


def test_concurrent_fetches_share_an_intact_file(server: Server, weights: bytes) -> None:
    big = weights + bytes(range(256)) * 8192  # ~2 MiB: several chunks
    name = hashed_name(big)
    url = server.serve(name, Route(big, pieces=4, pause=0.05))
    barrier = threading.Barrier(2)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        barrier.wait()
        try:
            results.append(fetch(url, what="test weights", progress=False))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert results == [cache_dir() / name.lstrip("/")] * 2
    assert results[0].read_bytes() == big
    assert 1 <= server.requests[name] <= 2
    assert cache_files() == [name.lstrip("/")]


def test_unwritable_cache_is_a_download_error(server, weights, torch_home):
    torch_home.mkdir(parents=True)
    (torch_home / "hub").write_text("a file where the cache folder should be")
    url = server.serve(hashed_name(weights), Route(weights))
    with pytest.raises(DownloadError, match="cannot write into the cache folder"):
        fetch(url, what="the weights", progress=False)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/opt/weights/resnet50-0676ba61.pth", "not an http"),
        ("file:///opt/resnet50-0676ba61.pth", "not an http"),
        ("ftp://example.com/resnet50-0676ba61.pth", "not an http"),
        ("https://example.com/weights/", "names no file"),
    ],
)
def test_a_url_that_is_not_http_or_names_no_file_is_a_download_error(url, message) -> None:
    with pytest.raises(DownloadError, match=message):
        fetch(url, what="test weights", progress=False)
    assert cache_files() == []  # not even an empty .part file


def test_a_redirect_to_ftp_is_not_followed(server: Server) -> None:
    url = server.serve("/w-12345678.pth", Route(b"", redirect="ftp://127.0.0.1/w-12345678.pth"))
    with pytest.raises(DownloadError, match="refusing a redirect to a ftp URL"):
        fetch(url, what="test weights", progress=False)
    assert cache_files() == []


def test_a_body_larger_than_the_bound_stops_there(server: Server) -> None:
    """No Content-Length: the bound stops the body as it arrives, not after it is on disk."""
    url = server.serve("/big.pth", Route(b"x" * (3 << 20), length=False, pieces=3))
    with pytest.raises(DownloadError, match="more than 1048576 bytes"):
        fetch(url, what="test weights", progress=False, max_bytes=1 << 20)
    assert cache_files() == []
    url = server.serve("/announced.pth", Route(b"x" * (3 << 20)))
    with pytest.raises(DownloadError, match="announces 3145728 bytes"):
        fetch(url, what="test weights", progress=False, max_bytes=1 << 20)


def test_a_cached_file_is_checked_before_it_is_used(weights: bytes) -> None:
    """A file placed by hand (or another architecture's, under the same URL) is not trusted."""
    url = "http://127.0.0.1:1" + hashed_name(weights)
    path = cached_path(url)
    path.parent.mkdir(parents=True)
    path.write_bytes(weights[:-1] + b"!")  # same name, other bytes
    with pytest.raises(DownloadError, match=r"cached file .* is corrupted"):
        fetch(url, what="test weights", progress=False)
    path.write_bytes(weights)
    assert fetch(url, what="test weights", progress=False) == path

    def other_architecture(file: Path) -> None:
        raise ValueError("not the weights of a torchvision resnet34")

    with pytest.raises(DownloadError, match=r"cached file .* is not usable: not the weights"):
        fetch(url, what="test weights", progress=False, verify=other_architecture)


def test_a_pinned_sha256_checks_a_file_whose_name_has_no_hash(
    server: Server, weights: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NVIDIA's file name carries no hash: ``SSD_NVIDIA_CHECKPOINT_SHA256`` pins the whole digest,
    for the download and for the cached file (placed by hand, or from another URL's bytes)."""
    import hashlib

    from training import pretrained

    url = server.serve("/nvidia_ssdpyt_amp_200703.pt", Route(weights))
    good = hashlib.sha256(weights).hexdigest()
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_URL", url)
    monkeypatch.setattr(pretrained, "_check_detection_checkpoint", lambda path: None)
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_SHA256", "0" * 64)
    with pytest.raises(DownloadError, match=f"SHA-256 {good} is not 0000"):
        pretrained.fetch_nvidia(progress=False)
    assert cache_files() == []  # nothing kept
    monkeypatch.setenv("SSD_NVIDIA_CHECKPOINT_SHA256", good.upper())
    path = pretrained.fetch_nvidia(progress=False)
    assert path.read_bytes() == weights
    path.write_bytes(weights[:-1] + b"!")  # the cached file changed under the same name
    with pytest.raises(DownloadError, match=r"cached file .* is corrupted: SHA-256 .* is not"):
        pretrained.fetch_nvidia(progress=False)
    monkeypatch.delenv("SSD_NVIDIA_CHECKPOINT_SHA256")  # unpinned: only the content check
    assert pretrained.fetch_nvidia(progress=False) == path
