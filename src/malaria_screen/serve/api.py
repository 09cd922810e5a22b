"""REST API for cell classification (FastAPI).

Endpoints
---------
``POST /v1/classify``
    ``multipart/form-data`` with one or more image parts (any field name; ``files`` in the
    schema). Returns ``{"model", "n_images", "n_parasitized", "n_failed", "results": [{"filename",
    "label", "p_parasitized", "error"}]}``, one result per image in request order. A part that
    cannot be decoded, is larger than ``max_file_bytes`` or has more than ``max_pixels`` pixels
    gets a per-item ``error`` (status 200); the others are classified.
``POST /v1/field``
    ``multipart/form-data`` with ONE whole thin-smear field image (issue 5): red cells are
    segmented and classified by :func:`malaria_screen.smear.screen.screen_field`; returns the
    field JSON (``n_rbc``, ``n_infected``, ``parasitemia`` with its 95 % interval, per-cell boxes
    and labels) and, with ``?overlay=true``, the outlined field as a base64 PNG. With a
    second-stage rescorer (``serve --rescorer``), each cell's ``p_parasitized`` and label are the
    rescorer's. Needs the ``smear`` extra (scikit-image); 501 without it.
``GET /v1/model``
    The model's config (input size, mean/std, classes, threshold), shipped metrics, back-end, the
    server limits and the rescorer's config (``null`` without one).
``GET /healthz``
    ``{"status": "ok"}``.
``GET /openapi.json``, ``/docs``
    OpenAPI schema and its viewer.

Errors: 413 when the body exceeds ``max_request_bytes`` or has more than ``max_images`` images;
415 when the body is not ``multipart/form-data``; 422 when it is malformed or holds no image, or
(``/v1/field``) when the field image cannot be read or screened (e.g. smaller than 8x8 px).
Each is JSON ``{"detail": "<what and the limit>"}``.

Nothing is written to disk: the body is streamed into memory (bounded by
``max_request_bytes``) and parsed there with ``python-multipart``, so no temporary files are
spooled anywhere; nothing is unpickled. One predictor is built at start-up and shared. The event
loop only streams and parses request bodies: images are decoded and classified (and fields
screened) in a worker thread, so ``/healthz`` and other requests keep answering while a request
of large images decodes.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from malaria_screen.data.io import ImageDecodeError, check_cell_size, check_colour, decode_image
from malaria_screen.data.preprocess import letterbox

__all__ = ["ServeLimits", "create_app"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeLimits:
    """Request limits of the API.

    Attributes
    ----------
    max_file_bytes : int, default=8 MiB
        Largest accepted image part, bytes; larger parts get a per-item error.
    max_request_bytes : int, default=64 MiB
        Largest accepted request body, bytes; larger bodies get 413 (checked on the
        ``Content-Length`` header and again while streaming).
    max_images : int, default=256
        Most image parts per request; more get 413.
    max_pixels : int, default=25,000,000
        Largest accepted image, width x height pixels; larger images get a per-item error
        (checked from the header, before decoding the pixels).

    Raises
    ------
    ValueError
        If a limit is not positive or ``max_file_bytes > max_request_bytes``.
    """

    max_file_bytes: int = 8 * 1024 * 1024
    max_request_bytes: int = 64 * 1024 * 1024
    max_images: int = 256
    max_pixels: int = 25_000_000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{f.name} must be a positive int, got {v!r}")
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError(f"max_file_bytes ({self.max_file_bytes}) > max_request_bytes ({self.max_request_bytes})")


class ItemResult(BaseModel):
    """Result for one image part."""

    filename: Optional[str] = Field(None, description="File name sent by the client")
    label: Optional[str] = Field(None, description="Predicted class; null if the image failed")
    p_parasitized: Optional[float] = Field(None, description="Probability of Parasitized in [0, 1]")
    error: Optional[str] = Field(None, description="Why this image failed; null if it was classified")


class ClassifyResponse(BaseModel):
    """Response of ``POST /v1/classify``: one :class:`ItemResult` per image part, in request order."""

    model: Optional[str] = Field(None, description="Model source (run folder or .onnx file)")
    threshold: float
    n_images: int
    n_parasitized: int
    n_failed: int
    results: list[ItemResult]


class _Part:
    __slots__ = ("name", "filename", "content_type", "data", "too_large", "size")

    def __init__(self) -> None:
        self.name: str | None = None
        self.filename: str | None = None
        self.content_type: str | None = None
        self.data = bytearray()
        self.too_large = False
        self.size = 0


async def _read_parts(request: Request, limits: ServeLimits) -> list[_Part]:
    """Stream and parse a multipart body in memory, enforcing the byte and count limits."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype != b"multipart/form-data":
        raise HTTPException(415, f"Content-Type must be multipart/form-data with one part per image, got "
                                 f"{ctype.decode('latin-1') or 'none'!r}")
    boundary = opts.get(b"boundary")
    if not boundary:
        raise HTTPException(422, "multipart/form-data without a boundary")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.max_request_bytes:
        raise HTTPException(413, f"request body is {int(declared):,} bytes > limit {limits.max_request_bytes:,} bytes")

    parts: list[_Part] = []
    cur: dict = {"part": None, "hname": bytearray(), "hval": bytearray(), "headers": {}}

    def on_part_begin() -> None:
        cur["part"], cur["headers"] = _Part(), {}
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
        p: _Part = cur["part"]
        _, disp = parse_options_header(cur["headers"].get(b"content-disposition", b""))
        p.name = disp.get(b"name", b"").decode("utf-8", "replace") or None
        fn = disp.get(b"filename")
        p.filename = fn.decode("utf-8", "replace") if fn is not None else None
        ct = cur["headers"].get(b"content-type")
        p.content_type = ct.decode("latin-1") if ct else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        p: _Part = cur["part"]
        p.size += end - start
        if p.size > limits.max_file_bytes:
            p.too_large, p.data = True, bytearray()
        elif not p.too_large:
            p.data += data[start:end]

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
    }, max_size=limits.max_request_bytes)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > limits.max_request_bytes:
                raise HTTPException(413, f"request body exceeds the limit of {limits.max_request_bytes:,} bytes")
            parser.write(chunk)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # python-multipart raises MultipartParseError and friends
        raise HTTPException(422, f"malformed multipart body: {exc}") from exc
    # a part with a file name, or any non-empty part that is not a plain text field, is an image
    images = [p for p in parts if p.filename is not None or (p.content_type or "").startswith("image/")
              or (p.name in ("files", "file", "image", "images"))]
    if not images:
        raise HTTPException(422, "no image in the request: send one or more files as multipart parts (field name 'files')")
    return images


def create_app(predictor, limits: ServeLimits | None = None, *, rescorer=None) -> FastAPI:
    """Build the API around one predictor (created once, at start-up).

    Parameters
    ----------
    predictor : CellClassifierBase
        :class:`~malaria_screen.inference.predictor.Predictor` or
        :class:`~malaria_screen.inference.onnx_predictor.OnnxPredictor`.
    limits : ServeLimits, optional
        Default :class:`ServeLimits()`.
    rescorer : CellRescorer, optional
        Second stage for ``/v1/field``
        (:class:`~malaria_screen.smear.rescore.CellRescorer`, fitted with this cell model).

    Returns
    -------
    fastapi.FastAPI
        Serve with ``uvicorn.run(app, host="127.0.0.1", port=8000)``; test with
        ``fastapi.testclient.TestClient(app)``.
    """
    import malaria_screen

    limits = limits or ServeLimits()
    app = FastAPI(
        title="malaria-screen API", version=malaria_screen.__version__,
        description="Classify Giemsa-stained thin-smear red blood cell images as Parasitized / Uninfected. "
                    "Research use only; not a medical device.",
    )
    app.state.predictor, app.state.limits, app.state.rescorer = predictor, limits, rescorer
    size = predictor.input_size

    def _classify(parts: list[_Part]) -> list[ItemResult]:
        cells, errors = [], []
        for p in parts:
            if p.too_large:
                errors.append(f"file too large: {p.size:,} bytes > limit {limits.max_file_bytes:,} bytes")
                cells.append(None)
                continue
            try:
                cells.append(letterbox(check_colour(check_cell_size(decode_image(bytes(p.data), max_pixels=limits.max_pixels))), size))
                errors.append(None)
            except ImageDecodeError as exc:
                cells.append(None)
                errors.append(str(exc))
            except Exception as exc:  # noqa: BLE001 - a bad image never fails the request
                cells.append(None)
                errors.append(f"{type(exc).__name__}: {exc}")
        ok = [i for i, c in enumerate(cells) if c is not None]
        probs = predictor.predict_proba_prepared(np.stack([cells[i] for i in ok])) if ok else None
        labels = predictor.label_of(probs) if ok else []
        out = [ItemResult(filename=p.filename, error=errors[i]) for i, p in enumerate(parts)]
        for k, i in enumerate(ok):
            pp = None if predictor.positive_index is None else round(float(probs[k, predictor.positive_index]), 6)
            out[i] = ItemResult(filename=parts[i].filename, label=labels[k], p_parasitized=pp)
        return out

    def _field(part: _Part, overlay: bool) -> dict:
        from malaria_screen.smear.report import overlay_image
        from malaria_screen.smear.screen import screen_field

        if part.too_large:
            raise HTTPException(413, f"file too large: {part.size:,} bytes > limit {limits.max_file_bytes:,} bytes")
        try:
            rgb = check_colour(decode_image(bytes(part.data), max_pixels=limits.max_pixels))
        except ImageDecodeError as exc:
            raise HTTPException(422, f"cannot read the field image: {exc}") from exc
        try:
            res = screen_field(rgb, predictor, image_name=part.filename or "field", rescorer=rescorer)
        except ValueError as exc:  # a decoded image that cannot be screened, e.g. smaller than 8x8 px
            raise HTTPException(422, f"cannot screen the field image ({rgb.shape[1]}x{rgb.shape[0]} px): {exc}") from exc
        out = res.to_json()
        if overlay:
            import base64
            import io as _io

            from PIL import Image

            buf = _io.BytesIO()
            Image.fromarray(overlay_image(rgb, res)).save(buf, format="PNG")
            out["overlay_png_base64"] = base64.b64encode(buf.getvalue()).decode("ascii")
        return out

    @app.get("/healthz", summary="Liveness check")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", summary="Model configuration, shipped metrics and server limits")
    def model_info() -> dict:
        return {"source": predictor.source, "backend": getattr(predictor, "backend", None),
                "precision": getattr(predictor, "precision", None), "config": predictor.config.to_dict(),
                "metrics": predictor.metrics, "limits": dataclasses.asdict(limits),
                "rescorer": None if rescorer is None else dataclasses.asdict(rescorer.config) | {"source": rescorer.source}}

    @app.post(
        "/v1/classify", response_model=ClassifyResponse, summary="Classify one or more cell images",
        responses={413: {"description": "Request too large or too many images"},
                   415: {"description": "Not multipart/form-data"}, 422: {"description": "Malformed or no image"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": f"Cell images (PNG, JPEG, WebP, TIFF, BMP, GIF); at most "
                                                    f"{limits.max_images} per request, {limits.max_file_bytes:,} bytes "
                                                    f"and {limits.max_pixels:,} pixels each"}}}}}}},
    )
    async def classify(request: Request) -> ClassifyResponse:
        parts = await _read_parts(request, limits)
        # decoding a large image takes up to seconds: never on the event loop, so /healthz and
        # other requests keep answering meanwhile
        results = await run_in_threadpool(_classify, parts)
        pos = None if predictor.positive_index is None else predictor.class_names[predictor.positive_index]
        n_par = sum(1 for r in results if pos is not None and r.label == pos)
        return ClassifyResponse(model=predictor.source, threshold=predictor.threshold, n_images=len(results),
                                n_parasitized=n_par, n_failed=sum(1 for r in results if r.error), results=results)

    @app.post(
        "/v1/field", summary="Screen one whole thin-smear field: cells, labels, parasitemia",
        responses={413: {"description": "Request or file too large"}, 415: {"description": "Not multipart/form-data"},
                   422: {"description": "Malformed, no image, or an image that cannot be read or screened"},
                   501: {"description": "Whole-field screening not installed (malaria-screen[smear])"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"One field image, at most {limits.max_pixels:,} pixels"}}}}}}},
    )
    async def field(request: Request, overlay: bool = False) -> dict:
        """The field's result as written by `malaria-screen smear` to `<stem>.json`: `image`, `width`,
        `height` (pixels), `n_rbc`, `n_infected`, `parasitemia` (fraction 0..1), `parasitemia_ci95`
        (Wilson 95 % interval), `rbc_diameter_px`, `n_wbc`, `classified`, `seconds` (per stage) and
        `cells` (`id`, `bbox` [x, y, w, h] in pixels from the top-left, `area_px`, `p_parasitized`,
        `label`, ...); with `?overlay=true` also `overlay_png_base64`, the overlay image as a
        base64 PNG."""
        try:
            import malaria_screen.smear.screen  # noqa: F401
        except ImportError as exc:
            raise HTTPException(501, f"whole-field screening needs malaria-screen[smear]: {exc}") from exc
        parts = await _read_parts(request, limits)
        if len(parts) != 1:
            raise HTTPException(422, f"send exactly one field image, got {len(parts)}")
        return await run_in_threadpool(_field, parts[0], overlay)

    return app
