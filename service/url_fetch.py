"""``{"image_url": ...}`` on ``POST /v1/detect``: the image fetched by the gateway, under the
limits of an upload and the address rules of ``service/addresses.py``.

- Every hop is checked: the URL's scheme (http, https), every address its host resolves to; the
  connection goes to a checked address (the Host header and TLS name stay the URL's host, so
  certificates are verified against it). A redirect is followed only after its target passes
  the same checks, ``SSD_IMAGE_URL_MAX_REDIRECTS`` at most.
- The body is read raw (``Accept-Encoding: identity``; a compressed answer is not inflated, it
  fails to decode as an image), counted as it arrives and cut at ``SSD_MAX_BODY_BYTES`` (413),
  the whole fetch (lookups, redirects, body) within ``SSD_IMAGE_URL_TIMEOUT_S``.
- ``SSD_MAX_URL_FETCHES`` fetches at once (the bytes they may hold are bounded); beyond: 503.
- No connection pooling: each fetch has its own client, so a connection made for one host name
  is never reused for another that shares its address.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import ssl
from pathlib import Path
from urllib.parse import unquote, urljoin, urlunsplit

import certifi
import httpx

from service.addresses import AddressRefused, ResolverBusy, SourcePolicy, Target, Unresolvable
from service.errors import ApiError

log = logging.getLogger("service")
SCHEMES = ("http", "https")
REDIRECTS = (301, 302, 303, 307, 308)


def _pinned(target: Target, address: str) -> tuple[str, dict[str, str]]:
    """The URL with ``address`` in place of the host name, and the Host header of the URL."""
    url = target.url
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    literal = f"[{ip}]" if ip.version == 6 else str(ip)
    default = {"http": 80, "https": 443}[url.scheme.lower()]
    host = f"[{target.host}]" if ":" in target.host else target.host
    shown = host if target.port == default else f"{host}:{target.port}"
    netloc = f"{literal}:{target.port}"
    return urlunsplit((url.scheme.lower(), netloc, url.path or "/", url.query, "")), {"Host": shown}


class ImageFetcher:
    def __init__(
        self,
        policy: SourcePolicy,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int,
        max_fetches: int,
        ca_file: Path | None = None,
    ) -> None:
        self.policy = policy
        # one TLS context for every fetch (building one loads the CA bundle: ~20 ms on the loop)
        self.tls = ssl.create_default_context(cafile=str(ca_file or certifi.where()))
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.max_redirects = max_redirects
        self._slots = asyncio.Semaphore(max_fetches)
        self.max_fetches = max_fetches

    async def fetch(self, raw: str) -> bytes:
        """The bytes at ``raw``, or an :class:`ApiError` that says why not (4xx; 503 when every
        fetch slot is taken)."""
        if self._slots.locked():
            raise ApiError(
                503,
                "overloaded",
                f"{self.max_fetches} image URLs are being fetched; retry shortly",
                {"Retry-After": "1"},
            )
        async with self._slots:
            try:
                async with asyncio.timeout(self.timeout_s):
                    return await self._follow(raw)
            except TimeoutError:
                raise ApiError(
                    422,
                    "image_url_unreachable",
                    f"the image URL did not deliver within {self.timeout_s:g} s",
                ) from None

    async def _check(self, url: str) -> Target:
        try:
            return await self.policy.check(url, SCHEMES)
        except AddressRefused as exc:
            log.warning("image_url refused: %s", exc)
            raise ApiError(403, "address_refused", f"image_url: {exc}") from None
        except Unresolvable as exc:
            raise ApiError(422, "image_url_unreachable", str(exc)) from None
        except ResolverBusy as exc:
            raise ApiError(
                503, "overloaded", f"{exc}; retry shortly", {"Retry-After": "1"}
            ) from None
        except ValueError as exc:
            raise ApiError(422, "invalid_image_url", f"image_url: {exc}") from None

    async def _follow(self, url: str) -> bytes:
        for _ in range(self.max_redirects + 1):
            target = await self._check(url)
            async with httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s),
                follow_redirects=False,
                trust_env=False,
                verify=self.tls,
            ) as client:
                response = await self._connect(client, target)
                try:
                    if response.status_code in REDIRECTS:
                        location = response.headers.get("location")
                        if not location:
                            raise ApiError(
                                422, "image_url_failed", "the image URL redirects nowhere"
                            )
                        url = urljoin(url, location)
                        continue
                    if not 200 <= response.status_code < 300:
                        raise ApiError(
                            422,
                            "image_url_failed",
                            f"the image URL answered {response.status_code}",
                        )
                    return await self._body(response)
                finally:
                    await response.aclose()
        raise ApiError(
            422, "image_url_failed", f"the image URL redirects more than {self.max_redirects} times"
        )

    async def _connect(self, client: httpx.AsyncClient, target: Target) -> httpx.Response:
        """A response from the first checked address that accepts the connection."""
        auth = None
        if target.url.username is not None:  # user:password@ of the URL, as Basic credentials
            pair = f"{unquote(target.url.username)}:{unquote(target.url.password or '')}"
            auth = "Basic " + base64.b64encode(pair.encode()).decode()
        reason = "no address"
        for address in target.addresses:
            url, headers = _pinned(target, address)
            try:
                request = client.build_request(
                    "GET",
                    url,
                    headers={
                        **headers,
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                        "User-Agent": "ssd300-gateway",
                    },
                    extensions={"sni_hostname": target.host} if url.startswith("https") else {},
                )
            except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
                raise ApiError(422, "invalid_image_url", f"image_url: {exc}") from None
            if auth is not None:
                request.headers["Authorization"] = auth
            try:
                return await client.send(request, stream=True)
            except httpx.HTTPError as exc:
                reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ApiError(
            422, "image_url_unreachable", f"could not fetch from {target.host}: {reason}"
        )

    async def _body(self, response: httpx.Response) -> bytes:
        too_large = ApiError(
            413, "payload_too_large", f"the image at image_url exceeds {self.max_bytes} bytes"
        )
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large
        chunks, size = [], 0
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise too_large
                chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise ApiError(
                422, "image_url_unreachable", f"the image URL's body broke off: {exc}"
            ) from None
        return b"".join(chunks)
