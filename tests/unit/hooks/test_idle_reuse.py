"""The idle bound (connection extra ``keepalive_idle_max``), against a keep-alive server that
counts the connections it accepts: a pooled connection idle longer than the bound is not reused,
one idle for less is. Timed by sleeps far from the bound on either side, not by load."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from airflow_provider_pepipost.hooks.pepipost import PepipostHook

ANSWER = json.dumps({"status": "success", "message": "Request received successfully.", "data": {"id": "m-1"}})


class CountingServer:
    """HTTP/1.1 on 127.0.0.1 that keeps connections open and answers every POST with a send's success."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop.is_set():  # bounded by the test's close()
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn: socket.socket) -> None:
        body = ANSWER.encode()
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        buffer = b""
        with conn:
            conn.settimeout(10)
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = next(
                    (
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                while len(buffer) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer[length:]
                conn.sendall(answer)

    def close(self) -> None:
        self._stop.set()
        self._acceptor.join(timeout=5)  # out of accept() before its socket goes
        self.listener.close()


@pytest.fixture
def counting_server() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


def test_a_connection_idle_past_the_bound_is_not_reused_and_one_idle_less_is(counting_server, pepipost_conn):
    pepipost_conn(f"http://127.0.0.1:{counting_server.port}", keepalive_idle_max=0.5)
    hook = PepipostHook()
    body = {"message": [{"recipient": "919800000001", "type": "text", "text": "hi"}]}
    try:
        hook.post_message_body(body)
        time.sleep(0.05)  # well under the bound: the same connection
        hook.post_message_body(body)
        assert counting_server.accepted == 1
        time.sleep(1.0)  # twice the bound: a new one, though the server kept the old one open
        hook.post_message_body(body)
        assert counting_server.accepted == 2
    finally:
        hook.close()
