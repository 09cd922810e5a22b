"""Run the API with uvicorn, with the connection timeouts uvicorn lacks by default.

uvicorn's h11 protocol closes an idle keep-alive connection after ``timeout_keep_alive``, but a
connection that sends nothing, or half a request line, after opening is kept forever (a
slowloris client holds sockets for free). :class:`HeaderTimeoutH11Protocol` closes any connection
that has not sent complete request headers within ``header_timeout_s`` of opening (or of the
previous response); the body's own time limit is ``ServeLimits.body_timeout_s`` (408). Request
headers are capped at 16 KiB (``h11_max_incomplete_event_size``).
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderTimeoutH11Protocol", "run"]


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers are late.

    The timer runs while no request is in progress: from ``connection_made`` and from each
    response's end, until the request headers are parsed (a request cycle starts).
    """

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # noqa: D102
        super().connection_made(transport)
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def data_received(self, data: bytes) -> None:  # noqa: D102
        super().data_received(data)
        if not self._idle() and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def on_response_complete(self) -> None:  # noqa: D102
        super().on_response_complete()
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc) -> None:  # noqa: D102
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._idle() and not self.transport.is_closing():
            self.transport.close()


def run(app, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning", header_timeout_s: float = 10.0,
        keep_alive_s: int = 5, max_connections: int = 256) -> None:
    """Serve ``app`` with uvicorn (blocking) with header, keep-alive and connection limits.

    Parameters
    ----------
    app : ASGI application
    host : str, default="127.0.0.1"
    port : int, default=8000
    log_level : str, default="warning"
    header_timeout_s : float, default=10.0
        Close a connection whose request headers are not complete in this time.
    keep_alive_s : int, default=5
        Close an idle keep-alive connection after this time.
    max_connections : int, default=256
        Open connections (and tasks) before uvicorn answers 503.
    """
    protocol = type("Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": float(header_timeout_s)})
    uvicorn.run(app, host=host, port=port, log_level=log_level, http=protocol, timeout_keep_alive=keep_alive_s,
                limit_concurrency=max_connections, h11_max_incomplete_event_size=16 * 1024, server_header=False)
