"""The standalone receiver's HTTP server: uvicorn with deadlines on idle and slow connections.

Uvicorn closes a kept-alive connection only after a response, so a client that opens a connection
and sends nothing, or sends its request line and headers a byte at a time, holds a file descriptor
forever; a few hundred of them starve the process. The protocol here gives every request head a
deadline (from the connection's start, or from the previous response) that data does not extend,
and a size cap. The body has its own deadline in the app (``create_app(body_timeout=...)``).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

try:  # uvicorn's fast parser when it is installed (uvicorn[standard]), else its pure-Python one
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _BaseProtocol
except ImportError:  # pragma: no cover - depends on the installed extras
    from uvicorn.protocols.http.h11_impl import H11Protocol as _BaseProtocol  # type: ignore[assignment]

HEAD_TIMEOUT_ENV = "PEPIPOST_WEBHOOK_HEAD_TIMEOUT"
DEFAULT_HEAD_TIMEOUT = 5.0  # seconds for a request line and headers
MAX_HEAD_BYTES = 64 * 1024


class GuardedHttpProtocol(_BaseProtocol):
    """Uvicorn's HTTP protocol, closing a connection whose next request head is late or too large."""

    # Read from the environment so that worker processes (spawned, not forked) get the same value.
    head_timeout = float(os.environ.get(HEAD_TIMEOUT_ENV) or DEFAULT_HEAD_TIMEOUT)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():  # still no complete head: count what it has taken so far
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._await_head()

    def _await_head(self) -> None:
        """From now on a request head must arrive within ``head_timeout`` seconds."""
        self._head_bytes = 0
        self._cycle_awaited: Any = self.cycle
        self._head_deadline = self.loop.time() + self.head_timeout
        # One timer per connection, moved on when it fires early rather than replaced per request:
        # on a busy kept-alive connection a new timer for every request cost more than the request's
        # own checks.
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_due)

    def _waiting_for_head(self) -> bool:
        # A new cycle is made when a head is complete: until then the cycle is the one armed for.
        cycle = self.cycle
        return cycle is self._cycle_awaited and (cycle is None or cycle.response_complete)

    def _head_due(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._waiting_for_head():
            return  # closed, or a request is being served: its response arms the deadline again
        if self.loop.time() < self._head_deadline:  # a response since moved the deadline on
            self._head_timer = self.loop.call_at(self._head_deadline, self._head_due)
            return
        self.transport.close()
