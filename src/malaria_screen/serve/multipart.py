"""Strict, in-memory ``multipart/form-data`` parsing for the REST API (python-multipart).

The body is streamed into memory, bounded by bytes (``max_request_bytes``, also for chunked
bodies without ``Content-Length``), by time (``body_timeout_s``, 408) and by parts
(``max_images``); nothing is spooled to disk. Strict: a body without its closing boundary is
422 (a truncated upload is not a smaller one), and a file is a part with a ``filename`` in its
``Content-Disposition``: a text part named like a file field (``files``, ``file``, ...) is 422,
not an image.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import HTTPException, Request

from malaria_screen.serve.limits import ServeLimits

__all__ = ["FILE_FIELDS", "Part", "read_file_parts"]

#: Field names a client uses for files; a text part (no ``filename``) under one of them is an error.
FILE_FIELDS = frozenset({"files", "file", "image", "images"})


class Part:
    """One part of a multipart body: its name, file name, content type and bytes (``data``);
    ``too_large`` when it passed ``max_file_bytes`` (``data`` is then dropped, ``size`` counts on)."""

    __slots__ = ("name", "filename", "content_type", "data", "too_large", "size")

    def __init__(self) -> None:
        self.name: str | None = None
        self.filename: str | None = None
        self.content_type: str | None = None
        self.data = bytearray()
        self.too_large = False
        self.size = 0


async def read_file_parts(request: Request, limits: ServeLimits) -> list[Part]:
    """Stream, bound and parse a multipart body; the file parts in order.

    Raises
    ------
    HTTPException
        413 (body over ``max_request_bytes``, more than ``max_images`` parts), 415 (not
        multipart/form-data), 408 (body not received within ``body_timeout_s``), 422 (no
        boundary or one over 70 characters, malformed, no closing boundary, a text part where a file belongs, no file).
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise HTTPException(415, f"Content-Type must be multipart/form-data with one part per image, got "
                                 f"{ctype.decode('latin-1') or 'none'!r}")
    boundary = opts.get(b"boundary")
    if not boundary:
        raise HTTPException(422, "multipart/form-data without a boundary")
    if len(boundary) > 70:  # RFC 2046 5.1.1 (python-multipart itself refuses > 256 with an exception)
        raise HTTPException(422, f"multipart boundary of {len(boundary)} characters: at most 70 (RFC 2046)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise HTTPException(413, f"request body is {int(declared):,} bytes > limit {limits.max_request_bytes:,} bytes")

    parts: list[Part] = []
    cur: dict = {"part": None, "hname": bytearray(), "hval": bytearray(), "headers": {}, "ended": False}

    def on_part_begin() -> None:
        cur["part"], cur["headers"] = Part(), {}
        parts.append(cur["part"])
        if len(parts) > limits.max_images:
            raise HTTPException(413, f"more than {limits.max_images} images in one request")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        cur["hname"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        cur["hval"] += data[start:end]

    def on_header_end() -> None:
        cur["headers"][bytes(cur["hname"]).lower()] = bytes(cur["hval"])
        cur["hname"], cur["hval"] = bytearray(), bytearray()

    def on_headers_finished() -> None:
        p: Part = cur["part"]
        _, disp = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        p.name = disp.get(b"name", b"").decode("utf-8", "replace") or None
        fn = disp.get(b"filename")
        p.filename = fn.decode("utf-8", "replace") if fn is not None else None
        ct = cur["headers"].get(b"content-type")
        p.content_type = ct.decode("latin-1") if ct else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        p: Part = cur["part"]
        p.size += end - start
        if p.size > limits.max_file_bytes:
            p.too_large, p.data = True, bytearray()
        elif not p.too_large:
            p.data += data[start:end]

    def on_end() -> None:
        cur["ended"] = True

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": on_end,
    }, max_size=limits.max_request_bytes)
    total = 0
    t_end = time.monotonic() + limits.body_timeout_s
    stream = request.stream().__aiter__()
    try:
        while True:
            left = t_end - time.monotonic()
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(left, 0.001))
            except StopAsyncIteration:
                break
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {limits.body_timeout_s:g} s") from None
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise HTTPException(413, f"request body exceeds the limit of {limits.max_request_bytes:,} bytes")
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # python-multipart raises MultipartParseError and friends; a client gone mid-body too
        raise HTTPException(422, f"malformed multipart body: {exc}") from exc
    if not cur["ended"]:
        raise HTTPException(422, "malformed multipart body: no closing boundary (the upload is incomplete)")
    text = [p.name for p in parts if p.filename is None and p.name in FILE_FIELDS]
    if text:
        raise HTTPException(422, f"part {text[0]!r} is a text field, not a file: send images as file parts "
                                 f"(with a filename in Content-Disposition)")
    images = [p for p in parts if p.filename is not None]
    if not images:
        raise HTTPException(422, "no image in the request: send one or more files as multipart parts (field name 'files')")
    return images
