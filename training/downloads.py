"""Downloads of weight files into torch's hub cache: one module owns downloads (urllib only here).

A file is streamed into a private temporary file next to its final place, checked (complete,
the SHA-256 prefix torch.hub encodes in names like ``resnet50-0676ba61.pth``, and an optional
``verify`` callback) and only then renamed into place, so the cache never holds a truncated or
corrupted file. A cached file is used without any network. Every failure is a
:class:`DownloadError` whose message tells the user where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import posixpath
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch.hub
from tqdm import tqdm

log = logging.getLogger("downloads")

CHUNK = 1 << 20
USER_AGENT = "ssd300-downloads/1.0 (+urllib)"
_MIN_HASH_PREFIX = 8
# no weight file of this project is near this size (ResNet-152 is 240 MB); a server sending more
# is not sending weights, and the disk is not filled first and the file refused afterwards
MAX_DOWNLOAD_BYTES = 1 << 30
SCHEMES = ("http", "https")


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would follow one to ftp:// too)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in SCHEMES:
            raise urllib.error.URLError(f"refusing a redirect to a {scheme or 'schemeless'} URL")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


class DownloadError(RuntimeError):
    """A file could not be downloaded; ``str(exc)`` is a complete message for the user.

    No traceback is needed: the message says what failed, why, and where to place the file.
    """


def cache_dir() -> Path:
    """torch's hub cache for weights: ``Path(torch.hub.get_dir()) / "checkpoints"``.

    Honours ``$TORCH_HOME`` (and ``torch.hub.set_dir``); the same place torchvision's weights API
    uses, so files downloaded by either are shared.
    """
    return Path(torch.hub.get_dir()) / "checkpoints"


def cached_path(url: str) -> Path:
    """Where the file of ``url`` lives in :func:`cache_dir`: the URL's last path component.
    DownloadError for anything but an http(s) URL that ends in a file name."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in SCHEMES or not parts.netloc:
        raise DownloadError(f"{url!r} is not an http(s) URL (a local file goes in the cache "
                            f"folder {cache_dir()}, or pass its path)")  # fmt: skip
    name = posixpath.basename(parts.path)
    if name in ("", ".", ".."):
        raise DownloadError(f"the URL {url!r} names no file (it must end in the file's name)")
    return cache_dir() / name


def _hash_prefix(name: str) -> str | None:
    """The SHA-256 prefix encoded in a torch.hub style name ``name-<hex>.ext``, if any."""
    match = torch.hub.HASH_REGEX.search(name)
    if match is None or len(match.group(1)) < _MIN_HASH_PREFIX:
        return None
    return match.group(1)


def _message(what: str, url: str, reason: str, path: Path, alternatives: str) -> str:
    return (
        f"cannot download {what} from {url}: {reason.rstrip('.')}.\n"
        f"Place the file at {path} (it is then used without any network){alternatives}"
    )


def _content_length(response: http.client.HTTPResponse) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def fetch(
    url: str,
    *,
    what: str,
    verify: Callable[[Path], None] | None = None,
    alternatives: str = "",
    progress: bool = True,
    timeout: float = 30.0,
    max_bytes: int = MAX_DOWNLOAD_BYTES,
    sha256: str | None = None,
) -> Path:
    """Return the cached file of ``url``, downloading it first if it is not cached.

    ``what`` names the file for messages ("the ResNet-50 backbone weights"); ``verify`` is called
    with the downloaded temporary file and raises if it is unusable; ``alternatives`` is appended
    to failure messages (e.g. ``", or pass --backbone-path FILE"``). A file already in the cache
    (downloaded before, or placed there by hand) gets the same checks before it is used. At most
    ``max_bytes`` are received. ``sha256``, where the file's name carries no hash prefix, pins
    its full SHA-256 (downloaded and cached alike). Raises :class:`DownloadError`.
    """
    path = cached_path(url)

    def fail(reason: str) -> DownloadError:
        return DownloadError(_message(what, url, reason, path, alternatives))

    if path.is_file():
        check_file(path, verify, fail, cached=True, expected_sha256=sha256)
        return path

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as exc:
        raise fail(f"cannot write into the cache folder {path.parent}: {exc}") from None
    log.info("downloading %s from %s to %s", what, url, path)
    start = time.monotonic()
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = _OPENER.open(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise fail(f"HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                raise fail(str(exc.reason)) from None
            except (OSError, http.client.HTTPException) as exc:
                raise fail(str(exc) or type(exc).__name__) from None
            with response:
                total = _content_length(response)
                if total is not None and total > max_bytes:
                    raise fail(f"the server announces {total} bytes, more than {max_bytes}")
                digest = hashlib.sha256()
                received = 0
                with tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=path.name,
                    file=sys.stderr,
                    disable=not progress,
                ) as bar:
                    while True:
                        try:
                            chunk = response.read(CHUNK)
                        except (http.client.IncompleteRead, OSError) as exc:
                            expected = f" of {total}" if total is not None else ""
                            raise fail(
                                f"truncated: got {received}{expected} bytes "
                                f"({type(exc).__name__}: {exc})"
                            ) from None
                        if not chunk:
                            break
                        if received + len(chunk) > max_bytes:
                            raise fail(f"more than {max_bytes} bytes: not a weights file")
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        if total is not None and received != total:
            raise fail(f"truncated: got {received} of {total} bytes")
        check_file(
            tmp,
            verify,
            fail,
            cached=False,
            sha256=digest.hexdigest(),
            name=path.name,
            expected_sha256=sha256,
        )
        os.replace(tmp, path)
    except OSError as exc:  # the local disk (full, read-only); network errors are handled above
        tmp.unlink(missing_ok=True)
        raise fail(f"cannot write {path}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info(
        "downloaded %s: %d bytes in %.1f s, SHA-256 %s",
        what,
        received,
        time.monotonic() - start,
        digest.hexdigest(),
    )
    return path


def check_file(
    path: Path,
    verify: Callable[[Path], None] | None,
    fail: Callable[[str], DownloadError],
    cached: bool,
    sha256: str | None = None,
    name: str | None = None,
    expected_sha256: str | None = None,
) -> None:
    """The SHA-256 prefix of a torch.hub style name (or the whole ``expected_sha256``), then
    ``verify``; ``fail(reason)`` if not."""
    which = f"the cached file {path}" if cached else "the downloaded file"
    prefix = expected_sha256.strip().lower() if expected_sha256 else _hash_prefix(name or path.name)
    if prefix is not None:
        if sha256 is None:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(CHUNK):
                    digest.update(block)
            sha256 = digest.hexdigest()
        if not sha256.startswith(prefix):
            wanted = f"is not {prefix}" if expected_sha256 else f"does not start with {prefix}"
            raise fail(f"{which} is corrupted: SHA-256 {sha256} {wanted}"
                       + (" (delete it to download it again)" if cached else ""))  # fmt: skip
    if verify is not None:
        try:
            verify(path)
        except Exception as exc:
            reason = str(exc) or type(exc).__name__
            hint = " (delete it, or put the right file there)" if cached else ""
            raise fail(f"{which} is not usable: {reason}{hint}") from None
