"""Connections to the status store's database: one engine per URL per process, and the few
statements whose SQL differs between the dialects the store supports (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

# Bound parameters per IN (...) chunk: well under SQLite's 32766 and fast on PostgreSQL.
T = TypeVar("T")
ID_CHUNK = 5000

_ENGINES: dict[str, Engine] = {}
_WRITE_LOCKS: dict[str, threading.Lock] = {}
_LOCK = threading.Lock()


def redact_url(url: str) -> str:
    """The URL with its password hidden, for log lines."""
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the sensor read while the receiver writes. synchronous=NORMAL keeps every commit
    # through a process crash (SIGKILL); only a power loss can take the last ones.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def get_engine(url: str) -> Engine:
    """One engine per URL per process: pools are shared by every hook, sensor and request.

    ``hide_parameters``: a failed statement's error names its SQL, never the values bound to it
    (phone numbers, remarks), wherever that error is logged.
    """
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, pool_size=8, max_overflow=56, pool_timeout=60, hide_parameters=True)
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                # psycopg2 runs an executemany UPDATE (the ledger's outcomes) one round trip per
                # row; execute_batch pages them.
                batch = {"executemany_mode": "values_plus_batch"} if parsed.get_driver_name() == "psycopg2" else {}
                engine = create_engine(
                    url,
                    pool_size=8,
                    max_overflow=32,
                    pool_pre_ping=True,
                    pool_timeout=60,
                    hide_parameters=True,
                    **batch,
                )
            _ENGINES[url] = engine
        return engine


def sqlite_write_lock(url: str) -> threading.Lock:
    """SQLite has one writer at a time; queueing this process's writers beats spinning on its lock."""
    with _LOCK:
        return _WRITE_LOCKS.setdefault(url, threading.Lock())


def insert_for(conn: Connection, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT, for the dialects the store supports."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"the status store supports SQLite and PostgreSQL, not {name}")


_PREBUILT: dict[tuple[str, str], Any] = {}


def prebuilt(conn: Connection, name: str, build: Any) -> Any:
    """The statement ``build(conn)`` makes, built once per dialect and kept: a statement object used
    again keeps its SQLAlchemy cache key, so running it skips building and keying it anew. For
    statements whose text depends on nothing but the dialect (values go in bound parameters)."""
    key = (conn.dialect.name, name)
    stmt = _PREBUILT.get(key)
    if stmt is None:
        stmt = _PREBUILT[key] = build(conn)
    return stmt


def chunks(items: Sequence[T], size: int = ID_CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def transaction_lock(conn: Connection, key: int) -> None:
    """On PostgreSQL, hold the advisory lock ``key`` until the transaction ends (other holders of it
    wait); nothing on SQLite, where one writer at a time holds the whole database."""
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def dispose_engine(url: str) -> None:
    """Close this process's pool for ``url`` (before its database is dropped, say)."""
    with _LOCK:
        engine = _ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()
