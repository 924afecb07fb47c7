"""The delivery-report receiver: a FastAPI app that stores Pepipost's webhook batches before it answers.

Runs standalone (``pepipost-webhook``) or inside Airflow's API server through the provider's
plugin. Either way Airflow's auth does not cover it: every POST must carry the shared token.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost.status.store import StatusStore, default_store_url, redact_url
from airflow_provider_pepipost.webhook.batching import IngestQueue
from airflow_provider_pepipost.webhook.payload import MAX_RAW_CHARS, parse_body

log = logging.getLogger(__name__)

TOKEN_ENV = "PEPIPOST_WEBHOOK_TOKEN"
TOKEN_HEADER = "X-Pepipost-Token"
DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024
_JSON_TYPES = ("application/json", "text/plain", "application/octet-stream")
_TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s\"]+", re.IGNORECASE)


class _RedactTokens(logging.Filter):
    """Access logs print the query string; a token given as ?token=... must not reach them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1***", arg) if isinstance(arg, str) else arg for arg in record.args
            )
        record.msg = _TOKEN_IN_QUERY.sub(r"\1***", str(record.msg))
        return True


def redact_access_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "airflow.api_fastapi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())


def _parse_networks(allowed_ips: Sequence[str] | None) -> list[Any] | None:
    if not allowed_ips:
        return None
    return [ipaddress.ip_network(item.strip(), strict=False) for item in allowed_ips if item.strip()]


def create_app(
    store_url: str | None = None,
    token: str | None = None,
    *,
    path_prefix: str = "/pepipost",
    allowed_ips: Sequence[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The receiver app: ``POST {path_prefix}/webhook`` and ``GET {path_prefix}/healthz``.

    :param store_url: status store URL; default ``$PEPIPOST_STATUS_STORE_URL`` or SQLite in AIRFLOW_HOME.
    :param token: the shared secret every POST must carry (header ``X-Pepipost-Token``,
        ``Authorization: Bearer``, or query ``?token=``); default ``$PEPIPOST_WEBHOOK_TOKEN``.
        Without one, the receiver refuses every report (503) rather than accept them unchecked.
    :param path_prefix: "/pepipost" standalone; "" when mounted by the plugin under /pepipost.
    :param allowed_ips: optional source addresses or networks (the vendor's published IPs).
    :param max_body_bytes: larger bodies are refused with 413.
    """
    expected = (token if token is not None else os.environ.get(TOKEN_ENV, "")).encode()
    networks = _parse_networks(allowed_ips)
    url = store_url or default_store_url()
    app = FastAPI(title="Pepipost delivery-report receiver", docs_url=None, redoc_url=None, openapi_url=None)
    holder: dict[str, StatusStore] = {}
    redact_access_logs()

    def store() -> StatusStore:
        # Created on first use: importing the plugin must not touch a database.
        if "store" not in holder:
            holder["store"] = StatusStore(url)
        return holder["store"]

    ingest_queue = IngestQueue(store)

    def token_ok(request: Request) -> bool:
        given = request.headers.get(TOKEN_HEADER) or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if not given and auth[:7].lower() == "bearer ":
            given = auth[7:]
        return hmac.compare_digest(given.encode(), expected)

    def client_allowed(request: Request) -> bool:
        if networks is None:
            return True
        try:
            address = ipaddress.ip_address(request.client.host if request.client else "")
        except ValueError:
            return False
        return any(address in network for network in networks)

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

    async def reject_body(reason: str, raw: str) -> JSONResponse:
        await run_in_threadpool(store().record_dead_letter, reason, raw[:MAX_RAW_CHARS])
        log.warning("Pepipost webhook: body refused and kept as a dead letter: %s", reason)
        return JSONResponse({"detail": reason}, status_code=400)

    @app.post(f"{path_prefix}/webhook")
    async def receive(request: Request) -> JSONResponse:
        if not expected:
            return JSONResponse({"detail": f"the receiver has no token configured: set {TOKEN_ENV}"}, status_code=503)
        if not client_allowed(request):
            return JSONResponse({"detail": "source address not allowed"}, status_code=403)
        if not token_ok(request):
            return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
            return JSONResponse({"detail": f"content type {content_type!r} is not JSON"}, status_code=415)
        body = await read_capped(request)
        if body is None:
            return JSONResponse({"detail": f"body larger than {max_body_bytes} bytes"}, status_code=413)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return await reject_body("body is not UTF-8", body.decode("utf-8", "replace"))
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            reason = "JSON nested too deeply" if isinstance(err, RecursionError) else f"invalid JSON: {err}"
            return await reject_body(reason, text)
        if not isinstance(data, dict):
            return await reject_body(f"body must be a JSON object, not {type(data).__name__}", text)
        # An object of an unknown kind is acknowledged and kept aside: the vendor may post other
        # event types to the same URL, and refusing them could make it stop posting reports.
        batch = parse_body(data)
        try:
            result = await ingest_queue.ingest((batch.events, batch.rejected, batch.inbound))
        except Exception:
            # Not stored, so not acknowledged: the vendor should send it again.
            log.exception("Pepipost webhook: could not store a batch of %d events", len(batch.events))
            return JSONResponse({"detail": "could not store the batch; send it again"}, status_code=503)
        if batch.rejected:
            log.warning(
                "Pepipost webhook: %d item(s) kept as dead letters: %s", len(batch.rejected), batch.rejected[0][0]
            )
        return JSONResponse(result.to_dict())

    @app.get(f"{path_prefix}/healthz")
    async def healthz() -> JSONResponse:
        try:
            await run_in_threadpool(store().ping)
        except Exception as err:
            return JSONResponse({"status": "error", "detail": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "store": redact_url(url)})

    return app


def main(argv: list[str] | None = None) -> None:
    """``pepipost-webhook``: receive Pepipost delivery reports into the status store."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="pepipost-webhook", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8481)
    parser.add_argument(
        "--store-url", default=None, help="SQLAlchemy URL; default $PEPIPOST_STATUS_STORE_URL or SQLite"
    )
    parser.add_argument("--token", default=None, help=f"shared token; default ${TOKEN_ENV} (prefer the env var)")
    parser.add_argument("--allow-ip", action="append", help="allowed source address or network (repeat)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s webhook %(levelname)s %(message)s")
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        parser.error(f"a token is required: set {TOKEN_ENV} or pass --token")
    os.environ[TOKEN_ENV] = token  # worker processes read it from here
    if args.store_url:
        os.environ["PEPIPOST_STATUS_STORE_URL"] = args.store_url
    if args.allow_ip:
        os.environ["PEPIPOST_WEBHOOK_ALLOWED_IPS"] = ",".join(args.allow_ip)
    os.environ["PEPIPOST_WEBHOOK_MAX_BODY_BYTES"] = str(args.max_body_bytes)
    log.info("Pepipost webhook receiver on http://%s:%s/pepipost/webhook, store %s", args.host, args.port,
             redact_url(args.store_url or default_store_url()))  # fmt: skip
    uvicorn.run(
        "airflow_provider_pepipost.webhook.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
    )


def app_from_env() -> FastAPI:
    """The standalone app, configured from the environment (so that uvicorn workers can build it)."""
    allowed = os.environ.get("PEPIPOST_WEBHOOK_ALLOWED_IPS")
    return create_app(
        allowed_ips=allowed.split(",") if allowed else None,
        max_body_bytes=int(os.environ.get("PEPIPOST_WEBHOOK_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
    )


if __name__ == "__main__":
    main()
