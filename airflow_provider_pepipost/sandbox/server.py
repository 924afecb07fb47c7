"""Run the sandbox: in a thread for tests and benchmarks, or as the ``pepipost-sandbox`` command."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import uvicorn
from fastapi import Request

from airflow_provider_pepipost.sandbox.app import SandboxState, create_sandbox_app
from airflow_provider_pepipost.sandbox.reports import ReportSender
from airflow_provider_pepipost.sandbox.scenario import Scenario

log = logging.getLogger(__name__)

DEFAULT_API_KEY = "sandbox-api-key"
DEFAULT_SOURCE = "sandbox-source"
BACKLOG = 2048


class SandboxServer:
    """A Pepipost-compatible API on 127.0.0.1, with delivery reports posted to ``webhook_url``.

    >>> with SandboxServer(webhook_url=receiver_url) as sandbox:
    ...     sandbox.url  # base URL for the connection's host
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        *,
        api_key: str = DEFAULT_API_KEY,
        sources: Iterable[str] | None = frozenset({DEFAULT_SOURCE}),
        media_ids: Iterable[str] | None = None,
        webhook_url: str | None = None,
        webhook_headers: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        record_bodies: bool = True,
    ) -> None:
        self.scenario = scenario or Scenario()
        self.reports = ReportSender(self.scenario, webhook_url, webhook_headers)
        self.state = SandboxState(
            scenario=self.scenario,
            api_key=api_key,
            sources=set(sources) if sources is not None else None,
            media_ids=set(media_ids) if media_ids is not None else None,
            record_bodies=record_bodies,
            reports=self.reports if webhook_url else None,
        )
        self.state.drop_connection = self._drop_connection
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _drop_connection(self, request: Request) -> None:
        """Close the request's TCP connection without an answer, as a dying load balancer would."""
        client = tuple(request.scope.get("client") or ())
        for protocol in list(self._server.server_state.connections if self._server else ()):
            if tuple(getattr(protocol, "client", None) or ()) == client:
                protocol.transport.abort()

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
            sock.listen(BACKLOG)  # connections wait in the queue until uvicorn serves them
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    def _config(self) -> uvicorn.Config:
        return uvicorn.Config(
            create_sandbox_app(self.state),
            log_level="warning",
            access_log=False,
            # uvicorn hands it to loop.call_later, which takes fractions of a second; its annotation says int.
            timeout_keep_alive=self.scenario.keep_alive_timeout,  # type: ignore[arg-type]
            backlog=BACKLOG,
        )

    def start(self) -> SandboxServer:
        self._socket = self._bind()
        self._server = uvicorn.Server(self._config())
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="pepipost-sandbox", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.01)
        self.reports.start()
        return self

    def listen(self) -> SandboxServer:
        """Bind the port now (``OSError`` when it is taken), so that ``url`` is the real address."""
        self._listening_socket()
        return self

    def _listening_socket(self) -> socket.socket:
        if self._socket is None:
            self._socket = self._bind()
        return self._socket

    def serve_forever(self) -> None:
        """Run in the foreground (the console script) until SIGINT or SIGTERM."""
        sock = self._listening_socket()
        self._server = uvicorn.Server(self._config())
        self.reports.start()
        try:
            self._server.run(sockets=[sock])
        finally:
            self.reports.stop(drain_seconds=0)

    def stop(self, drain_seconds: float = 0.0) -> None:
        """Stop; first wait up to ``drain_seconds`` for queued reports to be posted."""
        self.reports.stop(drain_seconds)
        if self._server:
            self._server.should_exit = True
        if self._thread:
            self._thread.join(timeout=10)
        if self._socket:
            self._socket.close()

    def wait_for_reports(self, timeout: float = 30.0) -> bool:
        """Wait until every queued delivery report has been posted (or given up on)."""
        deadline = time.monotonic() + timeout
        while self.reports.pending():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        time.sleep(self.scenario.batch_interval * 2)  # the batch in the air
        return True

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """``pepipost-sandbox``: a local Pepipost WhatsApp API for demos and tests."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s sandbox %(levelname)s %(message)s")
    server = _server_from(args)
    _listen_or_exit(server, args.host, args.port)
    # Only now that the port is ours: the address printed is the one that answers.
    log.info("Pepipost sandbox on %s, reports to %s", server.url, args.webhook_url or "nowhere")
    server.serve_forever()


def _parser() -> argparse.ArgumentParser:
    defaults = Scenario().to_dict()
    parser = argparse.ArgumentParser(
        prog="pepipost-sandbox",
        description=main.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scenario keys (JSON object for --scenario) and their defaults:\n"
        + "\n".join(f"  {name} = {json.dumps(value)}" for name, value in defaults.items()),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8480, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("PEPIPOST_SANDBOX_API_KEY", DEFAULT_API_KEY),
        help=f"the API key it accepts (default: $PEPIPOST_SANDBOX_API_KEY, else {DEFAULT_API_KEY!r})",
    )
    parser.add_argument("--source", action="append", help=f"valid source id (repeat); default: {DEFAULT_SOURCE!r}")
    parser.add_argument("--any-source", action="store_true", help="accept any source id")
    parser.add_argument("--media-id", action="append", help="valid attachment id (repeat); default: any")
    parser.add_argument("--webhook-url", help="where to post delivery reports (default: nowhere)")
    parser.add_argument(
        "--webhook-token",
        default=os.environ.get("PEPIPOST_WEBHOOK_TOKEN"),
        help="sent as X-Pepipost-Token with every report (default: $PEPIPOST_WEBHOOK_TOKEN)",
    )
    parser.add_argument(
        "--scenario", default="", help="JSON object of scenario keys (below), or @file.json; default: all defaults"
    )
    parser.add_argument("--no-record", action="store_true", help="keep counters only (long benchmarks)")
    return parser


def _server_from(args: argparse.Namespace) -> SandboxServer:
    """The server the command line asks for; ``--scenario @file.json`` read from the file."""
    text = args.scenario
    if text.startswith("@"):
        with open(text[1:]) as handle:
            text = handle.read()
    return SandboxServer(
        Scenario.from_json(text),
        api_key=args.api_key,
        sources=None if args.any_source else set(args.source or [DEFAULT_SOURCE]),
        media_ids=set(args.media_id) if args.media_id else None,
        webhook_url=args.webhook_url,
        webhook_headers={"X-Pepipost-Token": args.webhook_token} if args.webhook_token else None,
        host=args.host,
        port=args.port,
        record_bodies=not args.no_record,
    )


def _listen_or_exit(server: SandboxServer, host: str, port: int) -> None:
    """Take the port, or exit non-zero saying why, without a traceback."""
    try:
        server.listen()
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise SystemExit(
                f"pepipost-sandbox: port {port} on {host} is taken (by another sandbox?): stop that "
                "process, or choose another port with --port"
            ) from None
        raise SystemExit(f"pepipost-sandbox: cannot listen on {host}:{port}: {err.strerror}") from None


if __name__ == "__main__":
    main()
