"""The delivery-report receiver: a FastAPI app that stores Pepipost's webhook batches before it answers.

Runs standalone (``pepipost-webhook``, see ``webhook.cli``) or inside Airflow's API server through
the provider's plugin. Either way Airflow's auth does not cover it: every POST must carry the
shared token.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost.consent import stop_word_set
from airflow_provider_pepipost.status.store import StatusStore, open_store
from airflow_provider_pepipost.webhook.batching import (
    DEFAULT_MAX_QUEUED_BODIES,
    DEFAULT_MAX_QUEUED_BYTES,
    IngestQueue,
    QueueFull,
)
from airflow_provider_pepipost.webhook.logs import RefusalLog, Throttled, capped, describe_error, redact_access_logs
from airflow_provider_pepipost.webhook.payload import (
    DEFAULT_STOP_SET,
    MAX_RAW_CHARS,
    ParsedBatch,
    body_key,
    letter,
    parse_body,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_ENV = "PEPIPOST_WEBHOOK_TOKEN"
STOP_WORDS_ENV = "PEPIPOST_STOP_WORDS"
TOKEN_HEADER = "X-Pepipost-Token"
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
DEFAULT_BODY_TIMEOUT = 10.0  # seconds to receive a whole body once its headers are in
RETRY_AFTER_SECONDS = 5
_JSON_TYPES = ("application/json", "text/plain", "application/octet-stream")
_PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed in a thread, off the event loop
_MAX_INT_DIGITS = 400  # a JSON integer longer than this is read as infinity (no time is that long)


def _parse_int(text: str) -> int | float:
    # Python refuses to read integers of more than 4300 digits (a ValueError for the whole body).
    if len(text) <= _MAX_INT_DIGITS:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable`` or TimeoutError after ``seconds``; without a task of its own where Python allows."""
    if sys.version_info >= (3, 11):  # asyncio.timeout: no extra task per request, which wait_for costs
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


def _parse_networks(allowed_ips: Sequence[str] | None) -> list[Any] | None:
    if not allowed_ips:
        return None
    return [ipaddress.ip_network(item.strip(), strict=False) for item in allowed_ips if item.strip()]


def read_body(body: bytes, stop_words: frozenset[str] = DEFAULT_STOP_SET) -> tuple[ParsedBatch, str | None]:
    """Decode and sort one body; returns the batch and, when the body is unreadable as a whole, why."""
    key = body_key(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        reason = "body is not UTF-8"
        return ParsedBatch(dead_letters=[letter(reason, body.decode("utf-8", "replace"), key, "body")]), reason
    try:
        data = json.loads(text, parse_int=_parse_int)
    except (ValueError, RecursionError) as err:
        reason = "JSON nested too deeply" if isinstance(err, RecursionError) else f"invalid JSON: {err}"
        return ParsedBatch(dead_letters=[letter(reason, text[:MAX_RAW_CHARS], key, "body")]), reason
    if not isinstance(data, dict):
        reason = f"body must be a JSON object, not {type(data).__name__}"
        return ParsedBatch(dead_letters=[letter(reason, text[:MAX_RAW_CHARS], key, "body")]), reason
    # An object of an unknown kind is acknowledged and kept aside: the vendor may post other
    # event types to the same URL, and refusing them could make it stop posting reports.
    return parse_body(data, key, stop_words), None


def create_app(
    store_url: str | None = None,
    token: str | None = None,
    *,
    path_prefix: str = "/pepipost",
    allowed_ips: Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    max_queued_bodies: int = DEFAULT_MAX_QUEUED_BODIES,
    max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
    refusal_log_interval: float = 60.0,
    stop_words: str | Sequence[str] | None = None,
) -> FastAPI:
    """The receiver app: ``POST {path_prefix}/webhook``, ``GET {path_prefix}/healthz`` and ``/status``.

    :param store_url: status store URL; default: the store resolver (``$PEPIPOST_STATUS_STORE_URL``,
        ``[pepipost]`` config, else SQLite in AIRFLOW_HOME).
    :param token: the shared secret every POST must carry (header ``X-Pepipost-Token``,
        ``Authorization: Bearer``, or query ``?token=``); default ``$PEPIPOST_WEBHOOK_TOKEN``.
        Without one, the receiver refuses every report (503) rather than accept them unchecked.
    :param path_prefix: "/pepipost" standalone; "" when mounted by the plugin under /pepipost.
    :param allowed_ips: optional source addresses or networks (the vendor's published IPs). The
        address is the TCP peer's, unless the server was told to trust a proxy's forwarded headers.
    :param max_body_bytes: larger bodies are refused with 413.
    :param body_timeout: a body not received within this many seconds is refused with 408.
    :param max_queued_bodies: bodies admitted and not yet answered; beyond it 503 with Retry-After.
    :param max_queued_bytes: the same bound in bytes of body.
    :param refusal_log_interval: refused requests are logged at most once per this many seconds.
    :param stop_words: text replies that opt their sender out of further messages (a list, or one
        comma-separated string); default ``$PEPIPOST_STOP_WORDS``, else STOP, UNSUBSCRIBE, STOP ALL.
        Compared without case, spaces or the punctuation around them.
    """
    stops = stop_word_set(stop_words if stop_words is not None else os.environ.get(STOP_WORDS_ENV) or None)
    expected = (token if token is not None else os.environ.get(TOKEN_ENV, "")).encode()
    networks = _parse_networks(allowed_ips)
    app = FastAPI(title="Pepipost delivery-report receiver", docs_url=None, redoc_url=None, openapi_url=None)
    holder: dict[str, StatusStore] = {}
    refusals = RefusalLog(refusal_log_interval)
    store_failed, dead_lettered, unhealthy = Throttled(level=logging.ERROR), Throttled(), Throttled()
    redact_access_logs()

    def store() -> StatusStore:
        # Created, and its URL resolved, on first use: importing the plugin must not touch a database.
        if "store" not in holder:
            holder["store"] = open_store(url=store_url)
        return holder["store"]

    ingest_queue = IngestQueue(store, max_bodies=max_queued_bodies, max_bytes=max_queued_bytes)

    def token_ok(request: Request) -> bool:
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:]
        return hmac.compare_digest(given.encode(), expected)

    def source(request: Request) -> str:
        return request.client.host if request.client else ""

    def client_allowed(request: Request) -> bool:
        if networks is None:
            return True
        try:
            address = ipaddress.ip_address(source(request))
        except ValueError:
            return False
        return any(address in network for network in networks)

    def refuse(request: Request, status: int, detail: str, **headers: str) -> JSONResponse:
        refusals.note(status, detail, source(request))
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    def busy(request: Request) -> JSONResponse:
        # The vendor resends: better than a queue that grows with every body (about 20x its size).
        return refuse(request, 503, "the receiver is busy; send it again", **{"Retry-After": str(RETRY_AFTER_SECONDS)})

    async def read_capped(request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post(f"{path_prefix}/webhook")
    async def receive(request: Request) -> JSONResponse:
        if not expected:
            return JSONResponse({"detail": f"the receiver has no token configured: set {TOKEN_ENV}"}, status_code=503)
        if not client_allowed(request):
            return refuse(request, 403, "source address not allowed")
        if not token_ok(request):
            return refuse(request, 401, "missing or wrong token")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            return refuse(request, 415, f"content type {capped(content_type, 60)!r} is not JSON")
        if ingest_queue.full():  # before reading the body: it would only take more memory
            return busy(request)
        try:
            body = await _within(body_timeout, read_capped(request))
        except asyncio.TimeoutError:
            return refuse(request, 408, f"body not received within {body_timeout:g} s", Connection="close")
        if body is None:
            return refuse(request, 413, f"body larger than {max_body_bytes} bytes")
        try:
            with ingest_queue.admit(len(body)):
                return await store_body(request, body)
        except QueueFull:
            return busy(request)

    async def store_body(request: Request, body: bytes) -> JSONResponse:
        if len(body) > _PARSE_INLINE_BYTES:
            batch, unreadable = await run_in_threadpool(read_body, body, stops)
        else:
            batch, unreadable = read_body(body, stops)
        try:
            result = await ingest_queue.ingest((batch.events, batch.dead_letters, batch.inbound))
        except Exception as err:
            # Not stored, so not acknowledged: the vendor should send it again.
            store_failed("Pepipost webhook: could not store a body of %d events: %s", len(batch.events),
                         describe_error(err))  # fmt: skip
            return JSONResponse({"detail": "could not store the batch; send it again"}, status_code=503)
        if unreadable:
            return refuse(request, 400, unreadable)
        # Past the per-body cap, many bad items share one dead letter: the answer counts items.
        result.dead_letters += batch.dead_letter_items - len(batch.dead_letters)
        if batch.dead_letters:
            dead_lettered("Pepipost webhook: %d item(s) kept as dead letters: %s", batch.dead_letter_items,
                          capped(batch.dead_letters[0][0]))  # fmt: skip
        return JSONResponse(result.to_dict())

    @app.get(f"{path_prefix}/healthz")
    async def healthz() -> JSONResponse:
        # No token needed, so nothing else in the answer: not the store's address, not the error.
        try:
            await run_in_threadpool(lambda: store().ping())
        except Exception as err:
            unhealthy("Pepipost webhook: health check failed: %s", describe_error(err))
            return JSONResponse({"status": "not ok"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get(f"{path_prefix}/status")
    async def status(request: Request) -> JSONResponse:
        """Is the vendor reaching this receiver? Behind the token."""
        if not expected or not token_ok(request):
            return refuse(request, 401, "missing or wrong token")

        def read() -> dict[str, Any]:
            last = store().last_report_at()
            return {
                "last_report_at": last,
                "seconds_since_last_report": None if last is None else round(time.time() - last, 1),
                "dead_letters": store().count_rows("pepipost_dead_letters"),
            }

        try:
            facts = await run_in_threadpool(read)
        except Exception as err:
            log.warning("Pepipost webhook: status read failed: %s", capped(type(err).__name__))
            return JSONResponse({"detail": "the store cannot be read"}, status_code=503)
        facts["refused_since_start"] = dict(refusals.totals)
        facts["queued_bodies"] = ingest_queue.held_bodies
        return JSONResponse(facts)

    return app


def app_from_env() -> FastAPI:
    """The standalone app, configured from the environment (so that uvicorn workers can build it)."""
    from airflow_provider_pepipost.webhook.cli import app_from_env as build

    return build()


def main(argv: list[str] | None = None) -> None:
    """``pepipost-webhook``: receive Pepipost delivery reports into the status store (see ``webhook.cli``)."""
    from airflow_provider_pepipost.webhook.cli import main as run

    run(argv)


if __name__ == "__main__":
    main()
