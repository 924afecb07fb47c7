"""The hook's HTTP transport: it knows whether a request left, bounds idle reuse, and enforces deadlines.

Three things that ``requests`` alone cannot tell or do, and on which "never send twice" and "never
green having sent nothing" rest:

- **Did the request leave?** A failure before the whole request was written (DNS, refused
  connection, connect timeout, TLS handshake, certificate, proxy, a write into a closed
  connection) means the vendor cannot have processed it: safe to retry. A failure after it is
  unknown. The connections below mark the moment, per thread, instead of guessing from exception
  types (an SSLError can come from the handshake or from a read).
- **Idle reuse.** A server or proxy that closes idle keep-alive connections can close one just as
  a request is written into it: the request is then lost *after* it left, and unknown. A pooled
  connection idle longer than ``idle_max`` is not reused, and each connection is checked once
  more right before the write, so such closes do not race a request.
- **A total deadline.** The read timeout applies to each read: an answer that trickles a byte at a
  time never trips it. A watchdog shuts the socket of a request past its deadline.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from requests.adapters import HTTPAdapter
from requests.models import Response
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_local = threading.local()


@dataclass(eq=False)
class RequestProgress:
    """What one thread's current request has done so far."""

    deadline: float  # time.monotonic() by which the whole answer must be in
    sent: bool = False  # the whole request was written to the connection
    expired: bool = False  # the watchdog cut it at the deadline
    done: bool = False
    connection: Any = field(default=None, repr=False)


class Fate(str, Enum):
    """What a request that failed without an answer may have done at the vendor."""

    NOT_SENT = "not_sent"  # it never left whole: the vendor cannot have it; safe to retry
    PAST_DEADLINE = "past_deadline"  # it left, and the answer was cut at the deadline: unknown
    NO_ANSWER = "no_answer"  # it left, and no answer came within the read timeout: unknown
    DROPPED = "dropped"  # it left, and the connection broke before the answer: unknown

    @property
    def may_have_been_processed(self) -> bool:
        return self is not Fate.NOT_SENT


def fate_of(*, sent: bool, expired: bool, read_timeout: bool) -> Fate:
    """The one rule behind "never send twice" and "never green having sent nothing": a failure
    before the whole request was written is not sent, anything after it is unknown."""
    if not sent:
        return Fate.NOT_SENT
    if expired:
        return Fate.PAST_DEADLINE
    return Fate.NO_ANSWER if read_timeout else Fate.DROPPED


def begin_request(deadline_seconds: float) -> RequestProgress:
    """Start tracking this thread's next request; pair with ``end_request``."""
    progress = RequestProgress(deadline=time.monotonic() + deadline_seconds)
    _local.progress = progress
    return progress


def end_request(progress: RequestProgress) -> None:
    with _WATCHDOG.lock:
        progress.done = True
    _local.progress = None


class _Watchdog:
    """One thread per process that shuts the socket of every request past its deadline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, RequestProgress]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, progress: RequestProgress) -> None:
        with self.lock:
            entry = (progress.deadline, next(self._order), progress)
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pepipost-deadline", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:  # wake the thread only when it must wake sooner (bench/: CPU per send)
                self._wake.notify()

    def _run(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, progress = heapq.heappop(self._heap)
                    if not progress.done:
                        self._cut(progress)
                timeout = self._heap[0][0] - now if self._heap else None
                self._wake.wait(timeout)

    @staticmethod
    def _cut(progress: RequestProgress) -> None:
        """Called with the lock held; the connection is still this request's (see _TrackedConnection)."""
        connection = progress.connection
        progress.expired = True
        if connection is None or connection._pepipost_owner is not progress or connection.sock is None:
            return
        connection._pepipost_cut = True
        # socket.socket's own shutdown: an SSLSocket's would drop its TLS state under the reader.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(connection.sock, socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()


# The mixin below extends urllib3's connections; the type checker reads it as one of them.
if TYPE_CHECKING:
    _ConnectionBase = HTTPConnection
else:
    _ConnectionBase = object


class _TrackedConnection(_ConnectionBase):
    """Marks the thread's request as sent once the whole request was written, and arms its deadline."""

    _pepipost_owner: RequestProgress | None = None
    _pepipost_cut = False
    _pepipost_idle_since: float | None = None

    def request(self, *args: Any, **kwargs: Any) -> None:
        progress: RequestProgress | None = getattr(_local, "progress", None)
        if progress is not None:
            with _WATCHDOG.lock:
                self._pepipost_owner = progress
                cut = self._pepipost_cut
            if cut:  # an earlier request's deadline shut this socket: start afresh, nothing written yet
                self.close()
                self._pepipost_cut = False
            if self.sock is not None and not self.is_connected:
                # Closed by the peer since the pool looked (other threads ran in between): the
                # last moment to find out before writing, when it is still not sent.
                self.close()
            if self.sock is None:
                self.connect()  # fails before anything is written: the request is not sent
            progress.connection = self
            _WATCHDOG.watch(progress)
        super().request(*args, **kwargs)
        if progress is not None:
            progress.sent = True


class _TrackedHTTPConnection(_TrackedConnection, HTTPConnection):
    pass


class _TrackedHTTPSConnection(_TrackedConnection, HTTPSConnection):
    pass


class _IdleBoundedPool:
    """Never hands out a connection that sat idle longer than ``idle_max`` seconds."""

    idle_max: float = 0.2

    def _put_conn(self, conn: Any) -> None:
        if conn is not None:
            conn._pepipost_idle_since = time.monotonic()
        super()._put_conn(conn)  # type: ignore[misc]

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        since = getattr(conn, "_pepipost_idle_since", None)
        if since is not None and conn.sock is not None and time.monotonic() - since > self.idle_max:
            conn.close()  # the next request opens a fresh one
        return conn


class TrackingAdapter(HTTPAdapter):
    """A requests adapter whose pools use the tracked connections and the idle bound."""

    def __init__(self, *, idle_max: float, **kwargs: Any) -> None:
        self._pool_classes = {
            "http": type(
                "PepipostHTTPPool",
                (_IdleBoundedPool, HTTPConnectionPool),
                {"ConnectionCls": _TrackedHTTPConnection, "idle_max": idle_max},
            ),
            "https": type(
                "PepipostHTTPSPool",
                (_IdleBoundedPool, HTTPSConnectionPool),
                {"ConnectionCls": _TrackedHTTPSConnection, "idle_max": idle_max},
            ),
        }
        super().__init__(**kwargs)

    # A campaign's sends share one pool: finding it anew per request (parsing the URL, keying the
    # pool manager) and building a full requests.Response were a fifth of the client's CPU per
    # message (bench/send_limit.py). For the hook's own requests (a tracked one is in progress),
    # the pool is found once per URL and settings, a few URLs in all, and the response carries no
    # cookie jar; any other request through the session (get_conn()) goes requests' own way.
    def get_connection_with_tls_context(
        self, request: Any, verify: Any, proxies: Any = None, cert: Any = None
    ) -> HTTPConnectionPool:
        if getattr(_local, "progress", None) is None:
            return super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        key = (request.url, verify if isinstance(verify, (bool, str)) else repr(verify), repr(cert), repr(proxies))
        pools = self.__dict__.setdefault("_pepipost_pools", {})
        pool = pools.get(key)
        if pool is None or pool.pool is None:  # .pool is None once the pool was closed
            pool = pools[key] = super().get_connection_with_tls_context(request, verify, proxies=proxies, cert=cert)
        return pool

    def build_response(self, req: Any, resp: Any) -> Response:
        if getattr(_local, "progress", None) is None:
            return super().build_response(req, resp)
        response = Response()  # the hook reads the status, the headers and the raw body only
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response

    def close(self) -> None:
        self.__dict__.pop("_pepipost_pools", None)
        super().close()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = self._pool_classes
        return manager
