"""Typed, frozen settings of the REST API: what one request may cost, and who may send it.

:class:`ServeLimits` bounds the cost of every request (bytes, pixels, CPU seconds, memory, time
to send the body) and of all requests together (bounded job queues that answer 503 with
``Retry-After`` when full). :class:`ServeSecurity` holds the optional API keys, the per-client
rate limit, the Host allow-list and the CORS origins. Both are saved in ``GET /v1/model``'s
answer (keys excepted), so a client can see the limits it runs under.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["API_KEYS_ENV", "ServeLimits", "ServeSecurity", "load_api_keys"]

#: Environment variable holding API keys, comma-separated (``serve --api-key-file`` adds a file's).
API_KEYS_ENV = "MALARIA_SCREEN_API_KEYS"


@dataclass(frozen=True)
class ServeLimits:
    """Request limits of the API.

    Per image and per request
    -------------------------
    max_file_bytes : int, default=8 MiB
        Largest accepted image part, bytes; larger parts get a per-item error.
    max_request_bytes : int, default=64 MiB
        Largest accepted request body, bytes; larger bodies get 413 (checked on the
        ``Content-Length`` header and again while streaming, also for chunked bodies).
    max_images : int, default=256
        Most image parts per request; more get 413.
    max_pixels : int, default=25,000,000
        Largest accepted image, width x height pixels; larger images get a per-item error
        (``/v1/field``: 413), checked from the header before any pixel is decoded.
    max_request_pixels : int, default=50,000,000
        Pixels (sum of width x height over a request's images, from their headers) decoded for
        one request; images past the budget get a per-item error without being decoded.
    max_request_cpu_s : float, default=20.0
        CPU seconds one request may use. ``/v1/field`` runs in a worker process whose
        ``RLIMIT_CPU`` ends the job when it is spent (422); ``/v1/classify`` checks it between
        images (the images after it get a per-item error).
    max_field_memory_bytes : int, default=1.5 GiB
        Address space a field job may add to its worker process beyond the loaded model
        (``RLIMIT_AS``); a field that needs more gets 422, the server keeps running. The heavy
        cell workers have the same limit (an image that needs more gets an item error). 0: no
        limit. Measured (ONNX back-end): an IML field of 1.2 Mpx adds 0.36 GB, a 4.9 Mpx one
        0.54 GB, a 19.7 Mpx one 1.65 GB; so the default takes real fields up to about 17 Mpx.
    body_timeout_s : float, default=60.0
        Time to send a whole request body; slower bodies get 408.
    header_timeout_s : float, default=10.0
        Time from opening a connection (or the end of the previous response) to the end of the
        request headers; after it the connection is closed (``malaria-screen serve`` only).

    Queues
    ------
    light_workers : int, default=2
        Threads that read each ``/v1/classify`` request's image headers, decode and classify
        light requests (at most ``light_request_pixels`` pixels in all), and classify the
        decoded cells of heavy ones, so that normal cell requests never wait behind large images.
    heavy_workers : int, default=1
        Worker processes decoding the images of heavier ``/v1/classify`` requests (no model;
        the decoded cells are classified on the light lane), under ``max_request_cpu_s``
        (``RLIMIT_CPU``) and ``max_field_memory_bytes`` (``RLIMIT_AS``).
    field_workers : int, default=1
        Worker processes screening ``/v1/field`` images (each loads the model once).
    max_queue : int, default=8
        Jobs that may wait in the heavy and in the field queue; one more gets 503 with
        ``Retry-After``.
    max_light_queue : int, default=128
        Jobs that may wait in the light queue (each takes milliseconds).
    light_request_pixels : int, default=2,000,000
        Largest request (sum of image pixels) handled by the light queue.
    field_jobs_per_worker : int, default=200
        A worker process (field or heavy cells) is replaced after this many jobs, so that its
        memory cannot creep.

    Raises
    ------
    ValueError
        If a limit is not positive (``max_field_memory_bytes`` may be 0), or
        ``max_file_bytes > max_request_bytes``.
    """

    max_file_bytes: int = 8 * 1024 * 1024
    max_request_bytes: int = 64 * 1024 * 1024
    max_images: int = 256
    max_pixels: int = 25_000_000
    max_request_pixels: int = 50_000_000
    max_request_cpu_s: float = 20.0
    max_field_memory_bytes: int = 3 * 1024**3 // 2
    body_timeout_s: float = 60.0
    header_timeout_s: float = 10.0
    light_workers: int = 2
    heavy_workers: int = 1
    field_workers: int = 1
    max_queue: int = 8
    max_light_queue: int = 128
    light_request_pixels: int = 2_000_000
    field_jobs_per_worker: int = 200

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            floor = 0 if f.name == "max_field_memory_bytes" else 1
            if f.type == "float":
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                    raise ValueError(f"{f.name} must be a positive number, got {v!r}")
            elif not isinstance(v, int) or isinstance(v, bool) or v < floor:
                raise ValueError(f"{f.name} must be an int >= {floor}, got {v!r}")
        if self.max_file_bytes > self.max_request_bytes:
            raise ValueError(f"max_file_bytes ({self.max_file_bytes}) > max_request_bytes ({self.max_request_bytes})")


@dataclass(frozen=True)
class ServeSecurity:
    """Who may call the API, and from where.

    Attributes
    ----------
    api_keys : tuple of str, default=()
        Accepted keys, sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; compared
        in constant time (:func:`hmac.compare_digest`). Empty: no authentication. ``/healthz``,
        ``/readyz``, ``/docs`` and ``/openapi.json`` need no key; the rest answer 401 without one.
    rate_per_minute : float, default=0
        Requests per minute per client (its API key, else its address), token bucket with
        ``rate_burst`` tokens; over it: 429 with ``Retry-After``. 0: no rate limit.
        Probes (``/healthz``, ``/readyz``) are not counted.
    rate_burst : int, default=20
    allowed_hosts : tuple of str, default=("127.0.0.1", "localhost", "::1", "[::1]")
        ``Host`` header values accepted (Starlette's ``TrustedHostMiddleware``; ``*.example.org``
        wildcards allowed); others get 400, which defeats DNS rebinding. ``("*",)``: any.
    cors_origins : tuple of str, default=()
        Browser origins allowed to call the API cross-site (``CORSMiddleware``); none by default.

    Raises
    ------
    ValueError
        For an empty or blank key, a negative rate, a burst < 1, or no allowed host.
    """

    api_keys: tuple[str, ...] = field(default=(), repr=False)
    rate_per_minute: float = 0.0
    rate_burst: int = 20
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "::1", "[::1]")
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if any(not k or k.strip() != k for k in self.api_keys):
            raise ValueError("API keys must be non-empty and have no surrounding whitespace")
        if self.rate_per_minute < 0:
            raise ValueError(f"rate_per_minute must be >= 0, got {self.rate_per_minute}")
        if self.rate_burst < 1:
            raise ValueError(f"rate_burst must be >= 1, got {self.rate_burst}")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts is empty: no request could be answered (use ('*',) for any host)")

    def public(self) -> dict:
        """The settings without the keys (``auth`` says whether keys are required)."""
        d = dataclasses.asdict(self)
        d.pop("api_keys")
        return d | {"auth": bool(self.api_keys)}


def load_api_keys(path: str | os.PathLike | None = None, *, env: str = API_KEYS_ENV) -> tuple[str, ...]:
    """API keys from a file (one per line; blank lines and ``#`` comments skipped) and ``$env``.

    Parameters
    ----------
    path : path, optional
        Key file; keep it readable by the service user only (``chmod 600``).
    env : str, default=API_KEYS_ENV
        Environment variable with comma-separated keys.

    Returns
    -------
    tuple of str
        The keys, de-duplicated, in order; empty when neither source gives one.

    Raises
    ------
    FileNotFoundError
        If ``path`` is given and missing.
    ValueError
        If ``path`` is given but holds no key (a typo must not silently disable authentication).
    """
    keys: list[str] = [k.strip() for k in os.environ.get(env, "").split(",") if k.strip()]
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        from_file = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"API key file {path} holds no key")
        keys += from_file
    return tuple(dict.fromkeys(keys))
