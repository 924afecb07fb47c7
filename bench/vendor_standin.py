"""A stand-in of Pepipost's send endpoint that is not the bottleneck: asyncio on uvloop, httptools.

The sandbox (a FastAPI app that validates every field) tops out near 600 msg/s, below what one send
task reaches: a bench against it would measure the sandbox. This server answers every POST with
the vendor's success shape after a fixed latency, on one event loop with no framework, so its own
ceiling (printed by the send bench from its CPU per request) is far above the client's.

Run alone, from the repository: python -m bench.vendor_standin --port 8090 --latency 0.05
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import httptools
import uvloop

_ids = itertools.count(1)


class VendorProtocol(asyncio.Protocol):
    """One keep-alive connection: each request answered ``latency`` seconds after it arrived whole."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        body = b'{"status":"success","data":{"id":"standin-%d"}}' % next(_ids)
        answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        if self.latency:
            self.loop.call_later(self.latency, self._write, answer)
        else:
            self._write(answer)

    def _write(self, answer: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(port: int, latency: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: VendorProtocol(latency), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency", type=float, default=0.05)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.latency))


if __name__ == "__main__":
    main()
