"""How a campaign's requests are made: the event loop by default, the threads where a proxy
applies, the hook is not PepipostHook's own sender, or ``[pepipost] send_transport`` says so; on
either, no more than ``max_workers`` requests at once, and a campaign that raises sends nothing
more and gives back the rows it had not begun."""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import MediaMessage
from airflow_provider_pepipost.operators.campaign import CampaignSender, _LoopWorkers, _ThreadWorkers
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from tests.unit.hooks.test_loop_transport import ScriptedServer, read_body, read_request

TASK = TaskKey("dag", "run", "send")


class SlowVendor(ThreadingHTTPServer):
    """Answers every send with the vendor's success after ``delay``; counts sends and the most at once."""

    daemon_threads = True

    def __init__(self, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.delay = delay
        self.sends = 0
        self.in_flight = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: SlowVendor

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        vendor = self.server
        with vendor.lock:
            vendor.sends += 1
            vendor.in_flight += 1
            vendor.most_at_once = max(vendor.most_at_once, vendor.in_flight)
            number = vendor.sends
        time.sleep(vendor.delay)
        with vendor.lock:
            vendor.in_flight -= 1
        body = json.dumps({"status": "success", "data": {"id": f"m-{number}"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def slow_vendor(pepipost_conn) -> Iterator[SlowVendor]:
    vendor = SlowVendor(delay=0.1)
    thread = threading.Thread(target=vendor.serve_forever, daemon=True)
    thread.start()
    pepipost_conn(vendor.url)
    yield vendor
    vendor.shutdown()
    vendor.server_close()


def messages(count: int) -> Iterator[tuple[int, MediaMessage]]:
    return ((row, MediaMessage(f"9198000{row:05d}", "src", attachment_id="media-1")) for row in range(count))


def workers_of(hook: PepipostHook) -> type:
    workers = CampaignSender(hook, None, TASK, total=1)._workers()
    if isinstance(workers, _LoopWorkers):
        workers.loop.close()  # made, never started
    return type(workers)


class OwnSender(PepipostHook):
    def send_message(self, message):  # a subclass's own sending: the loop would go around it
        return super().send_message(message)


@pytest.mark.parametrize(
    ("setting", "proxy", "hook_class", "expected"),
    [
        (None, None, PepipostHook, _LoopWorkers),
        ("event_loop", None, PepipostHook, _LoopWorkers),
        (" Threads ", None, PepipostHook, _ThreadWorkers),
        (None, "http://proxy.internal:3128", PepipostHook, _ThreadWorkers),
        (None, None, OwnSender, _ThreadWorkers),
    ],
    ids=["default", "event-loop", "threads", "a-proxy-applies", "a-subclass-sends-its-own-way"],
)
def test_the_transport_a_campaign_sends_on(monkeypatch, pepipost_conn, setting, proxy, hook_class, expected):
    pepipost_conn("http://127.0.0.1:9")
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "AIRFLOW__PEPIPOST__SEND_TRANSPORT"):
        monkeypatch.delenv(name, raising=False)
    if setting is not None:
        monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", setting)
    if proxy is not None:
        monkeypatch.setenv("HTTP_PROXY", proxy)
    assert workers_of(hook_class()) is expected


def test_a_send_transport_that_does_not_exist_is_refused_naming_the_setting(monkeypatch, pepipost_conn):
    pepipost_conn("http://127.0.0.1:9")
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", "asyncio")
    with pytest.raises(PepipostConfigError, match=r"\[pepipost\] send_transport must be one of event_loop, threads"):
        workers_of(PepipostHook())


@pytest.mark.parametrize("transport", ["event_loop", "threads"])
def test_no_more_than_max_workers_requests_at_once(monkeypatch, slow_vendor, sqlite_url, transport):
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", transport)
    sender = CampaignSender(PepipostHook(pool_size=4), StatusStore(sqlite_url), TASK, total=40, max_workers=4)
    result = sender.run(messages(40))
    assert result.counts["accepted"] == 40 == slow_vendor.sends
    assert 2 <= slow_vendor.most_at_once <= 4  # concurrent, and bounded


class Boom(Exception):
    pass


@pytest.mark.parametrize("transport", ["event_loop", "threads"])
def test_a_campaign_that_raises_sends_nothing_more_and_gives_back_what_it_had_not_begun(
    monkeypatch, slow_vendor, sqlite_url, transport
):
    """Two workers, each send 0.3 s: row 2 is claimed and waiting for a worker when the engine's
    thread fails, after its third row (milliseconds, far inside the 0.3 s)."""
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", transport)
    slow_vendor.delay = 0.3
    calls = []

    def progress(_counts: object) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise Boom

    store = StatusStore(sqlite_url)
    sender = CampaignSender(
        PepipostHook(pool_size=2), store, TASK, total=50, max_workers=2, progress_interval=0, on_progress=progress
    )
    started = time.monotonic()
    with pytest.raises(Boom):
        sender.run(messages(50))
    assert time.monotonic() - started < 10
    sent = slow_vendor.sends
    time.sleep(0.5)
    assert slow_vendor.sends == sent <= 2  # nothing went out after the campaign returned
    states = [entry.state for entry in store.open_ledger(TASK).values()]
    # Rows 0-2 were claimed. Row 2 (and row 1, when it had not begun yet) is given back: a later
    # try sends it. What was sent is in the ledger as accepted.
    assert len(states) == 3 and states.count("accepted") == sent and states.count("not_sent") == 3 - sent


@pytest.mark.parametrize("transport", ["event_loop", "threads"])
def test_a_ca_bundle_that_is_not_there_leaves_the_row_not_sent(
    monkeypatch, pepipost_conn, sqlite_url, tmp_path, transport
):
    """No connection is even tried: the row is not_sent (a later try sends it), never unknown."""
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", transport)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
    pepipost_conn("https://127.0.0.1:9", max_retries=0)
    store = StatusStore(sqlite_url)
    result = CampaignSender(PepipostHook(), store, TASK, total=1, max_workers=2).run(messages(1))
    assert result.fatal is not None and "could not be made" in str(result.fatal)
    assert [entry.state for entry in store.open_ledger(TASK).values()] == ["not_sent"]


@pytest.mark.parametrize("transport", ["event_loop", "threads"])
def test_an_interim_100_continue_never_makes_a_row_resendable(monkeypatch, pepipost_conn, sqlite_url, transport):
    """The vendor (or a proxy before it) says 100 Continue, then accepts: one request, the row
    accepted, and the task's retry sends nothing again."""
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", transport)
    body = b'{"status":"success","data":{"id":"m-1"}}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    def continue_then_ok(conn):
        while read_request(conn):
            server.requests += 1
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            time.sleep(0.05)
            conn.sendall(answer)

    server = ScriptedServer(continue_then_ok)
    try:
        pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=0)
        store = StatusStore(sqlite_url)
        for _ in range(2):  # the task's first try, then its retry
            CampaignSender(PepipostHook(), store, TASK, total=1, max_workers=2, max_rejected_ratio=1.0).run(messages(1))
        assert server.requests == 1
        assert [entry.state for entry in store.open_ledger(TASK).values()] == ["accepted"]
    finally:
        server.close()


@pytest.mark.parametrize("transport", ["event_loop", "threads"])
def test_idle_connections_closed_at_random_never_send_a_row_twice(monkeypatch, pepipost_conn, sqlite_url, transport):
    """A vendor that closes idle connections (FIN or reset) after 0-30 ms, and takes 3 % of the
    requests without answering: whatever the timing, nobody is processed twice, and every request
    the vendor took is accepted or unknown in the ledger."""
    monkeypatch.setenv("AIRFLOW__PEPIPOST__SEND_TRANSPORT", transport)
    processed: Counter = Counter()
    lock = threading.Lock()
    chance = random.Random(7)  # seeded: the closes' pattern, not their timing, is fixed

    def flaky(conn):
        while True:  # bounded: each turn reads a request or ends the connection
            conn.settimeout(chance.uniform(0.0, 0.03))
            try:
                first = conn.recv(1, socket.MSG_PEEK)
            except TimeoutError:
                if chance.random() < 0.5:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            if not first:
                return
            conn.settimeout(5)
            body = read_body(conn)
            if body is None:
                return
            recipient = json.loads(body)["message"][0]["recipient_whatsapp"]
            with lock:
                processed[recipient] += 1
                number = sum(processed.values())
            if chance.random() < 0.03:
                return  # took it, no answer: unknown
            answer = json.dumps({"status": "success", "data": {"id": f"m-{number}"}}).encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    server = ScriptedServer(flaky)
    try:
        pepipost_conn(f"http://127.0.0.1:{server.port}", max_retries=5, backoff_max=0.05, keepalive_idle_max=10)
        store = StatusStore(sqlite_url)
        CampaignSender(PepipostHook(pool_size=16), store, TASK, total=400, max_workers=16).run(messages(400))
        assert max(processed.values()) == 1
        states = Counter(entry.state for entry in store.open_ledger(TASK).values())
        assert states["accepted"] + states["unknown"] >= len(processed)
    finally:
        server.close()
