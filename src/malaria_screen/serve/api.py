"""REST API for cell classification and whole-field screening (FastAPI), bounded under hostile load.

Endpoints
---------
``POST /v1/classify``
    ``multipart/form-data`` with one or more image file parts (field name ``files``). Returns
    ``{"model", "threshold", "n_images", "n_parasitized", "n_failed", "results": [{"filename",
    "label", "p_parasitized", "error"}]}``, one result per image in request order. A part that
    cannot be decoded, is larger than ``max_file_bytes`` or ``max_pixels``, or comes after the
    request's pixel or CPU budget is spent gets a per-item ``error`` (status 200); the others are
    classified.
``POST /v1/field``
    ``multipart/form-data`` with ONE whole thin-smear field image (issue 5): red cells are
    segmented and classified by :func:`malaria_screen.smear.screen.screen_field` in a worker
    process with a CPU-seconds and memory budget; returns the field JSON (``n_rbc``,
    ``n_infected``, ``parasitemia`` with its 95 % interval, per-cell boxes and labels) and, with
    ``?overlay=true``, the outlined field as a base64 PNG. Self-check
    (:mod:`malaria_screen.smear.domain`): an image that is not a blood smear field (noise,
    blank, a photo, text) is 422 with the reason; a field whose cells lie outside the model's
    training cells has ``"in_domain": false``, its ``domain_score`` and a ``domain_note`` saying
    what to do. Needs the ``smear`` extra (501 without it).
``GET /v1/model``
    The model (name and SHA-256, never its path), config, shipped metrics, back-end, the
    server's limits and access settings, and the rescorer's config.
``GET /healthz``
    Liveness: ``{"status": "ok"}``, answered on the event loop, never behind a job.
``GET /readyz``
    Readiness: 200 when the model is loaded, a field worker is up and no queue is full; else
    503 with the reasons.
``GET /openapi.json``, ``/docs``
    OpenAPI schema and Swagger UI, served from local files (no CDN).

Errors (JSON ``{"detail": "<what and the limit>"}``): 400 bad ``Host``; 401 missing/invalid API
key; 408 body too slow; 413 body over ``max_request_bytes``, more than ``max_images`` images,
(``/v1/field``) a field over ``max_pixels``; 415 not ``multipart/form-data``; 422 malformed
(also: no closing boundary, a text part where a file belongs), no image, or a field that cannot
be read or screened within the CPU/memory budget or is not a blood smear field; 429 over the rate limit; 503 a full queue,
both with ``Retry-After``.

How the server stays up: the event loop only streams and parses bodies and answers the probes.
A ``/v1/classify`` request goes first to the light lane (threads): if its images' headers say
they hold at most ``light_request_pixels`` pixels in all, they are decoded and classified
there, in milliseconds; otherwise their decoding goes to the heavy lane, worker processes with
the request's pixel and CPU budgets and an address-space limit, and only the small decoded
cells come back to be classified. Fields are screened in worker processes too. Heavy work is
kept out of the server process because decoders hold the GIL for a whole image: in a thread,
whatever its niceness, a 25 Mpx PNG stalled the event loop for about 0.2 s. Each queue has a
fixed number of waiting places (503 past them). A job whose client disconnects is dropped (not
started), stopped between images (light lane) or killed (worker processes). Nothing is written
to disk and nothing is unpickled from a client.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

import malaria_screen
from malaria_screen.serve.celljob import Item, is_light, prepare_cells
from malaria_screen.serve.jobs import ClientGone, JobFailed, Lane, ProcessLane, QueueFull, WorkerSpec
from malaria_screen.serve.limits import ServeLimits, ServeSecurity
from malaria_screen.serve.multipart import Part, read_file_parts
from malaria_screen.serve.security import AccessControl

__all__ = ["ModelInfo", "ServeLimits", "ServeSecurity", "create_app", "model_identity"]

log = logging.getLogger(__name__)

#: Status sent (to nobody) when the client left before its answer; as nginx logs it.
CLIENT_CLOSED = 499


class ModelInfo(BaseModel):
    """The model that answered: its name and the SHA-256 of its weights, never a server path."""

    name: Optional[str] = Field(None, description="Model name (run folder or .onnx file name)")
    sha256: Optional[str] = Field(None, description="SHA-256 of the weights (and config) the server loaded")
    backend: Optional[str] = Field(None, description="torch or onnx")


class ItemResult(BaseModel):
    """Result for one image part."""

    filename: Optional[str] = Field(None, description="File name sent by the client")
    label: Optional[str] = Field(None, description="Predicted class; null if the image failed")
    p_parasitized: Optional[float] = Field(None, description="Probability of Parasitized in [0, 1]")
    error: Optional[str] = Field(None, description="Why this image failed; null if it was classified")


class ClassifyResponse(BaseModel):
    """Response of ``POST /v1/classify``: one :class:`ItemResult` per image part, in request order."""

    model: ModelInfo
    threshold: float
    n_images: int
    n_parasitized: int
    n_failed: int
    results: list[ItemResult]


def _sha256_files(files: list[Path]) -> Optional[str]:
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def model_identity(source: Optional[str], backend: Optional[str] = None) -> dict:
    """Name and SHA-256 of a model, for responses that must not show server paths.

    Parameters
    ----------
    source : str or None
        Run folder, ensemble folder or ``.onnx`` file.
    backend : str, optional

    Returns
    -------
    dict
        ``{"name", "sha256", "backend"}``: the folder's or file's name; the SHA-256 of the file,
        or of a folder's weights and settings (``*.safetensors``, ``*.onnx``, ``*.skops``, ``*.json``, names
        included, in sorted order); None where there is no file.
    """
    if not source:
        return {"name": None, "sha256": None, "backend": backend}
    p = Path(source)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".onnx", ".skops", ".json"))
    else:
        files = []
    return {"name": p.name, "sha256": _sha256_files(files), "backend": backend}


def create_app(predictor, limits: ServeLimits | None = None, *, rescorer=None, security: ServeSecurity | None = None,
               field_in_process: bool | None = None) -> FastAPI:
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
    security : ServeSecurity, optional
        API keys, rate limit, allowed hosts, CORS; default :class:`ServeSecurity()` (no keys, no
        rate limit, loopback host names only).
    field_in_process : bool, optional
        Screen fields in worker processes (hard CPU and memory budgets, killed when the client
        leaves). Default: when the predictor (and rescorer) can be loaded again from a path
        (``source``); else fields are screened on a thread lane, without the hard budgets.

    Returns
    -------
    fastapi.FastAPI
        Serve with :func:`malaria_screen.serve.server.run` (header timeout) or
        ``uvicorn.run(app, host="127.0.0.1", port=8000)``; test with
        ``fastapi.testclient.TestClient(app)``. Worker processes (``app.state.heavy_workers``,
        ``app.state.field_workers``) start with the app's lifespan (or at their first request)
        and stop with it.
    """
    limits = limits or ServeLimits()
    security = security or ServeSecurity()
    model = model_identity(predictor.source, getattr(predictor, "backend", None))
    rescorer_id = None if rescorer is None else model_identity(getattr(rescorer, "source", None))
    light = Lane("light", limits.light_workers, limits.max_light_queue)
    # heavy cell requests are decoded in worker processes (no model there): a decoder holding the
    # GIL in a thread of this process would stall the event loop and the light lane
    heavy = ProcessLane("heavy", WorkerSpec(task="cells", max_pixels=limits.max_pixels, cpu_s=limits.max_request_cpu_s,
                                            memory_bytes=limits.max_field_memory_bytes, input_size=predictor.input_size,
                                            max_request_pixels=limits.max_request_pixels),
                        limits.heavy_workers, limits.max_queue, limits.field_jobs_per_worker, what="decoding these images")
    can_reload = bool(predictor.source) and getattr(predictor, "backend", None) in ("torch", "onnx") and \
        (rescorer is None or bool(getattr(rescorer, "source", None)))
    in_process = can_reload if field_in_process is None else field_in_process
    if in_process and not can_reload:
        raise ValueError("field_in_process=True needs a predictor (and rescorer) loadable from its source path")
    fields = ProcessLane("field", WorkerSpec(task="field", model=str(predictor.source), backend=getattr(predictor, "backend", ""),
                                             rescorer=str(rescorer.source) if rescorer is not None else None,
                                             max_pixels=limits.max_pixels, cpu_s=limits.max_request_cpu_s,
                                             memory_bytes=limits.max_field_memory_bytes),
                         limits.field_workers, limits.max_queue, limits.field_jobs_per_worker,
                         what="screening this field") if in_process else None
    field_lane = None if in_process else Lane("field", limits.field_workers, limits.max_queue)
    try:
        import malaria_screen.smear.screen  # noqa: F401

        smear_error = None
    except ImportError as exc:
        smear_error = str(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        heavy.start()
        if fields is not None and smear_error is None:
            fields.start()
        try:
            yield
        finally:
            if fields is not None:
                fields.close()
            light.close()
            heavy.close()
            if field_lane is not None:
                field_lane.close()

    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(
        title="malaria-screen API", version=malaria_screen.__version__, lifespan=lifespan, redoc_url=None,
        static_url="/docs/static",
        description="Classify Giemsa-stained thin-smear red blood cell images as Parasitized / Uninfected, and screen "
                    "whole fields. Research use only; not a medical device.",
    )
    app.state.predictor, app.state.limits, app.state.rescorer, app.state.security = predictor, limits, rescorer, security
    app.state.field_workers, app.state.heavy_workers = fields, heavy
    # outermost first on the way in: Host check, CORS, then keys and rate limit
    app.add_middleware(AccessControl, security=security)
    app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "X-API-Key", "Content-Type"], allow_credentials=False, max_age=600)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(security.allowed_hosts))
    size = predictor.input_size

    def _busy(exc: QueueFull) -> JSONResponse:
        return JSONResponse({"detail": f"server busy: {exc}"}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    def _items(parts: list[Part]) -> list[Item]:
        return [(None, f"file too large: {p.size:,} bytes > limit {limits.max_file_bytes:,} bytes") if p.too_large
                else (p.data, None) for p in parts]

    def _results(cancel, names: list[Optional[str]], prepared: list) -> list[ItemResult]:
        """Classify decoded cells (``(cell, None)`` or ``(None, why not)``) in one batch."""
        if cancel.is_set():
            return [ItemResult(filename=n, error=err or "cancelled") for n, (_, err) in zip(names, prepared)]
        results = predictor.classify_prepared(names, prepared)
        return [ItemResult(filename=n, label=r.label, error=r.error,
                           p_parasitized=None if r.p_parasitized is None else round(r.p_parasitized, 6))
                for n, r in zip(names, results)]

    def _classify_light(cancel, names: list[Optional[str]], items: list[Item]) -> Optional[list[ItemResult]]:
        """On a light-lane thread: None for a heavy request (by its headers); else decode within
        the request's budgets and classify."""
        if not is_light(items, limits.light_request_pixels):
            return None
        prepared: list = [None] * len(items)

        def emit(i: int, cell, err: Optional[str]) -> None:
            prepared[i] = (cell, err)

        prepare_cells(items, size, max_pixels=limits.max_pixels, max_request_pixels=limits.max_request_pixels,
                      cpu_s=limits.max_request_cpu_s, clock=time.thread_time, emit=emit, cancel=cancel)
        return _results(cancel, names, prepared)

    async def _decode_heavy(items: list[Item], receive) -> list:
        """Decode a heavy request's images in a worker process; ``(cell, None)`` or ``(None, why
        not)`` per image, the images a failed worker did not finish carrying its reason."""
        got: list = []
        try:
            await heavy.run(items, receive=receive, items=got)
            why = "not decoded"
        except JobFailed as exc:
            why = f"not decoded: {exc.detail}"
        prepared: list = [(None, why)] * len(items)
        for i, cell, err in got:
            prepared[i] = (cell, err)
        return prepared

    def _field_in_thread(cancel, data: bytearray, name: str, options: dict) -> bytes:
        # smear's dependencies are optional for the cell endpoints (smear_error above)
        from malaria_screen.serve.fieldjob import FieldRefused, json_bytes, screen_field_bytes
        from malaria_screen.smear.domain import load_reference

        if not hasattr(app.state, "domain_reference"):  # the self-check's reference, read once
            app.state.domain_reference = load_reference(predictor)
        try:
            out = screen_field_bytes(data, predictor, name=name, max_pixels=limits.max_pixels, **options,
                                     rescorer=rescorer, domain_reference=app.state.domain_reference)
        except FieldRefused as exc:
            raise JobFailed(exc.status, exc.detail) from None
        return json_bytes(out | {"model": model})

    @app.get("/healthz", summary="Liveness check")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: model loaded, field workers up, queues not full",
             responses={503: {"description": "Not ready (reasons in `reasons`)"}})
    async def readyz() -> JSONResponse:
        queues = {"light": light.pending, "heavy": heavy.pending,
                  "field": fields.pending if fields is not None else field_lane.pending}
        reasons = [f"the {n} queue is full" for n, lane in (("light", light), ("heavy", heavy)) if lane.full]
        if heavy.ready == 0 and heavy.last_error:  # a decode worker starts in about a second
            reasons.append(f"no heavy-image worker could start ({heavy.last_error})")
        if fields is not None and smear_error is None:
            fields.start()
            if fields.ready == 0:
                reasons.append("no field worker is up yet" + (f" ({fields.last_error})" if fields.last_error else ""))
            if fields.full:
                reasons.append("the field queue is full")
        body = {"status": "not ready" if reasons else "ready", "reasons": reasons, "pending": queues,
                "field_workers": fields.ready if fields is not None else None, "heavy_workers": heavy.ready}
        return JSONResponse(body, status_code=503 if reasons else 200)

    @app.get("/v1/model", summary="Model (name and hash), configuration, shipped metrics and server limits")
    async def model_info() -> dict:
        return {"model": model, "backend": model["backend"],
                "precision": getattr(predictor, "precision", None), "config": predictor.config.to_dict(),
                "metrics": predictor.metrics, "limits": dataclasses.asdict(limits), "security": security.public(),
                "field_workers": "process" if in_process else "thread",
                "rescorer": None if rescorer is None else dataclasses.asdict(rescorer.config) | {"model": rescorer_id}}

    @app.post(
        "/v1/classify", response_model=ClassifyResponse, summary="Classify one or more cell images",
        responses={401: {"description": "Missing or invalid API key"}, 408: {"description": "Body too slow"},
                   413: {"description": "Request too large or too many images"},
                   415: {"description": "Not multipart/form-data"}, 422: {"description": "Malformed or no image"},
                   429: {"description": "Rate limit"}, 503: {"description": "Queue full; see Retry-After"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "description": f"Cell images (PNG, JPEG, WebP, TIFF, BMP, GIF); at most "
                                                    f"{limits.max_images} per request, {limits.max_file_bytes:,} bytes "
                                                    f"and {limits.max_pixels:,} pixels each, "
                                                    f"{limits.max_request_pixels:,} pixels in all"}}}}}}},
    )
    async def classify(request: Request):
        parts = await read_file_parts(request, limits)
        names, items = [p.filename for p in parts], _items(parts)
        del parts
        try:
            # light requests are decoded and classified on the light lane's threads; heavier ones
            # are decoded in a worker process, and only their small decoded cells come back
            results = await light.run(_classify_light, names, items, receive=request.receive)
            if results is None:
                prepared = await _decode_heavy(items, request.receive)
                del items
                results = await light.run(_results, names, prepared, receive=request.receive)
        except QueueFull as exc:
            return _busy(exc)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        pos = None if predictor.positive_index is None else predictor.class_names[predictor.positive_index]
        n_par = sum(1 for r in results if pos is not None and r.label == pos)
        return ClassifyResponse(model=ModelInfo(**model), threshold=predictor.threshold, n_images=len(results),
                                n_parasitized=n_par, n_failed=sum(1 for r in results if r.error), results=results)

    @app.post(
        "/v1/field", summary="Screen one whole thin-smear field: cells, labels, parasitemia",
        responses={401: {"description": "Missing or invalid API key"}, 408: {"description": "Body too slow"},
                   413: {"description": "Request, file or image too large"}, 415: {"description": "Not multipart/form-data"},
                   422: {"description": "Malformed, no image, or an image that cannot be read or screened within "
                                        "the per-request CPU and memory budget"},
                   429: {"description": "Rate limit"},
                   501: {"description": "Whole-field screening not installed (malaria-screen[smear])"},
                   503: {"description": "Queue full; see Retry-After"}},
        openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary",
                                    "description": f"One field image, at most {limits.max_file_bytes:,} bytes and "
                                                   f"{limits.max_pixels:,} pixels"}}}}}}},
    )
    async def field(request: Request, overlay: bool = False):
        """The field's result as written by `malaria-screen smear` to `<stem>.json`: `image`, `width`,
        `height` (pixels), `n_rbc`, `n_infected`, `parasitemia` (fraction 0..1), `parasitemia_ci95`
        (Wilson 95 % interval), `parasitemia_method` (`prior`: posteriors corrected to a 2 % prior,
        see docs/quantification.md; `cc` with a rescorer), `rbc_diameter_px`, `n_wbc`, `classified`, `seconds` (per stage) and
        `cells` (`id`, `bbox` [x, y, w, h] in pixels from the top-left, `area_px`, `p_parasitized`,
        `label`, ...), and `model` (name and SHA-256); with `?overlay=true` also
        `overlay_png_base64`, the overlay image as a base64 PNG."""
        if smear_error is not None:
            raise HTTPException(501, f"whole-field screening needs malaria-screen[smear]: {smear_error}")
        parts = await read_file_parts(request, limits)
        if len(parts) != 1:
            raise HTTPException(422, f"send exactly one field image, got {len(parts)}")
        part = parts[0]
        if part.too_large:
            raise HTTPException(413, f"file too large: {part.size:,} bytes > limit {limits.max_file_bytes:,} bytes")
        data, name = part.data, part.filename or "field"
        del parts, part
        options = {"overlay": overlay}  # keyword arguments of fieldjob.screen_field_bytes
        try:
            # the field's JSON comes encoded: thousands of cells take the event loop ~0.1 s to encode
            if fields is not None:
                body = await fields.run((data, name, options, {"model": model}), receive=request.receive)
            else:
                body = await field_lane.run(_field_in_thread, data, name, options, receive=request.receive)
        except QueueFull as exc:
            return _busy(exc)
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        except JobFailed as exc:
            raise HTTPException(exc.status, exc.detail) from None
        return Response(body, media_type="application/json")

    return app
