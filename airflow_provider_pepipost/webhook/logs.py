"""What the receiver logs: tokens redacted from access logs, and refused requests counted, not flooded.

A wrong token in the vendor's dashboard loses every report; the only trace is the 401s, so they
are logged, with the source address and a count, at most one line per interval.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from urllib.parse import unquote_plus

log = logging.getLogger("airflow_provider_pepipost.webhook")

# name=value pairs of a query string, as access logs print them
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=&;\s\"'?]+)=([^&;\s\"']*)")
MAX_LOGGED_CHARS = 300  # of anything a client sent that ends up in a log line


def _redact_query(text: str) -> str:
    """Hide the value of every parameter whose decoded name is ``token`` (``tok%65n=`` too)."""

    def hide(match: re.Match[str]) -> str:
        return f"{match.group(1)}=***" if unquote_plus(match.group(1)).lower() == "token" else match.group(0)

    return _QUERY_PARAM.sub(hide, text)


class _RedactTokens(logging.Filter):
    """Access logs print the query string; a token given as ?token=... must not reach them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(_redact_query(arg) if isinstance(arg, str) else arg for arg in record.args)
        record.msg = _redact_query(str(record.msg))
        return True


def redact_access_logs() -> None:
    for name in ("uvicorn.access", "uvicorn.error", "airflow.api_fastapi"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactTokens) for f in logger.filters):
            logger.addFilter(_RedactTokens())


def capped(text: object, limit: int = MAX_LOGGED_CHARS) -> str:
    """Text for a log line, cut to ``limit`` characters."""
    value = str(text)
    return value if len(value) <= limit else value[:limit] + f"... ({len(value)} chars)"


def describe_error(err: BaseException) -> str:
    """A store error for a log line or a dead letter's reason: its kind and first line, no values.

    The engine hides bound parameters, but PostgreSQL's own message adds a DETAIL line that can
    quote the failing row (a phone number among it); only the first line is kept.
    """
    cause = getattr(err, "orig", None) or err
    lines = str(cause).strip().splitlines()
    return capped(f"{type(cause).__name__}: {lines[0] if lines else ''}", 200)


class Throttled:
    """One kind of log line, written at most once per ``interval`` seconds, with how many it stands for.

    Poison every 20 ms, or a store that is down under load, would otherwise write a line a request.
    """

    def __init__(self, interval: float = 10.0, level: int = logging.WARNING) -> None:
        self.interval, self.level = interval, level
        self._count, self._last = 0, float("-inf")
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        with self._lock:
            self._count += 1
            if time.monotonic() - self._last < self.interval:
                return
            count, self._count, self._last = self._count, 0, time.monotonic()
        log.log(self.level, f"{message} (%d such since the last line)", *args, count)


class RefusalLog:
    """Counts refused requests by status, and logs them by source at most once per ``interval`` seconds."""

    SOURCES_SHOWN = 5

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self.totals: Counter[str] = Counter()  # status -> refusals since start
        self._window: Counter[tuple[int, str, str]] = Counter()  # (status, reason, source) -> count
        self._last_logged = float("-inf")
        self._lock = threading.Lock()

    def note(self, status: int, reason: str, source: str) -> None:
        with self._lock:
            self.totals[str(status)] += 1
            self._window[(status, reason, source)] += 1
            if time.monotonic() - self._last_logged < self.interval:
                return
            window, self._window = self._window, Counter()
            self._last_logged = time.monotonic()
        shown = ", ".join(
            f"{count} x {status} from {capped(source, 64)} ({capped(reason, 100)})"
            for (status, reason, source), count in window.most_common(self.SOURCES_SHOWN)
        )
        more = len(window) - self.SOURCES_SHOWN
        log.warning(
            "Pepipost webhook: refused %d request(s) since the last such line: %s%s "
            "(401s mean the vendor's webhook header or ?token= does not match PEPIPOST_WEBHOOK_TOKEN)",
            sum(window.values()),
            shown,
            f", and {more} more sources" if more > 0 else "",
        )
