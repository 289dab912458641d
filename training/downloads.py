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
    """Where the file of ``url`` lives in :func:`cache_dir`: the URL's last path component."""
    name = posixpath.basename(urllib.parse.urlsplit(url).path)
    if name in ("", ".", ".."):
        raise ValueError(f"URL has no file name: {url!r}")
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
) -> Path:
    """Return the cached file of ``url``, downloading it first if it is not cached.

    ``what`` names the file for messages ("the ResNet-50 backbone weights"); ``verify`` is called
    with the downloaded temporary file and raises if it is unusable; ``alternatives`` is appended
    to failure messages (e.g. ``", or pass --backbone-path FILE"``). Raises :class:`DownloadError`.
    """
    path = cached_path(url)
    if path.is_file():
        return path

    def fail(reason: str) -> DownloadError:
        return DownloadError(_message(what, url, reason, path, alternatives))

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
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as exc:
                exc.close()
                raise fail(f"HTTP {exc.code} {exc.reason}") from None
            except urllib.error.URLError as exc:
                raise fail(str(exc.reason)) from None
            except (OSError, http.client.HTTPException) as exc:
                raise fail(str(exc) or type(exc).__name__) from None
            with response:
                total = _content_length(response)
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
                        out.write(chunk)
                        digest.update(chunk)
                        received += len(chunk)
                        bar.update(len(chunk))
        if total is not None and received != total:
            raise fail(f"truncated: got {received} of {total} bytes")
        prefix = _hash_prefix(path.name)
        sha256 = digest.hexdigest()
        if prefix is not None and not sha256.startswith(prefix):
            raise fail(f"corrupted: SHA-256 {sha256} does not start with {prefix}")
        if verify is not None:
            try:
                verify(tmp)
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
                raise fail(f"the downloaded file is not usable: {reason}") from None
        os.replace(tmp, path)
    except OSError as exc:  # the local disk (full, read-only); network errors are handled above
        tmp.unlink(missing_ok=True)
        raise fail(f"cannot write {path}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("downloaded %s: %d bytes in %.1f s", what, received, time.monotonic() - start)
    return path
