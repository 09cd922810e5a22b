"""Access control of the REST API as one pure ASGI middleware: API keys (401) and a per-client
token-bucket rate limit (429).

A pure ASGI middleware (not Starlette's ``BaseHTTPMiddleware``) leaves the request's
``receive`` channel untouched, so the endpoints still stream the body with their own limits and
still learn when the client disconnects. Keys are compared with :func:`hmac.compare_digest`
against every configured key (no early exit), so the time taken does not tell how much of a key
was right. The rate limit is a token bucket per client (its key when keys are in use, else its
address): ``rate_burst`` requests at once, refilled at ``rate_per_minute``; the table of buckets
is bounded (least recently seen clients are dropped past 10,000).
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections import OrderedDict

from malaria_screen.serve.limits import ServeSecurity

__all__ = ["AccessControl", "OPEN_PATHS"]

#: Paths answered without a key and not rate-limited: probes and the API's own documentation.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})
#: The documentation's own files (Swagger UI's script and style, served offline): a browser
#: fetches them without the key, so ``/docs`` would be a blank page behind one.
OPEN_PREFIX = "/docs/static/"

_MAX_CLIENTS = 10_000


async def _reply(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


class AccessControl:
    """ASGI middleware: 401 without a valid key (when keys are set), 429 over the rate limit.

    Parameters
    ----------
    app : ASGI application
    security : ServeSecurity
    clock : callable, default=time.monotonic
        Seconds; replaced in tests.
    """

    def __init__(self, app, security: ServeSecurity, clock=time.monotonic) -> None:
        self.app, self.security, self.clock = app, security, clock
        self._keys = [k.encode() for k in security.api_keys]
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _key_of(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        for name, value in headers:
            if name == b"x-api-key":
                return value.strip()
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip()
        return None

    def _valid(self, key: bytes | None) -> bool:
        ok = False
        for k in self._keys:  # every key compared: no early exit
            ok |= key is not None and hmac.compare_digest(key, k)
        return ok

    def _take(self, client: str) -> float:
        """Take a token for ``client``; 0 if granted, else seconds until one is free."""
        sec = self.security
        rate = sec.rate_per_minute / 60.0
        now = self.clock()
        tokens, last = self._buckets.pop(client, (float(sec.rate_burst), now))
        tokens = min(float(sec.rate_burst), tokens + (now - last) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > _MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return wait

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path") or ""
        if scope["type"] != "http" or path in OPEN_PATHS or path.startswith(OPEN_PREFIX):
            await self.app(scope, receive, send)
            return
        key = self._key_of(scope.get("headers") or [])
        if self._keys and not self._valid(key):
            await _reply(send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                         [(b"www-authenticate", b'Bearer realm="malaria-screen"')])
            return
        if self.security.rate_per_minute > 0:
            client = ("key:" + key.decode("latin-1")) if self._keys and key else ("addr:" + str((scope.get("client") or ("?",))[0]))
            wait = self._take(client)
            if wait > 0:
                await _reply(send, 429, f"rate limit: {self.security.rate_per_minute:g} requests per minute per client "
                                        f"(burst {self.security.rate_burst}); retry in {wait:.1f} s",
                             [(b"retry-after", str(max(1, math.ceil(wait))).encode())])
                return
        await self.app(scope, receive, send)
