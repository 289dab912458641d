"""Hypothesis over the request headers of POST /v1/detect (Content-Type, its parameters, quoting,
repetition, lengths, charsets), over real HTTP: never a 5xx (reliability spec §5)."""

from __future__ import annotations

import collections

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devtools.images import encode, photo

pytestmark = pytest.mark.slow
JPEG = encode(photo(64, 48, seed=1), "JPEG")
SEEN: collections.Counter[int] = collections.Counter()

# header values as a client can send them: latin-1 without CR, LF or NUL
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=80,
)
boundary = st.one_of(
    header_text,
    st.text(alphabet="-_=+/'()?,.:;abcXYZ0123456789 \"\\", min_size=0, max_size=300),
    st.integers(70, 5000).map(lambda n: "b" * n),  # beyond RFC 2046's 70 characters
    st.sampled_from(["", '""', '"', "\\", "--", " ", "=", ";", "a b", "é", "\t", "ÿ" * 71]),
)
param_name = st.sampled_from(["boundary", "BOUNDARY", "Boundary", "charset", "name", "boundary*"])
param = st.tuples(param_name, boundary, st.booleans()).map(
    lambda t: f'{t[0]}="{t[1]}"' if t[2] else f"{t[0]}={t[1]}"
)
media = st.sampled_from(
    ["multipart/form-data", "MULTIPART/FORM-DATA", "multipart/form-data ", "multipart/mixed",
     "multipart/form-data;", "image/jpeg", "application/octet-stream", "", "multipart/"]
)  # fmt: skip
content_type = st.one_of(
    st.tuples(media, st.lists(param, max_size=4), st.sampled_from(["; ", ";", " ; ", ";;"])).map(
        lambda t: t[0] + "".join(t[2] + p for p in t[1])
    ),
    header_text,
)


def body_for(value: str) -> bytes:
    """A multipart body whose delimiter is the first boundary-looking parameter, so the parser
    gets far with it; any other value is sent the same body."""
    b = "x"
    for piece in value.split(";"):
        key, _, v = piece.strip().partition("=")
        if key.lower().startswith("boundary"):
            b = v.strip('"') or "x"
            break
    head = (
        f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode("latin-1", "replace")
    return head + JPEG + f"\r\n--{b}--\r\n".encode("latin-1", "replace")


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=content_type, repeat=st.booleans(), extra=st.lists(header_text, max_size=2))
def test_content_type_headers_never_give_a_5xx(service, value, repeat, extra):
    def field(text: str) -> bytes:  # HTTP allows no whitespace around a header value
        return text.strip(" \t").encode("latin-1")

    headers = [("content-type", field(value))]
    if repeat:  # the header twice (a second, different one)
        headers.append(("content-type", field("multipart/form-data; boundary=" + "".join(extra))))
    for v in extra:
        headers.append(("content-disposition", field(v)))
    with httpx.Client(base_url=service.url, timeout=30) as c:
        r = c.post("/v1/detect", content=body_for(value), headers=headers)
    SEEN[r.status_code] += 1
    assert r.status_code < 500, (value, r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json")
    assert "error" in r.json() or r.status_code == 200


def test_header_fuzz_report(figures):
    """Runs after the fuzz test: the figure for docs/reliability.md."""
    total = sum(SEEN.values())
    if not total:
        pytest.skip("the fuzz test did not run")
    fives = sum(n for code, n in SEEN.items() if code >= 500)
    figures(
        "header fuzzing (Content-Type, parameters, quoting, repetition, lengths)",
        "4xx, never 5xx",
        f"{fives} 5xx of {total} requests",
        ", ".join(f"{code}: {n}" for code, n in sorted(SEEN.items())),
    )
    assert fives == 0
