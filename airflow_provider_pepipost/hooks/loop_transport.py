"""The hook's event-loop transport: a campaign's requests in flight on one thread, same rules.

The threaded transport (transport.py) pays, for every request, a thread hand-off and http.client's
header handling: about 1 ms of CPU a message at a top-tier number's 1,000 messages a second, a
whole core (docs/benchmarks.md). This one runs a campaign's requests as coroutines on one asyncio
event loop, over keep-alive HTTP/1.1 connections read by httptools (llhttp, the parser uvicorn
uses), and keeps transport.py's rules:

- **Did the request leave?** It is sent once its last byte was handed to the kernel: the
  connection's write buffer is empty (its high-water mark is 0, so the loop says when it drains).
  A failure before that (DNS, refused connection, connect timeout, TLS handshake, certificate, a
  connection closed under the write) is NOT_SENT; anything after is unknown (``Fate``).
- **Idle reuse.** A connection idle longer than ``idle_max`` is not reused, and an idle one is
  polled right before the write: a peer that closed it (or sent anything unasked) is found while
  the request is still not sent.
- **Deadlines and size.** The read timeout counts from the last byte read, the deadline from the
  request's start, both checked by one sweep of the requests in flight every ``SWEEP_PERIOD``
  (a timer a request was a tenth of the loop's work); an answer over ``max_answer_bytes`` is cut.

Over TLS, "sent" is judged by the TLS layer's buffer: a request larger than the socket's buffers
that the server never reads can count as sent (unknown, never resent) where the threads would say
not sent. It errs on the side of never sending twice; a message's body is far smaller.

Proxies are not spoken here: a send URL that a proxy applies to (HTTPS_PROXY / HTTP_PROXY, less
NO_PROXY) goes through the threaded transport (``PepipostHook.event_loop_possible``).
"""

from __future__ import annotations

import asyncio
import collections
import os
import select
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools

from airflow_provider_pepipost.hooks.transport import Fate, fate_of

# How often the requests in flight are checked against their deadline and read timeout: each is
# cut at most this long after its time.
SWEEP_PERIOD = 0.05

# An answer's head (status line and headers) longer than this is cut, as http.client cuts a line.
MAX_HEAD_BYTES = 65536

# The answer headers the hook reads (hooks/pepipost.py, _parse_answer); the rest are skipped.
_KEPT_HEADERS = frozenset({b"content-length", b"retry-after", b"location", b"transfer-encoding"})


class ConnectTimedOut(TimeoutError):
    """No connection within the connect timeout: nothing was written."""


class TransportFailure(Exception):
    """A request that ended without a whole answer, with what it may have done at the vendor."""

    def __init__(
        self,
        fate: Fate,
        cause: BaseException | None,
        *,
        status: int | None = None,
        over: int | None = None,
        unexpected: bool = False,
    ) -> None:
        super().__init__(fate.value)
        self.fate = fate
        self.cause = cause  # the error underneath (ssl.SSLError, ConnectionRefusedError...), if any
        self.status = status  # the answer's HTTP status, when its head came before the failure
        # The answer cut at a cap: its body declared (>= 0) or ran past (-1) max_answer_bytes, or
        # its head ran past MAX_HEAD_BYTES (-2).
        self.over = over
        self.unexpected = unexpected  # not the network's (a bug, a setting): no retry mends it


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # the first of each kept header, names in lower case
    body: bytes


@dataclass(frozen=True)
class LoopSettings:
    connect_timeout: float
    read_timeout: float
    deadline: float  # seconds from a request's start to its whole answer
    max_answer_bytes: int
    idle_max: float
    pool_size: int


class _Exchange:
    """One request on one connection, from the write to its answer."""

    __slots__ = (
        "chunks",
        "deadline",
        "expired",
        "future",
        "headers",
        "last_read",
        "sent",
        "size",
        "status",
        "wire",
    )

    def __init__(self, future: asyncio.Future, deadline: float, now: float) -> None:
        self.future = future
        self.sent = False
        self.expired = False
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.size = 0
        self.wire = 0  # every byte of the answer read so far, head, framing and trailers included
        self.last_read = now
        self.deadline = deadline


class _Connection(asyncio.Protocol):
    """One keep-alive connection and the exchange in flight on it, if any."""

    def __init__(self, settings: LoopSettings) -> None:
        self.settings = settings
        self.transport: asyncio.Transport | None = None
        self.fileno = -1
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: _Exchange | None = None
        self.closed = False
        self.reusable = False  # the last answer came whole on a connection the server keeps open
        self.idle_since = 0.0
        self.loop = asyncio.get_running_loop()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Any byte left buffered pauses writing, and its drain resumes it: the moment the request
        # left whole is known exactly (resume_writing), not guessed.
        self.transport.set_write_buffer_limits(high=0)  # type: ignore[union-attr]
        sock = transport.get_extra_info("socket")
        self.fileno = sock.fileno() if sock is not None else -1

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.sent = True
            self.exchange.last_read = self.loop.time()  # the read timeout counts from the write

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # nothing was asked: the connection is out of step, never reused
            self.close()
            return
        exchange.last_read = self.loop.time()
        exchange.wire += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as err:  # 101: no HTTP after it
            self._fail(err)
            return
        if self.exchange is exchange and exchange.wire - exchange.size > MAX_HEAD_BYTES:
            # What is not body (the head, chunk framing, trailers) httptools gathers whole before
            # any callback: it is capped here, a read at a time.
            self._fail(None, over=-2)

    def eof_received(self) -> bool:
        exchange = self.exchange
        if exchange is not None and exchange.status is not None and self._delimited_by_close():
            self.on_message_complete()  # an answer without a length ends where the connection does
        self.closed = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if self.exchange is not None:
            self._fail(exc)

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.exchange is None:  # an answer nobody asked for, in the same read as the last one
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _KEPT_HEADERS and self.exchange is not None and self.exchange.status is None:  # not trailers
            # A repeated header is joined as requests joins it ("1, 1"), so both transports read it alike.
            headers, key, text = self.exchange.headers, name.decode("latin-1"), value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.status = self.parser.get_status_code()
        try:
            declared = int(exchange.headers.get("content-length", "-1"))
        except ValueError:
            declared = -1
        if declared > self.settings.max_answer_bytes:
            self._fail(None, over=declared)

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        exchange.size += len(body)
        if exchange.size > self.settings.max_answer_bytes:
            self._fail(None, over=-1)
        else:
            exchange.chunks.append(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None and exchange.status is not None and 100 <= exchange.status < 200:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows on this
            # connection, for this request. (http.client skips only 100; the hook reads any
            # other 1xx it returns as unknown, never as a refusal.)
            exchange.status, exchange.headers, exchange.chunks, exchange.size = None, {}, [], 0
            return
        self.exchange = None
        if exchange is None or exchange.future.done():
            return
        self.reusable = not self.closed and self.parser.should_keep_alive()
        body = exchange.chunks[0] if len(exchange.chunks) == 1 else b"".join(exchange.chunks)
        exchange.future.set_result(Answer(exchange.status or 0, exchange.headers, body))

    # -- the client's side ----------------------------------------------------------------------

    def start(self, exchange: _Exchange, data: bytes) -> None:
        """Write the request; it is sent when the write buffer is empty (now, or at resume_writing)."""
        self.exchange = exchange
        self.reusable = False
        transport = self.transport
        if transport is None or transport.is_closing():
            self._fail(ConnectionResetError("the connection closed before the request was written"))
            return
        transport.write(data)
        # A write into a connection the peer reset fails at once: the transport is then closing,
        # its buffer emptied, and the request not sent.
        if self.exchange is exchange and not transport.is_closing() and transport.get_write_buffer_size() == 0:
            exchange.sent = True

    def peer_spoke(self) -> bool:
        """The idle connection has something to read: the peer closed it, or it is out of step."""
        if self.closed or self.transport is None or self.transport.is_closing() or self.fileno < 0:
            return True
        try:
            poller = select.poll()  # not select.select: descriptors past 1023
            poller.register(self.fileno, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    def check_time(self, now: float) -> None:
        """Past the deadline, or silent for the read timeout, the exchange in flight is cut."""
        exchange = self.exchange
        if exchange is None or exchange.future.done():
            return
        if now >= exchange.deadline:
            exchange.expired = True
            self._fail(None)
        elif exchange.sent and now - exchange.last_read >= self.settings.read_timeout:
            self._fail(TimeoutError("read timeout"), read_timeout=True)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _delimited_by_close(self) -> bool:
        headers = self.exchange.headers if self.exchange is not None else {}
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        return "content-length" not in headers and not chunked and not self.parser.should_keep_alive()

    def _fail(self, cause: BaseException | None, *, over: int | None = None, read_timeout: bool = False) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()  # an answer cut short leaves the connection out of step
        if exchange is None or exchange.future.done():
            return
        fate = fate_of(sent=exchange.sent, expired=exchange.expired, read_timeout=read_timeout)
        exchange.future.set_exception(TransportFailure(fate, cause, status=exchange.status, over=over))


class Slots:
    """At most ``size`` holders at once, first come first served, on one event loop.

    asyncio.Semaphore's job: on Python 3.11 its acquire looks at every waiter each time, and a
    campaign keeps a hundred waiting (bench/send_limit.py).
    """

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def __aenter__(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed a slot, then cancelled: pass it on
                self._release()
            raise  # a cancelled waiter stays queued; _release skips it

    async def __aexit__(self, *exc_info: object) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the longest waiting
                return
        self.free += 1


class LoopClient:
    """Keep-alive connections to one origin, on the running event loop; ``exchange`` sends one
    request and returns its whole answer, or raises ``TransportFailure``."""

    def __init__(self, url: str, settings: LoopSettings, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl_context = ssl_context if parts.scheme == "https" else None
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._slots = Slots(max(1, settings.pool_size))
        self._in_flight: set[_Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    async def exchange(self, data: bytes, *, deadline: float | None = None) -> Answer:
        """``data``: the whole request, head and body. ``deadline``: the loop's time by which the
        answer must be in, when sooner than the settings' deadline."""
        settings = self.settings
        async with self._slots:
            now = self.loop.time()
            ends = now + settings.deadline if deadline is None else min(deadline, now + settings.deadline)
            try:
                connection = self._idle_connection(now) or await self._connect(ends)
            except TransportFailure:
                raise
            except Exception as err:  # not the network's: nothing was written
                raise TransportFailure(Fate.NOT_SENT, err, unexpected=True) from None
            # Created after the connect: the read timeout counts from the write, as on threads.
            exchange = _Exchange(self.loop.create_future(), ends, self.loop.time())
            connection.start(exchange, data)
            self._in_flight.add(connection)
            if self._sweep is None:
                self._sweep = self.loop.call_later(SWEEP_PERIOD, self._check_times)
            try:
                answer = await exchange.future
            except BaseException:
                connection.close()  # cancelled or failed mid-exchange: never reused
                raise
            finally:
                self._in_flight.discard(connection)
            if connection.reusable and not connection.closed and connection.exchange is None:
                connection.idle_since = self.loop.time()
                self._idle.append(connection)
            else:
                connection.close()
            return answer

    def _check_times(self) -> None:
        """The sweep: cut the exchanges past their deadline or read timeout; again while any is in flight."""
        now = self.loop.time()
        for connection in list(self._in_flight):
            connection.check_time(now)
        self._sweep = self.loop.call_later(SWEEP_PERIOD, self._check_times) if self._in_flight else None

    def close(self) -> None:
        """Close every connection; call on the client's loop."""
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
        self._open.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _idle_connection(self, now: float) -> _Connection | None:
        """The most recently used idle connection that is safe to write into, if any."""
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since <= self.settings.idle_max and not connection.peer_spoke():
                return connection
            connection.close()
            self._open.discard(connection)
        return None

    async def _connect(self, ends: float) -> _Connection:
        timeout = max(min(self.settings.connect_timeout, ends - self.loop.time()), 0.001)
        try:
            _, connection = await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: _Connection(self.settings),
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                ),
                timeout,
            )
        except asyncio.TimeoutError:
            raise TransportFailure(Fate.NOT_SENT, ConnectTimedOut(f"no connection within {timeout:g}s")) from None
        except (OSError, ssl.SSLError, ValueError) as err:
            raise TransportFailure(Fate.NOT_SENT, err) from None
        self._open.add(connection)
        self._open = {open_one for open_one in self._open if not open_one.closed}
        return connection


def ssl_context_for(verify: Any, cert: Any = None) -> ssl.SSLContext:
    """The TLS context requests would use with these settings (``verify``: True, False or a CA path)."""
    from requests.utils import DEFAULT_CA_BUNDLE_PATH

    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(verify, str) and os.path.isdir(verify):
        context = ssl.create_default_context(capath=verify)
    elif isinstance(verify, str):
        context = ssl.create_default_context(cafile=verify)
    else:
        context = ssl.create_default_context(cafile=DEFAULT_CA_BUNDLE_PATH)
    if cert:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        context.load_cert_chain(certfile, keyfile)
    return context
