"""The event-loop transport (hooks/loop_transport.py) against a raw socket server on 127.0.0.1 whose
every connection follows a script: what left and what did not, idle reuse, deadlines, size caps and
answers that are not HTTP. Each failure's ``Fate`` is the rule "never send twice" rests on."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from airflow_provider_pepipost.hooks.loop_transport import (
    ConnectTimedOut,
    LoopClient,
    LoopSettings,
    TransportFailure,
)
from airflow_provider_pepipost.hooks.transport import Fate

BODY = b'{"status":"success","data":{"id":"m-1"}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
REQUEST = b"POST /v1/messages HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"


def read_body(conn: socket.socket) -> bytes | None:
    """Read one whole request (head and Content-Length body); its body, or None when the client closed."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.lower().startswith(b"content-length"))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return rest


def read_request(conn: socket.socket) -> bool:
    """Read one whole request; False when the client closed."""
    return read_body(conn) is not None


def reset(conn: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a server or proxy dropping a connection does."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class ScriptedServer:
    """Accepts connections on 127.0.0.1; the n-th runs ``scripts[min(n, last)]`` with the socket."""

    def __init__(self, *scripts: Callable[[socket.socket], None]) -> None:
        self.scripts = scripts
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():  # bounded by close()
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            script = self.scripts[min(self.accepted, len(self.scripts) - 1)]
            self.accepted += 1
            threading.Thread(target=self._run, args=(script, conn), daemon=True).start()

    @staticmethod
    def _run(script: Callable[[socket.socket], None], conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            script(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.listener.close()


def keep_alive(conn: socket.socket) -> None:
    while read_request(conn):
        conn.sendall(OK)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(*scripts: Callable[[socket.socket], None]) -> ScriptedServer:
        servers.append(ScriptedServer(*scripts))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def settings(**changes: float) -> LoopSettings:
    values = dict(connect_timeout=5.0, read_timeout=5.0, deadline=10.0, max_answer_bytes=4096, idle_max=2.0)
    values.update(changes)
    return LoopSettings(pool_size=8, **values)  # type: ignore[arg-type]


def run(server: ScriptedServer, body: Callable[[LoopClient], object], **changes: float) -> object:
    async def main() -> object:
        client = LoopClient(f"http://127.0.0.1:{server.port}/v1/messages", settings(**changes), None)
        try:
            return await body(client)  # type: ignore[misc]
        finally:
            client.close()

    return asyncio.run(main())


def failure_of(server: ScriptedServer, data: bytes = REQUEST, **changes: float) -> TransportFailure:
    async def one(client: LoopClient) -> None:
        await client.exchange(data)

    with pytest.raises(TransportFailure) as caught:
        run(server, one, **changes)
    return caught.value


def test_answers_come_whole_and_one_connection_carries_them_in_turn(serve):
    server = serve(keep_alive)

    async def three(client: LoopClient) -> list:
        return [await client.exchange(REQUEST) for _ in range(3)]

    answers = run(server, three)
    assert [(a.status, a.body, a.headers) for a in answers] == [(200, BODY, {"content-length": str(len(BODY))})] * 3
    assert server.accepted == 1


def test_a_connection_idle_past_the_bound_is_not_reused(serve):
    server = serve(keep_alive)

    async def two_apart(client: LoopClient) -> None:
        await client.exchange(REQUEST)
        await asyncio.sleep(0.6)
        await client.exchange(REQUEST)

    run(server, two_apart, idle_max=0.3)
    assert server.accepted == 2


def test_an_idle_connection_the_peer_closed_unseen_by_the_loop_is_found_before_the_write(serve):
    """The close arrives while the loop is busy (a blocking sleep): only the poll before the write
    can find it, and the request goes on a new connection instead of being lost after it left."""
    answered = threading.Event()

    def answer_once_then_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(OK)
        answered.set()
        time.sleep(0.2)
        conn.shutdown(socket.SHUT_WR)

    server = serve(answer_once_then_close, keep_alive)

    async def two(client: LoopClient) -> object:
        await client.exchange(REQUEST)
        time.sleep(0.6)  # the loop runs nothing meanwhile: the FIN waits unread in the socket
        return await client.exchange(REQUEST)

    assert run(server, two).status == 200  # type: ignore[attr-defined]
    assert server.accepted == 2


def test_data_nobody_asked_for_on_an_idle_connection_retires_it(serve):
    def answer_twice(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(OK + OK)  # one answer too many: the connection is out of step
        while read_request(conn):
            conn.sendall(OK)

    server = serve(answer_twice, keep_alive)

    async def two(client: LoopClient) -> None:
        await client.exchange(REQUEST)
        await asyncio.sleep(0.2)
        await client.exchange(REQUEST)

    run(server, two)
    assert server.accepted == 2


def test_a_refused_connection_is_not_sent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused

        async def main() -> None:
            client = LoopClient(f"http://127.0.0.1:{port}/", settings(), None)
            await client.exchange(REQUEST)

        with pytest.raises(TransportFailure) as caught:
            asyncio.run(main())
    assert caught.value.fate is Fate.NOT_SENT
    assert isinstance(caught.value.cause, ConnectionRefusedError)


def test_no_connection_within_the_connect_timeout_is_not_sent():
    # A listener whose backlog is full: the kernel stops completing handshakes.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # bounded: enough to fill a backlog of 0 (the kernel allows one or two)
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)

        async def main() -> None:
            client = LoopClient(f"http://127.0.0.1:{port}/", settings(connect_timeout=0.3), None)
            await client.exchange(REQUEST)

        started = time.monotonic()
        with pytest.raises(TransportFailure) as caught:
            asyncio.run(main())
        assert time.monotonic() - started < 3
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert caught.value.fate is Fate.NOT_SENT
    assert isinstance(caught.value.cause, ConnectTimedOut)


def test_a_connection_dropped_after_the_request_was_read_is_unknown(serve):
    def read_then_drop(conn: socket.socket) -> None:
        read_request(conn)
        reset(conn)

    failure = failure_of(serve(read_then_drop))
    assert failure.fate is Fate.DROPPED and failure.status is None


def test_a_request_the_server_never_took_whole_is_not_sent(serve):
    """The request's last byte never reached the kernel (the server reads nothing, then resets):
    the write buffer was not empty when the connection died, so the vendor cannot have it."""

    def take_nothing_then_drop(conn: socket.socket) -> None:
        time.sleep(0.5)
        reset(conn)

    big = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (64 << 20) + b"x" * (64 << 20)
    failure = failure_of(serve(take_nothing_then_drop), big)
    assert failure.fate is Fate.NOT_SENT


def test_an_answer_that_breaks_off_after_its_head_is_unknown_with_its_status(serve):
    def half_answer(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"status"')
        reset(conn)

    failure = failure_of(serve(half_answer))
    assert failure.fate is Fate.DROPPED and failure.status == 200


def test_a_trickling_answer_is_cut_at_the_deadline(serve):
    def trickle(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):  # bounded: 10 s at most, the test's deadline is 1 s
            conn.sendall(b" ")
            time.sleep(0.1)

    started = time.monotonic()
    failure = failure_of(serve(trickle), read_timeout=0.5, deadline=1.0)
    assert failure.fate is Fate.PAST_DEADLINE and failure.status == 200
    assert 0.9 < time.monotonic() - started < 3


def test_silence_after_the_request_is_no_answer_at_the_read_timeout(serve):
    def silent(conn: socket.socket) -> None:
        read_request(conn)
        time.sleep(3)

    started = time.monotonic()
    failure = failure_of(serve(silent), read_timeout=0.4, deadline=5.0)
    assert failure.fate is Fate.NO_ANSWER
    assert 0.35 < time.monotonic() - started < 2


def test_an_answer_declaring_more_than_the_cap_is_cut_at_its_head(serve):
    def declare_a_lot(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
        time.sleep(3)

    failure = failure_of(serve(declare_a_lot), max_answer_bytes=1000)
    assert failure.over == 50_000_000 and failure.fate.may_have_been_processed


def test_a_chunked_answer_running_past_the_cap_is_cut(serve):
    def endless_chunks(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(1000):  # bounded; the cap is 1,000 bytes
            conn.sendall(b"100\r\n" + b"x" * 256 + b"\r\n")

    failure = failure_of(serve(endless_chunks), max_answer_bytes=1000)
    assert failure.over == -1 and failure.fate.may_have_been_processed


def test_an_answer_without_a_length_ends_with_its_connection(serve):
    def close_delimited(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + BODY)
        conn.shutdown(socket.SHUT_WR)
        time.sleep(0.2)

    server = serve(close_delimited, keep_alive)

    async def two(client: LoopClient) -> list:
        return [await client.exchange(REQUEST), await client.exchange(REQUEST)]

    first, second = run(server, two)  # type: ignore[misc]
    assert (first.status, first.body) == (200, BODY) and second.status == 200
    assert server.accepted == 2  # the closed one was not reused


def test_an_answer_that_is_not_http_is_unknown(serve):
    def garbage(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"\x00\xffNOT HTTP AT ALL\r\n\r\n")
        time.sleep(1)

    failure = failure_of(serve(garbage))
    assert failure.fate is Fate.DROPPED


def test_a_cancelled_exchange_closes_its_connection(serve):
    def slow(conn: socket.socket) -> None:
        read_request(conn)
        time.sleep(0.5)
        conn.sendall(OK)
        while read_request(conn):
            conn.sendall(OK)

    server = serve(slow, keep_alive)

    async def cancel_then_send(client: LoopClient) -> object:
        task = asyncio.ensure_future(client.exchange(REQUEST))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await client.exchange(REQUEST)

    assert run(server, cancel_then_send).status == 200  # type: ignore[attr-defined]
    assert server.accepted == 2  # the cancelled exchange's answer never reaches the next request


def test_no_more_connections_than_the_pool_size(serve):
    server = serve(keep_alive)

    async def many(client: LoopClient) -> list:
        return await asyncio.gather(*(client.exchange(REQUEST) for _ in range(40)))

    assert len(run(server, many)) == 40  # type: ignore[arg-type]
    assert server.accepted <= 8
