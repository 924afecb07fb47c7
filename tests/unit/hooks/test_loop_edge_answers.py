"""What the world sends, on both transports alike (from a red-team pass over the event loop):
interim 1xx answers, a read timeout that starts at the write, a head that never ends, repeated
headers, odd but whole answers, refusals then a listener, deadlines shorter than a connect."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
import tracemalloc

import pytest

from airflow_provider_pepipost.errors import PepipostNotSentError, PepipostOutcomeUnknownError
from airflow_provider_pepipost.hooks import loop_transport
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.hooks.transport import Fate
from airflow_provider_pepipost.messages import MediaMessage
from tests.unit.hooks.test_loop_transport import REQUEST, ScriptedServer, read_request, reset, run
from tests.unit.hooks.test_tls_and_proxy import self_signed

MESSAGE = MediaMessage("919833078369", "sandbox-source", attachment_id="media-1", caption="Hi", api_header="h-1")
BODY = b'{"status":"success","data":{"id":"m-1"}}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)


@pytest.fixture
def serve():
    servers: list[ScriptedServer] = []

    def start(*scripts):
        servers.append(ScriptedServer(*scripts))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=["threads", "event_loop"])
def transport(request) -> str:
    return request.param


def sends(hook: PepipostHook, transport: str, count: int, pause: float = 0.0) -> list:
    """``count`` sends one after another (on one event loop for the event loop); each id or error."""
    results: list = []
    if transport == "threads":
        for _ in range(count):
            try:
                results.append(hook.send_message(MESSAGE))
            except Exception as err:
                results.append(err)
            time.sleep(pause)
        return results

    async def in_turn() -> None:
        try:
            for _ in range(count):
                try:
                    results.append(await hook.asend_message(MESSAGE))
                except Exception as err:
                    results.append(err)
                await asyncio.sleep(pause)
        finally:
            hook.aclose()

    asyncio.run(in_turn())
    return results


def test_an_interim_100_continue_is_skipped_for_the_answer_after_it(serve, hook_for):
    def continue_then_ok(conn):
        read_request(conn)
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        time.sleep(0.05)
        conn.sendall(OK)
        time.sleep(0.5)

    server = serve(continue_then_ok)
    assert hook_for(f"http://127.0.0.1:{server.port}").send_message(MESSAGE) == "m-1"


def test_an_interim_answer_never_lends_its_final_answer_to_the_next_request(serve):
    def answer(number: int) -> bytes:
        body = b'{"status":"success","data":{"id":"m-%d"}}' % number
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def script(conn):
        number = 0
        while read_request(conn):
            number += 1
            if number == 1:
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                time.sleep(0.2)
            conn.sendall(answer(number))

    async def two(client):
        return [await client.exchange(REQUEST), await client.exchange(REQUEST)]

    first, second = run(serve(script), two)
    assert first.body == b'{"status":"success","data":{"id":"m-1"}}'
    assert second.body == b'{"status":"success","data":{"id":"m-2"}}'


def test_the_read_timeout_counts_from_the_write_not_from_before_the_connect(serve, hook_for, tmp_path, monkeypatch):
    """A TLS handshake slower than the read timeout (within connect_timeout), then an answer at once."""
    cert_path, key_path = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)

    def slow_handshake_then_answer(conn):
        time.sleep(1.5)
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(5)
            if read_request(tls):
                tls.sendall(OK)
                time.sleep(0.3)

    server = serve(slow_handshake_then_answer)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert_path))
    hook = hook_for(f"https://127.0.0.1:{server.port}", timeout=1, connect_timeout=5, deadline=20, max_retries=0)
    assert hook.send_message(MESSAGE) == "m-1"


def test_a_slow_write_neither_spins_the_loop_nor_times_out_the_read_before_it(serve, monkeypatch):
    """The server starts reading a 4 MiB request after 1 s, then answers at once: the read timeout
    (0.3 s) runs after the request left, and the checks stay a sweep, not a busy loop."""
    sweeps = []
    sweep = loop_transport.LoopClient._check_times
    monkeypatch.setattr(loop_transport.LoopClient, "_check_times", lambda self: (sweeps.append(1), sweep(self)))

    def slow_reader(conn):
        time.sleep(1.0)
        if read_request(conn):
            conn.sendall(OK)
            time.sleep(0.3)

    big = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (4 << 20) + b"x" * (4 << 20)

    async def one(client):
        return await client.exchange(big)

    assert run(serve(slow_reader), one, read_timeout=0.3, deadline=10).status == 200
    assert len(sweeps) < 60, f"{len(sweeps)} sweeps in about a second"


def flood_then(conn: socket.socket, before: bytes, flood: memoryview, after: bytes) -> None:
    """Answer one request with ``before``, ``flood`` (one header's or trailer's value), then ``after``."""
    if read_request(conn):
        conn.sendall(before)
        for start in range(0, len(flood), 1 << 16):  # bounded: 48 MiB
            conn.sendall(flood[start : start + (1 << 16)])
        conn.sendall(after)
        time.sleep(0.5)


def peak_of_one_send(server: ScriptedServer, pepipost_conn, transport: str) -> tuple[object, int]:
    """One send with a 4 KiB answer cap: its result, and the most memory Python held meanwhile."""
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0, max_answer_bytes=4096, deadline=60, timeout=10)
    tracemalloc.start()
    try:
        [result] = sends(PepipostHook(), transport, 1)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_head_that_never_ends_is_cut_with_memory_bounded(serve, pepipost_conn, transport):
    after = b"\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    flood = memoryview(b"a" * (48 << 20))  # made before the memory is traced
    server = serve(lambda conn: flood_then(conn, b"HTTP/1.1 200 OK\r\nX-Flood: ", flood, after))
    result, peak = peak_of_one_send(server, pepipost_conn, transport)
    assert isinstance(result, PepipostOutcomeUnknownError), result
    assert peak < 8 << 20, f"peak {peak >> 20} MiB for a 4 KiB cap"


def test_a_503_with_two_retry_afters_is_read_alike_unknown_and_sent_once(serve, pepipost_conn, transport):
    """requests joins a repeated field ("1, 1"), which is no Retry-After: unknown, never resent."""
    requests_seen = []

    def twice(conn):
        while read_request(conn):
            requests_seen.append(1)
            conn.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nno")

    server = serve(twice)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=2, backoff_max=0.2)
    [result] = sends(PepipostHook(), transport, 1)
    assert isinstance(result, PepipostOutcomeUnknownError), result
    assert len(requests_seen) == 1


def test_a_503_retry_after_is_waited_for_then_sent(serve, pepipost_conn, transport):
    times = []

    def busy_once(conn):
        while read_request(conn):
            times.append(time.monotonic())
            if len(times) == 1:
                conn.sendall(b"HTTP/1.1 503 Busy\r\nRetry-After: 1\r\nContent-Length: 2\r\n\r\nno")
            else:
                conn.sendall(OK)

    server = serve(busy_once)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=2, backoff_max=0.2)
    assert sends(PepipostHook(), transport, 1) == ["m-1"]
    assert len(times) == 2 and times[1] - times[0] >= 0.95


CHUNKED_WITH_TRAILERS = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
    + b"%x\r\n%s\r\n" % (len(BODY), BODY)
    + b"0\r\nX-T: 1\r\nRetry-After: 3\r\n\r\n"
)
WHOLE_ANSWERS = {
    "connection-close": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "http-1.0-with-length": b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "chunked-with-trailers": CHUNKED_WITH_TRAILERS,
    "extra-bytes-in-the-same-packet": OK + b"GARBAGE",
    "a-second-answer-in-the-same-packet": OK + OK,
}


@pytest.mark.parametrize("answer", list(WHOLE_ANSWERS))
def test_odd_but_whole_answers_are_taken_once_each(serve, pepipost_conn, transport, answer):
    def script(conn):
        while read_request(conn):
            conn.sendall(WHOLE_ANSWERS[answer])
            time.sleep(0.05)

    server = serve(script)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0)
    assert sends(PepipostHook(), transport, 3, pause=0.1) == ["m-1"] * 3


def test_an_answer_byte_by_byte_then_a_half_close(serve, pepipost_conn, transport):
    def script(conn):
        if read_request(conn):
            for byte in OK:
                conn.sendall(bytes([byte]))
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.3)

    server = serve(script)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0)
    assert sends(PepipostHook(), transport, 3, pause=0.05) == ["m-1"] * 3
    assert server.accepted == 3


def test_a_reset_while_idle_sends_the_next_on_a_new_connection(serve, pepipost_conn, transport):
    def script(conn):
        if read_request(conn):
            conn.sendall(OK)
            time.sleep(0.05)
            reset(conn)

    server = serve(script)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0)
    assert sends(PepipostHook(), transport, 4, pause=0.2) == ["m-1"] * 4


def test_refused_then_listening_is_sent_once(pepipost_conn, transport):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound, not listening yet: connections are refused
    port = listener.getsockname()[1]
    got = []

    def listen_later():
        time.sleep(0.15)
        listener.listen(8)
        listener.settimeout(5)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            if read_request(conn):  # the one send
                got.append(1)
                conn.sendall(OK)

    server = threading.Thread(target=listen_later, daemon=True)
    server.start()
    pepipost_conn(f"http://127.0.0.1:{port}", max_retries=5, backoff_max=0.1)
    try:
        assert sends(PepipostHook(), transport, 1) == ["m-1"]
        server.join(timeout=10)
        assert got == [1]
    finally:
        listener.close()


def test_a_deadline_shorter_than_the_connect_timeout_ends_the_connect(pepipost_conn, transport):
    listener = socket.socket()  # a full backlog: the kernel completes no handshake
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):  # bounded: enough to fill a backlog of 0
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        pepipost_conn(f"http://127.0.0.1:{port}", max_retries=0, connect_timeout=3, deadline=0.5)
        started = time.monotonic()
        [result] = sends(PepipostHook(), transport, 1)
        took = time.monotonic() - started
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert isinstance(result, PepipostNotSentError), result
    assert took < 4


def test_trailers_that_never_end_are_cut_with_memory_bounded(serve, pepipost_conn, transport):
    before = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-T: " % (len(BODY), BODY)
    flood = memoryview(b"a" * (48 << 20))  # made before the memory is traced
    server = serve(lambda conn: flood_then(conn, before, flood, b"\r\n\r\n"))
    result, peak = peak_of_one_send(server, pepipost_conn, transport)
    assert isinstance(result, Exception), result  # never taken as the vendor's answer
    assert peak < 8 << 20, f"peak {peak >> 20} MiB for a 4 KiB cap"


def test_a_retry_after_in_trailers_is_not_read(serve, pepipost_conn, transport):
    """requests reads no trailer: a 503 whose Retry-After comes only after the body is unknown."""
    seen = []

    def busy_with_a_trailer(conn):
        while read_request(conn):
            seen.append(1)
            conn.sendall(
                b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\nRetry-After: 0\r\n\r\n"
            )

    server = serve(busy_with_a_trailer)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=2, backoff_max=0.05)
    [result] = sends(PepipostHook(), transport, 1)
    assert isinstance(result, PepipostOutcomeUnknownError), result
    assert len(seen) == 1


def test_a_chunked_answer_cut_before_its_last_chunk_is_unknown(serve, pepipost_conn, transport):
    def cut_short(conn):
        if read_request(conn):
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n"
                % (len(BODY), BODY)
            )
            conn.shutdown(socket.SHUT_WR)
            time.sleep(0.3)

    server = serve(cut_short)
    pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0)
    [result] = sends(PepipostHook(), transport, 1)
    assert isinstance(result, PepipostOutcomeUnknownError), result


@pytest.mark.parametrize("interim", [b"102 Processing", b"103 Early Hints"])
def test_an_interim_answer_other_than_100_is_never_a_refusal(serve, hook_for, interim):
    """http.client returns a 102 or 103 as the answer: it is unknown there (the real answer may be
    an acceptance), never rejected, which a later try would send again; the event loop reads on."""

    def interim_then_ok(conn):
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 " + interim + b"\r\n\r\n")
            time.sleep(0.05)
            conn.sendall(OK)
            time.sleep(0.3)

    server = serve(interim_then_ok)
    hook = hook_for(f"http://127.0.0.1:{server.port}", max_retries=0)
    try:
        result = hook.send_message(MESSAGE)
    except PepipostOutcomeUnknownError:
        result = "unknown"
    assert result == ("unknown" if type(hook) is PepipostHook else "m-1")  # threads, event loop


def test_a_101_answer_is_unknown_and_logs_no_error(serve, hook_for, caplog):
    def upgrade(conn):
        if read_request(conn):
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
            time.sleep(0.3)

    server = serve(upgrade)
    with pytest.raises(PepipostOutcomeUnknownError):
        hook_for(f"http://127.0.0.1:{server.port}", max_retries=0).send_message(MESSAGE)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_a_write_into_a_connection_the_peer_reset_is_not_sent(serve):
    """The reset arrives while the loop is busy (a blocking sleep), after the poll could see it
    and before the write: the write fails at once, so the request never left."""
    answered = threading.Event()

    def answer_then_reset(conn):
        read_request(conn)
        conn.sendall(OK)
        answered.set()
        time.sleep(0.1)
        reset(conn)

    server = serve(answer_then_reset, lambda conn: None)

    async def write_into_the_reset(client):
        await client.exchange(REQUEST)
        (connection,) = client._idle
        time.sleep(0.4)  # the reset lands unread
        exchange = loop_transport._Exchange(asyncio.get_running_loop().create_future(), 1e18, 0.0)
        connection.start(exchange, REQUEST)
        return exchange

    exchange = run(server, write_into_the_reset)
    assert not exchange.sent
    assert exchange.future.exception().fate is Fate.NOT_SENT
