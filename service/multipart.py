"""A small streaming multipart/form-data reader with our own limits.

Starlette's form parser spools parts to temporary files, caps part header lines at 4 KiB (a 10 KiB
file name would be a 400) and its limits cannot all be set. Bodies here are already capped by the
edge middleware (10 MiB by default), so parts are kept in memory, files are counted as they
arrive (the request is refused at the first file over the limit), text fields are capped and file
names are parsed but never used.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import ApiError

# malformed bodies are answered with a 400; the parser's own per-byte warnings would only flood logs
logging.getLogger("python_multipart").setLevel(logging.ERROR)

MAX_HEADER_SIZE = 64 * 1024  # one part header line (long file names are allowed, and ignored)
MAX_FIELD_BYTES = 64 * 1024  # a non-file field
MAX_PARTS = 2048


@dataclass
class Part:
    name: str
    is_file: bool
    data: bytearray = field(default_factory=bytearray)
    sink: BinaryIO | None = None  # a file part written to disk instead of ``data``
    size: int = 0


def boundary_of(content_type: str) -> bytes:
    try:
        _, params = parse_options_header(content_type)
    except (ValueError, UnicodeError, TypeError) as exc:  # any header a client can send
        raise ApiError(400, "invalid_multipart", f"unusable Content-Type: {exc}") from None
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "multipart/form-data without a boundary")
    return boundary


async def read_form(
    content_type: str,
    stream: AsyncIterator[bytes],
    max_files: int,
    spool: tuple[str, BinaryIO] | None = None,
) -> dict[str, list[Part]]:
    """Parse a multipart body; returns the parts by field name (files and text fields).
    ``spool``: (field, file): that field's one file is written to the file as it arrives, and
    no other file is accepted (a video upload)."""
    parts: list[Part] = []
    state = {"headers": {}, "field": b"", "value": b"", "files": 0}

    def on_part_begin() -> None:
        state["headers"] = {}
        if len(parts) >= MAX_PARTS:
            raise ApiError(400, "too_many_parts", f"at most {MAX_PARTS} form parts")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]
        if len(state["value"]) > MAX_HEADER_SIZE:
            raise ApiError(400, "invalid_multipart", "a part header is too long")

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        disposition, options = parse_options_header(
            state["headers"].get(b"content-disposition", b"")
        )
        if disposition != b"form-data":
            raise ApiError(400, "invalid_multipart", "a part without form-data disposition")
        name = options.get(b"name", b"").decode("utf-8", "replace")
        is_file = b"filename" in options or b"filename*" in options
        if is_file:
            state["files"] += 1
            if state["files"] > max_files:
                raise ApiError(400, "too_many_files", f"at most {max_files} files per request")
        part = Part(name, is_file)
        if spool is not None:  # a video: one file part, nothing else held in memory
            if not is_file or name != spool[0] or state["files"] > 1:
                raise ApiError(
                    400,
                    "too_many_files" if is_file else "unexpected_field",
                    f"send one file in the field {spool[0]!r} and nothing else (parameters go "
                    "in the query)",
                )
            part.sink = spool[1]
        parts.append(part)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part = parts[-1]
        part.size += end - start
        if part.sink is not None:
            part.sink.write(data[start:end])
            return
        part.data += data[start:end]
        if not part.is_file and len(part.data) > MAX_FIELD_BYTES:
            raise ApiError(
                413, "field_too_large", f"a text field is larger than {MAX_FIELD_BYTES} bytes"
            )

    boundary = boundary_of(content_type)
    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
    }
    # Every exception of the parser is the client's doing: a 400, never a 500. Its errors are
    # ValueErrors (FormParserError), raised from the constructor too (a boundary over 256 bytes);
    # our callbacks raise ApiError, which passes through.
    try:
        parser = MultipartParser(boundary, callbacks=callbacks, max_header_size=MAX_HEADER_SIZE)
        async for chunk in stream:
            parser.write(chunk)
        parser.finalize()
    except (FormParserError, ValueError, UnicodeError, TypeError, IndexError) as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc}") from None
    form: dict[str, list[Part]] = {}
    for part in parts:
        form.setdefault(part.name, []).append(part)
    return form


async def read_uploads(request: Request, max_files: int) -> list[bytes]:
    """The image bytes of a multipart form (`image` or `images`) or of a raw image body."""
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await read_form(content_type, request.stream(), max_files)
        single = [p for p in form.get("image", []) if p.is_file]
        many = [p for p in form.get("images", []) if p.is_file]
        if len(single) > 1 or (single and many):
            raise ApiError(
                400, "too_many_files", "send one file in 'image', or several in 'images'"
            )
        files = single or many
        if not files:
            raise ApiError(400, "missing_file", "no file in the form field 'image' or 'images'")
        return [bytes(p.data) for p in files]
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return [await request.body()]
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data with an 'image' field, or an image/* body",
    )


async def read_video_upload(request: Request, dest: Path, media_types: tuple[str, ...]) -> int:
    """Writes the video of a multipart form (field ``video``) or of a raw ``video/*`` body to
    ``dest`` as it arrives; returns its size in bytes."""
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    with open(dest, "wb") as f:
        if ctype == "multipart/form-data":
            form = await read_form(content_type, request.stream(), 1, spool=("video", f))
            files = [p for p in form.get("video", []) if p.is_file]
            if not files:
                raise ApiError(400, "missing_file", "no file in the form field 'video'")
            return files[0].size
        if ctype in media_types or ctype == "application/octet-stream":
            size = 0
            async for chunk in request.stream():
                f.write(chunk)
                size += len(chunk)
            if size == 0:
                raise ApiError(400, "empty_body", "the request has no video")
            return size
    raise ApiError(
        415,
        "unsupported_media_type",
        f"send multipart/form-data with a 'video' field, or a body of {', '.join(media_types)}",
    )
