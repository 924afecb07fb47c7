"""``pepipost-webhook``: run the receiver (the default), or ``import FILE`` of reports kept elsewhere.

The server runs under uvicorn with the limits a public endpoint needs: deadlines on request heads
and bodies, a cap on concurrent connections, and forwarded headers believed only from the proxies
named by ``--trusted-proxy``. Settings travel to uvicorn's worker processes in the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
from typing import Any

from fastapi import FastAPI

from airflow_provider_pepipost.status.resolver import STORE_URL_ENV, store_source
from airflow_provider_pepipost.status.store import open_store
from airflow_provider_pepipost.webhook.app import build_app
from airflow_provider_pepipost.webhook.metrics import MULTIPROC_DIR_ENV
from airflow_provider_pepipost.webhook.server import DEFAULT_HEAD_TIMEOUT, HEAD_TIMEOUT_ENV, GuardedHttpProtocol
from airflow_provider_pepipost.webhook.settings import (
    ALLOWED_IPS_ENV,
    BODY_TIMEOUT_ENV,
    COMMIT_LINGER_ENV,
    CONNECTIONS_BEYOND_QUEUE,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_COMMIT_LINGER,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUED_BODIES,
    MAX_BODY_BYTES_ENV,
    MAX_QUEUED_BODIES_ENV,
    STOP_WORDS_ENV,
    STORE_CONN_ENV,
    TOKEN_ENV,
    ReceiverSettings,
    seconds_problem,
)

log = logging.getLogger("airflow_provider_pepipost.webhook")

DEFAULT_KEEP_ALIVE = 5.0
# Open files a worker needs besides its connections: the store's pool (64), logs, the listening socket.
OTHER_OPEN_FILES = 128


def app_from_env() -> FastAPI:
    """The standalone app, configured from the environment (so that uvicorn workers can build it)."""
    return build_app(ReceiverSettings.from_env())


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store-conn-id",
        default=None,
        help="Airflow connection of the status store (preferred: no password in the process list)",
    )
    parser.add_argument("--store-url", default=None, help=f"SQLAlchemy URL; prefer --store-conn-id or ${STORE_URL_ENV}")


def serve(argv: list[str] | None = None) -> None:
    """Receive Pepipost delivery reports into the status store."""
    parser = _serve_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s webhook %(levelname)s %(message)s")
    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        parser.error(f"a token is required: set {TOKEN_ENV} or pass --token")
    _hand_over(args, token)
    args.limit_concurrency = limit_concurrency(args)
    open_file_room(args.limit_concurrency)
    source = "--store-url" if args.store_url else store_source(args.store_conn_id)
    log.info("Pepipost webhook receiver on http://%s:%s/pepipost/webhook, store from %s", args.host, args.port,
             source)  # fmt: skip
    _run_uvicorn(args)


def _seconds(text: str) -> float:
    """An option's number of seconds: finite, above 0."""
    value = _number(text, float, "a finite number of seconds above 0")
    if problem := seconds_problem(value):
        raise argparse.ArgumentTypeError(problem)
    return value


def _seconds_or_none(text: str) -> float:
    """An option's number of seconds that may be 0 (none): finite, not negative."""
    value = _number(text, float, "a finite number of seconds, 0 or above")
    if not 0 <= value < math.inf:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or above, not {value!r}")
    return value


def _linger(text: str) -> float:
    """--commit-linger: 0 or above; infinite means as long as the last commit took (its bound)."""
    value = _number(text, float, "a number of seconds, 0 or above")
    if not value >= 0:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or above, not {value!r}")
    return value


def _count(text: str) -> int:
    """An option's count or size: a whole number above 0."""
    value = _number(text, int, "a whole number above 0")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0, not {value}")
    return value


def _number(text: str, kind: type[float] | type[int], wanted: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        # argparse would name this function ("invalid _count value"): say what the option wants.
        raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}") from None


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pepipost-webhook", description=serve.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8481)
    _store_options(parser)
    parser.add_argument("--token", default=None, help=f"shared token; default ${TOKEN_ENV} (prefer the env var)")
    parser.add_argument("--allow-ip", action="append", help="allowed source address or network (repeat)")
    parser.add_argument(
        "--trusted-proxy",
        action="append",
        help="address of a proxy whose X-Forwarded-For is believed (repeat); default none: the TCP peer counts",
    )
    parser.add_argument("--max-body-bytes", type=_count, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument(
        "--head-timeout", type=_seconds, default=DEFAULT_HEAD_TIMEOUT, help="seconds for request headers"
    )
    parser.add_argument(
        "--body-timeout", type=_seconds, default=DEFAULT_BODY_TIMEOUT, help="seconds for a request body"
    )
    parser.add_argument(
        "--keep-alive", type=_seconds_or_none, default=DEFAULT_KEEP_ALIVE, help="idle seconds between requests; 0: none"
    )
    parser.add_argument(
        "--limit-concurrency",
        type=_count,
        default=None,
        help="connections per worker beyond which uvicorn answers 503 itself; default --max-queued-bodies + "
        f"{CONNECTIONS_BEYOND_QUEUE}, so that the queue bound is reached first",
    )
    parser.add_argument(
        "--max-queued-bodies",
        type=_count,
        default=DEFAULT_MAX_QUEUED_BODIES,
        help="bodies admitted and not yet answered, per worker; beyond it 503 busy with Retry-After",
    )
    parser.add_argument(
        "--commit-linger",
        type=_linger,
        default=DEFAULT_COMMIT_LINGER,
        help="seconds a group commit may wait for more bodies when the last one carried several (never longer "
        "than it took); default 0: commit at once. Pays only when the receiver's CPU is the bottleneck",
    )
    parser.add_argument("--workers", type=_count, default=1)
    parser.add_argument(
        "--stop-words",
        default=None,
        help=f"comma-separated replies that opt a sender out; default ${STOP_WORDS_ENV}, else STOP,UNSUBSCRIBE,"
        "STOP ALL",
    )
    return parser


def _hand_over(args: argparse.Namespace, token: str) -> None:
    """Put the settings where every worker process reads them: the environment (``ReceiverSettings.from_env``)."""
    os.environ[TOKEN_ENV] = token
    if args.store_url:
        os.environ[STORE_URL_ENV] = args.store_url
    if args.store_conn_id:
        os.environ[STORE_CONN_ENV] = args.store_conn_id
    if args.allow_ip:
        os.environ[ALLOWED_IPS_ENV] = ",".join(args.allow_ip)
    os.environ[MAX_BODY_BYTES_ENV] = str(args.max_body_bytes)
    os.environ[BODY_TIMEOUT_ENV] = str(args.body_timeout)
    os.environ[MAX_QUEUED_BODIES_ENV] = str(args.max_queued_bodies)
    os.environ[COMMIT_LINGER_ENV] = str(args.commit_linger)
    if args.stop_words:
        os.environ[STOP_WORDS_ENV] = args.stop_words
    os.environ[HEAD_TIMEOUT_ENV] = str(args.head_timeout)  # for worker processes, which import anew
    GuardedHttpProtocol.head_timeout = args.head_timeout  # for this one, which has imported it already


def limit_concurrency(args: argparse.Namespace) -> int:
    """Uvicorn's cap on connections per worker: as given, else room for a full queue and then some.

    A queued body holds its connection until it is answered, so under a cap at or below the queue
    bound uvicorn's own 503 (which the receiver never sees nor counts) comes first.
    """
    if args.limit_concurrency is not None:
        if args.limit_concurrency <= args.max_queued_bodies:
            log.warning("--limit-concurrency %d is not above --max-queued-bodies %d: uvicorn refuses "
                        "requests (503) before the queue bound is reached", args.limit_concurrency,
                        args.max_queued_bodies)  # fmt: skip
        return args.limit_concurrency
    return args.max_queued_bodies + CONNECTIONS_BEYOND_QUEUE


def open_file_room(connections: int) -> int:
    """Raise this process's soft limit of open files (inherited by its workers) to what ``connections``
    need, within the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + OTHER_OPEN_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft != resource.RLIM_INFINITY and soft < wanted:
        log.warning("open files limited to %d, below the %d that %d connections need: past it new "
                    "connections wait in the kernel's backlog", soft, wanted, connections)  # fmt: skip
    return soft


def _run_uvicorn(args: argparse.Namespace) -> None:
    trusted = [address.strip() for address in args.trusted_proxy or [] if address.strip()]
    # Each worker process counts apart, and a scrape reaches one of them: their counts go to a
    # folder every worker reads (unless the user named one), removed when the receiver stops.
    metrics_dir = None
    if args.workers > 1 and not os.environ.get(MULTIPROC_DIR_ENV):
        metrics_dir = os.environ[MULTIPROC_DIR_ENV] = tempfile.mkdtemp(prefix="pepipost-webhook-metrics-")
    try:
        _uvicorn_run(args, trusted)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _uvicorn_run(args: argparse.Namespace, trusted: list[str]) -> None:
    import uvicorn

    uvicorn.run(
        "airflow_provider_pepipost.webhook.cli:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        access_log=False,
        log_level="warning",
        http=GuardedHttpProtocol
        if args.workers == 1
        else "airflow_provider_pepipost.webhook.server:GuardedHttpProtocol",
        # Uvicorn believes X-Forwarded-For from 127.0.0.1 by default, which lets any local client
        # pass --allow-ip. Forwarded headers count only from the proxies named here.
        proxy_headers=bool(trusted),
        forwarded_allow_ips=",".join(trusted) if trusted else None,
        timeout_keep_alive=args.keep_alive,
        limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=64 * 1024,
    )


def import_file(argv: list[str]) -> None:
    """Load delivery reports from a JSON Lines file through the receiver's validation into the store."""
    from airflow_provider_pepipost.webhook.importer import import_reports

    parser = argparse.ArgumentParser(prog="pepipost-webhook import", description=import_file.__doc__)
    parser.add_argument("file", help="a report object (delivery_status[] item) or a whole body per line; - for stdin")
    _store_options(parser)
    args = parser.parse_args(argv)
    store = open_store(args.store_conn_id, url=args.store_url)
    if args.file == "-":
        totals = import_reports(sys.stdin, store)
    else:
        with open(args.file, encoding="utf-8", errors="surrogateescape") as lines:
            totals = import_reports(lines, store)
    print(json.dumps(totals))


def main(argv: list[str] | None = None) -> None:
    """``pepipost-webhook [options]`` serves; ``pepipost-webhook import FILE`` loads reports from a file."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["import"]:
        import_file(argv[1:])
    else:
        serve(argv)
