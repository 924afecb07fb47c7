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
from collections.abc import AsyncIterator, Awaitable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from airflow_provider_pepipost.status.inbound import DeadLetter, WebhookBatch
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.store import StatusStore, open_store
from airflow_provider_pepipost.status.wal import checkpoints_for
from airflow_provider_pepipost.webhook.approvals import ApprovalResponder
from airflow_provider_pepipost.webhook.batching import IngestQueue, QueueFull
from airflow_provider_pepipost.webhook.deadlines import Deadlines
from airflow_provider_pepipost.webhook.logs import RefusalLog, Throttled, capped, describe_error, redact_access_logs
from airflow_provider_pepipost.webhook.metrics import CONTENT_TYPE, ReceiverMetrics
from airflow_provider_pepipost.webhook.payload import DEFAULT_STOP_SET, MAX_RAW_CHARS, body_key, letter, parse_body
from airflow_provider_pepipost.webhook.settings import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_COMMIT_LINGER,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUED_BODIES,
    DEFAULT_MAX_QUEUED_BYTES,
    STOP_WORDS_ENV,
    TOKEN_ENV,
    ReceiverSettings,
    parse_networks,
    stop_words_or_env,
)
from airflow_provider_pepipost.webhook.shortcut import ShortcutMiddleware

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["DEFAULT_BODY_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "STOP_WORDS_ENV", "TOKEN_ENV", "build_app", "create_app"]

TOKEN_HEADER = "X-Pepipost-Token"
_TOKEN_KEY = TOKEN_HEADER.lower().encode()  # as _first_headers keys it
WEBHOOK_PATH = "/webhook"  # under the app's path prefix
RETRY_AFTER_SECONDS = 5
_JSON_TYPES = ("application/json", "text/plain", "application/octet-stream")
_PARSE_INLINE_BYTES = 64 * 1024  # larger bodies are parsed in a thread, off the event loop
_MAX_INT_DIGITS = 400  # a JSON integer longer than this is read as infinity (no time is that long)


def _parse_int(text: str) -> int | float:
    # Python refuses to read integers of more than 4300 digits (a ValueError for the whole body).
    if len(text) <= _MAX_INT_DIGITS:
        return int(text)
    return float("-inf") if text.startswith("-") else float("inf")


# One decoder for every body: json.loads(text, parse_int=...) builds a new one each call.
_DECODER = json.JSONDecoder(parse_int=_parse_int)
# And one encoder for every answer, with the settings of Starlette's JSONResponse.
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


class JSONAnswer:
    """The report route's answer: the bytes and headers of Starlette's ``JSONResponse``, without
    building a response object's headers per body (the receiver answers thousands a second)."""

    __slots__ = ("body", "status_code")

    def __init__(self, content: Any, status_code: int = 200) -> None:
        self.body = _ENCODER.encode(content).encode()
        self.status_code = status_code

    @classmethod
    def counts(cls, result: IngestResult) -> JSONAnswer:
        """A stored body's answer, its counts: made once for each set of counts (they repeat), and
        shared, as nothing changes an answer once made."""
        key = tuple(result.__dict__.values())
        answer = _COUNTS_ANSWERS.get(key)
        if answer is None:
            if len(_COUNTS_ANSWERS) >= _COUNTS_ANSWERS_KEPT:
                _COUNTS_ANSWERS.clear()
            answer = _COUNTS_ANSWERS[key] = cls(result.to_dict())
        return answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-length", b"%d" % len(self.body)), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": self.status_code, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


# The answers of stored bodies, by their counts: one-event bodies have a handful of answers.
_COUNTS_ANSWERS: dict[tuple[int, ...], JSONAnswer] = {}
_COUNTS_ANSWERS_KEPT = 256


_BODY_DEADLINES = Deadlines()


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable`` or TimeoutError after ``seconds``; without a task or a timer of its own where
    Python allows (``webhook.deadlines``)."""
    if sys.version_info >= (3, 11):  # Task.uncancel; wait_for costs a task per request
        return await _BODY_DEADLINES.within(seconds, awaitable)
    return await asyncio.wait_for(awaitable, seconds)


def _first_headers(scope: Scope) -> dict[bytes, str]:
    """The request's headers by (lower-case) name, the first of each, as Starlette's ``Headers.get``
    reads them: one pass for every check of a report instead of a pass each."""
    return {name: value.decode("latin-1") for name, value in reversed(scope["headers"])}


def read_body(body: bytes, stop_words: frozenset[str] = DEFAULT_STOP_SET) -> tuple[WebhookBatch, str | None]:
    """Decode and sort one body; returns the batch and, when the body is unreadable as a whole, why."""
    key = body_key(body)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        reason = "body is not UTF-8"
        return _unreadable(letter(reason, body.decode("utf-8", "replace"), key, "body")), reason
    try:
        data = _DECODER.decode(text)
    except (ValueError, RecursionError) as err:
        reason = "JSON nested too deeply" if isinstance(err, RecursionError) else f"invalid JSON: {err}"
        return _unreadable(letter(reason, text[:MAX_RAW_CHARS], key, "body")), reason
    if not isinstance(data, dict):
        reason = f"body must be a JSON object, not {type(data).__name__}"
        return _unreadable(letter(reason, text[:MAX_RAW_CHARS], key, "body")), reason
    # An object of an unknown kind is acknowledged and kept aside: the vendor may post other
    # event types to the same URL, and refusing them could make it stop posting reports.
    return parse_body(data, key, stop_words), None


def _unreadable(dead_letter: DeadLetter) -> WebhookBatch:
    """A body unreadable as a whole: one dead letter, counted as one item."""
    return WebhookBatch(dead_letters=[dead_letter], dead_letter_items=1)


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
    commit_linger: float = DEFAULT_COMMIT_LINGER,
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
    :param commit_linger: seconds a group commit may wait for more bodies when the previous one
        carried several (never longer than that one took); default 0: commit at once.
    :param refusal_log_interval: refused requests are logged at most once per this many seconds.
    :param stop_words: text replies that opt their sender out of further messages (a list, or one
        comma-separated string); default ``$PEPIPOST_STOP_WORDS``, else STOP, UNSUBSCRIBE, STOP ALL.
        Compared without case, spaces or the punctuation around them.
    """
    return build_app(
        ReceiverSettings(
            token=token if token is not None else os.environ.get(TOKEN_ENV, ""),
            store_url=store_url,
            path_prefix=path_prefix,
            allowed_networks=parse_networks(allowed_ips),
            max_body_bytes=max_body_bytes,
            body_timeout=body_timeout,
            max_queued_bodies=max_queued_bodies,
            max_queued_bytes=max_queued_bytes,
            commit_linger=commit_linger,
            refusal_log_interval=refusal_log_interval,
            stop_words=stop_words_or_env(stop_words),
        )
    )


def build_app(settings: ReceiverSettings) -> FastAPI:
    """The receiver app for ``settings``: its routes under ``settings.path_prefix``."""
    receiver = Receiver(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Taps left pending by a restart are answered at once. (Mounted in the api-server by the
        # plugin, an app's lifespan does not run: there the first request starts the responder.)
        receiver.approvals.wake()
        yield

    app = FastAPI(
        title="Pepipost delivery-report receiver", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    report_endpoint = ReportEndpoint(receiver)
    app.include_router(receiver_router(receiver, report_endpoint), prefix=settings.path_prefix)
    app.add_middleware(
        ShortcutMiddleware, path=settings.path_prefix + WEBHOOK_PATH, method="POST", endpoint=report_endpoint
    )
    redact_access_logs()
    return app


class Receiver:
    """What the receiver's routes share: its settings, the store, the ingest queue and its logs.

    Its ``async`` methods that take the request are the routes' dependencies: each lets the
    request through or refuses it (an ``HTTPException`` with the status and a ``detail``).
    """

    def __init__(self, settings: ReceiverSettings) -> None:
        self.settings = settings
        self.expected_token = settings.token.encode()
        self.refusals = RefusalLog(settings.refusal_log_interval)
        self.metrics = ReceiverMetrics()
        self.store_failed = Throttled(level=logging.ERROR)
        self.dead_lettered, self.unhealthy = Throttled(), Throttled()
        self._store: StatusStore | None = None
        self.queue = IngestQueue(
            self.store,
            max_bodies=settings.max_queued_bodies,
            max_bytes=settings.max_queued_bytes,
            linger=settings.commit_linger,
        )
        self.approvals = ApprovalResponder(self.store, settings.airflow_api_conn_id)
        queue = self.queue
        self._queue_scraped = self.metrics.follow_queue(lambda: queue.held_bodies, lambda: queue.held_bytes)

    def store(self) -> StatusStore:
        # Opened, and its URL resolved, on first use: importing the plugin must not touch a database.
        if self._store is None:
            store = open_store(self.settings.store_conn_id, url=self.settings.store_url)
            if store.is_sqlite:  # its log checkpointed beside the commits rather than inside one
                checkpoints_for(store.engine)
            self._store = store
        return self._store

    def refuse(self, request: Request, status: int, detail: str, reason: str, **headers: str) -> HTTPException:
        """A refusal, counted (by ``reason``, one of ``metrics.REFUSAL_REASONS``) and logged at most
        once per interval with the request's source."""
        self.refusals.note(status, detail, _source(request))
        self.metrics.refused(reason)
        return HTTPException(status, detail, headers=headers or None)

    def show_queue(self) -> None:
        """The ingest queue's bodies and bytes, in the metrics (unless a scrape reads them itself)."""
        if not self._queue_scraped:
            self.metrics.queue_now(self.queue.held_bodies, self.queue.held_bytes)

    def token_ok(self, request: Request, headers: dict[bytes, str] | None = None) -> bool:
        if headers is None:
            headers = _first_headers(request.scope)
        given = headers.get(_TOKEN_KEY) or request.query_params.get("token") or ""
        auth = headers.get(b"authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:]
        return hmac.compare_digest(given.encode(), self.expected_token)

    # -- the checks a report meets, in order: each lets it through or raises its refusal -----------

    async def admitted_body(self, request: Request) -> bytes:
        """Every check of the POST route in order, then the body."""
        headers = _first_headers(request.scope)
        self.configured()
        self.allowed_source(request)
        self.valid_token(request, headers)
        self.json_content(request, headers)
        return await self.body(request, headers.get(b"content-length"))

    def configured(self) -> None:
        if not self.expected_token:
            self.metrics.refused("not_configured")
            raise HTTPException(503, f"the receiver has no token configured: set {TOKEN_ENV}")

    def allowed_source(self, request: Request) -> None:
        networks = self.settings.allowed_networks
        if networks is None:
            return
        try:
            address = ipaddress.ip_address(_source(request))
        except ValueError:
            address = None
        if address is None or not any(address in network for network in networks):
            raise self.refuse(request, 403, "source address not allowed", "source_not_allowed")

    def valid_token(self, request: Request, headers: dict[bytes, str]) -> None:
        if not self.token_ok(request, headers):
            raise self.refuse(request, 401, "missing or wrong token", "bad_token")

    def json_content(self, request: Request, headers: dict[bytes, str]) -> None:
        content_type = headers.get(b"content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            raise self.refuse(request, 415, f"content type {capped(content_type, 60)!r} is not JSON", "not_json")

    async def body(self, request: Request, declared: str | None) -> bytes:
        """The whole body, within the size and time limits, once the queue has room for it;
        ``declared``: its Content-Length header."""
        if self.queue.full():  # before reading the body: it would only take more memory
            raise self.busy(request)
        timeout = self.settings.body_timeout
        try:
            body = await _within(timeout, self._read_capped(request, declared))
        except asyncio.TimeoutError:
            raise self.refuse(
                request, 408, f"body not received within {timeout:g} s", "body_timeout", Connection="close"
            ) from None
        if body is None:
            raise self.refuse(request, 413, f"body larger than {self.settings.max_body_bytes} bytes", "too_large")
        return body

    async def reader_token(self, request: Request) -> None:
        """The token, for the routes that read the store's state."""
        if not self.expected_token or not self.token_ok(request):
            raise self.refuse(request, 401, "missing or wrong token", "bad_token")

    def busy(self, request: Request) -> HTTPException:
        # The vendor resends: better than a queue that grows with every body (about 20x its size).
        return self.refuse(
            request, 503, "the receiver is busy; send it again", "busy", **{"Retry-After": str(RETRY_AFTER_SECONDS)}
        )

    async def _read_capped(self, request: Request, declared: str | None) -> bytes | None:
        """The body, or None once it is larger than allowed. Read from the ASGI messages as
        Starlette's ``Request.stream`` reads them, without an async generator per body."""
        limit = self.settings.max_body_bytes
        if declared and declared.isdigit() and int(declared) > limit:
            return None
        chunks, size = [], 0
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            if message["type"] != "http.request":
                continue
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # -- what the routes do once a request is let in ---------------------------------------------

    async def file(self, request: Request, body: bytes) -> JSONAnswer:
        """Parse and store one body; answer with its counts once it is committed."""
        stops = self.settings.stop_words
        if len(body) > _PARSE_INLINE_BYTES:
            batch, unreadable = await run_in_threadpool(read_body, body, stops)
        else:
            batch, unreadable = read_body(body, stops)
        started = time.perf_counter()
        try:
            result = await self.queue.ingest(batch)
        except Exception as err:
            # Not stored, so not acknowledged: the vendor should send it again.
            self.metrics.store_errors.inc()
            self.store_failed("Pepipost webhook: could not store a body of %d events: %s", len(batch.events),
                              describe_error(err))  # fmt: skip
            return JSONAnswer({"detail": "could not store the batch; send it again"}, status_code=503)
        if any(message.context_message_id for message in batch.inbound):
            self.approvals.wake()  # a reply may answer an approval request
        else:
            self.approvals.start()  # in the plugin, the first body starts it: taps a restart left are answered
        # Past the per-body cap, many bad items share one dead letter: the answer counts items.
        result.dead_letters += batch.dead_letter_items - len(batch.dead_letters)
        self.metrics.stored(result, time.perf_counter() - started)
        if unreadable:
            raise self.refuse(request, 400, unreadable, "unreadable")
        if batch.dead_letters:
            self.dead_lettered("Pepipost webhook: %d item(s) kept as dead letters: %s", batch.dead_letter_items,
                               capped(batch.dead_letters[0].reason))  # fmt: skip
        return JSONAnswer.counts(result)

    def facts(self) -> dict[str, Any]:
        """Is the vendor reaching this receiver? What ``/status`` answers (a blocking read)."""
        last = self.store().last_report_at()
        return {
            "last_report_at": last,
            "seconds_since_last_report": None if last is None else round(time.time() - last, 1),
            "dead_letters": self.store().count_rows("pepipost_dead_letters"),
            "refused_since_start": dict(self.refusals.totals),
            "queued_bodies": self.queue.held_bodies,
        }


class ReportEndpoint:
    """``POST /webhook`` as an ASGI app: each refusal (an ``HTTPException``) answered here by FastAPI's
    own handler (``{"detail": ...}`` with its headers), so that no framework layer is needed around
    it (``webhook.shortcut``)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response: JSONAnswer | Response
        try:
            response = await self.answer(request)
        except HTTPException as refusal:
            response = await http_exception_handler(request, refusal)  # FastAPI's own answer to it
        except ClientDisconnect:
            return  # gone before its body arrived: nobody to answer
        await response(scope, receive, send)

    async def answer(self, request: Request) -> JSONAnswer:
        receiver = self.receiver
        body = await receiver.admitted_body(request)
        try:
            with receiver.queue.admit(len(body)):  # QueueFull when there is no room
                receiver.show_queue()
                return await receiver.file(request, body)
        except QueueFull:
            raise receiver.busy(request) from None
        finally:
            receiver.show_queue()


def receiver_router(receiver: Receiver, report_endpoint: ReportEndpoint) -> APIRouter:
    """The receiver's routes: the POST an ASGI endpoint, the readers' checks as dependencies."""
    router = APIRouter()
    # An ASGI app as the endpoint: no FastAPI request handler or dependency resolution for the
    # route every report takes. The app's shortcut serves it without the router (see build_app).
    router.routes.append(Route(WEBHOOK_PATH, report_endpoint, methods=["POST"], include_in_schema=False))

    @router.get("/healthz")
    async def healthz() -> JSONResponse:
        # No token needed, so nothing else in the answer: not the store's address, not the error.
        try:
            await run_in_threadpool(lambda: receiver.store().ping())
        except Exception as err:
            receiver.unhealthy("Pepipost webhook: health check failed: %s", describe_error(err))
            return JSONResponse({"status": "not ok"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @router.get("/status", dependencies=[Depends(receiver.reader_token)])
    async def status() -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(receiver.facts))
        except Exception as err:
            log.warning("Pepipost webhook: status read failed: %s", capped(type(err).__name__))
            return JSONResponse({"detail": "the store cannot be read"}, status_code=503)

    @router.get("/metrics", dependencies=[Depends(receiver.reader_token)])
    async def metrics() -> Response:
        # Multiprocess collection reads a file per worker: off the event loop.
        body = await run_in_threadpool(receiver.metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE)

    return router


def _source(request: Request) -> str:
    return request.client.host if request.client else ""
