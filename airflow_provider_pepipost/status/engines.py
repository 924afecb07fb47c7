"""Connections to the status store's database: one engine per URL per process, and the few
statements whose SQL differs between the dialects the store supports (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, create_engine, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

# Bound parameters per IN (...) chunk: well under SQLite's 32766 and fast on PostgreSQL.
T = TypeVar("T")
ID_CHUNK = 5000

# Seconds to open a connection to a PostgreSQL store (libpq's connect_timeout) unless the URL says
# (?connect_timeout=N): without one, a server that takes the connection and never answers holds
# the task, or the receiver's commit, for as long as the kernel keeps the socket.
PG_CONNECT_TIMEOUT = 10

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
                timeout = {} if "connect_timeout" in parsed.query else {"connect_timeout": PG_CONNECT_TIMEOUT}
                engine = create_engine(
                    url,
                    pool_size=8,
                    max_overflow=32,
                    pool_timeout=60,
                    hide_parameters=True,
                    connect_args=timeout,
                    **batch,
                )
                _ping_when_idle(engine)
            _ENGINES[url] = engine
        return engine


# A pooled connection handed out after this long back in the pool is checked first (one round trip)
# and, if the server has dropped it, the pool is renewed, as pool_pre_ping does. One back for less
# was working a moment ago: under load (the receiver's commits, back to back) the check was a sixth
# of a commit's round trips. Once a statement finds a connection lost, every connection back before
# then is checked too: one dropped in between fails that one use, as one dropped in use does.
PING_AFTER_IDLE = 1.0
_RETURNED_AT = "pepipost_returned_at"
_LOST_AT: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()  # a connection found lost


def _ping_when_idle(engine: Engine) -> None:
    dialect = engine.dialect

    def returned(dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    def check(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        back_since = record.info.get(_RETURNED_AT)
        fresh = back_since is not None and time.monotonic() - back_since < PING_AFTER_IDLE
        if fresh and back_since > _LOST_AT.get(engine, 0.0):
            return
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as err:
            if dialect.is_disconnect(err, dbapi_connection, None):
                # The pool's own signal: it replaces this connection and every one older.
                raise sa_exc.InvalidatePoolError(f"the store's server dropped a pooled connection: {err}") from err
            raise

    def noticed(context: Any) -> None:  # a statement run through SQLAlchemy found its connection lost
        if context.is_disconnect:
            connection_lost(engine)

    event.listen(engine, "connect", returned)
    event.listen(engine, "checkin", returned)
    event.listen(engine, "checkout", check)
    event.listen(engine, "handle_error", noticed)


def connection_lost(engine: Engine) -> None:
    """A statement found one of ``engine``'s connections lost: the server may have dropped them all,
    so each one back in the pool before now is checked before it is used again."""
    _LOST_AT[engine] = time.monotonic()


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


@dataclass(frozen=True)
class DriverStatement:
    """A prebuilt statement as the database's own driver runs it.

    On SQLite ``sql`` has a ``?`` per value; on PostgreSQL (psycopg2) a ``%s`` per value, or for an
    INSERT, a VALUES that is one ``%s`` for ``psycopg2.extras.execute_values``, with ``template`` the
    marks of one row.
    ``params``: for each mark, the row's key and SQLAlchemy's conversion of the value (None where
    there is none); or, for a value written in the statement itself, None and that value.
    """

    sql: str
    params: tuple[tuple[str | None, Any], ...]
    template: str | None = None

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            convert if key is None else row[key] if convert is None else convert(row[key])
            for key, convert in self.params
        )


PAGE_ROWS = 1000  # rows per INSERT on PostgreSQL, as SQLAlchemy's insertmanyvalues pages them
_ON_DRIVER: dict[tuple[str, str, str, tuple[str, ...]], DriverStatement | None] = {}
_NAMED_MARK = re.compile(r"(?<!%)%\((\w+)\)s")  # not a literal "%%(...)s"


def on_driver(conn: Connection, name: str, build: Any, keys: Sequence[str]) -> DriverStatement | None:
    """The prebuilt statement ``name``, for rows with these ``keys``, compiled once to run on the
    driver's own cursor (``driver_cursor``): any statement on SQLite and on psycopg2 (an INSERT
    there for ``execute_values``); None otherwise.

    For the receiver's commits, which run a few statements for a few rows each: SQLAlchemy's work
    per statement (its execution context, each row's parameters) was about half of a commit's CPU
    (bench/ingest_ceiling.py). Values are converted as SQLAlchemy converts them.
    """
    cache_key = (conn.dialect.name, conn.dialect.driver, name, tuple(keys))  # psycopg2 and psycopg differ
    if cache_key not in _ON_DRIVER:
        _ON_DRIVER[cache_key] = _compile_for_driver(conn, prebuilt(conn, name, build), keys)
    return _ON_DRIVER[cache_key]


def _compile_for_driver(conn: Connection, stmt: Any, keys: Sequence[str]) -> DriverStatement | None:
    dialect = conn.dialect
    compiled = stmt.compile(dialect=dialect, column_keys=list(keys), for_executemany=True)

    def param(name: str) -> tuple[str | None, Any]:
        bind = compiled.binds[name]
        convert = bind.type.dialect_impl(dialect).bind_processor(dialect)
        if name in keys:
            return name, convert
        if bind.unique and not bind.required:  # a value written in the statement (a literal)
            return None, bind.effective_value if convert is None else convert(bind.effective_value)
        raise ValueError(f"no value given for {name!r} in: {compiled.string}")

    if dialect.name == "sqlite":
        sql, names, template = compiled.string, list(compiled.positiontup or []), None
    elif dialect.driver == "psycopg2" and not compiled.isinsert:  # its values in order, as %s marks
        if "POSTCOMPILE" in compiled.string:  # an expanding IN: SQLAlchemy writes its marks per call
            return None
        names = _NAMED_MARK.findall(compiled.string)
        sql, template = _NAMED_MARK.sub("%s", compiled.string), None
    elif dialect.driver == "psycopg2" and compiled.insert_single_values_expr:
        one_row = f"({compiled.insert_single_values_expr})"  # one row's marks, without their brackets
        if one_row not in compiled.string:
            return None
        sql = compiled.string.replace(one_row, "%s", 1)
        names, template = _NAMED_MARK.findall(one_row), _NAMED_MARK.sub("%s", one_row)
    else:
        return None
    return DriverStatement(sql, tuple(param(name) for name in names), template)


@contextmanager
def driver_cursor(conn: Connection, statement: DriverStatement) -> Iterator[Any]:
    """A cursor of the driver's connection under ``conn``, in ``conn``'s transaction. The driver's
    errors come out as SQLAlchemy's (a locked or lost database is an ``OperationalError``, as
    callers expect), naming the SQL and never the values; a lost connection is invalidated."""
    dbapi = conn.dialect.loaded_dbapi
    dbapi_connection = conn.connection.dbapi_connection
    cursor = dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    except dbapi.Error as err:
        lost = conn.dialect.is_disconnect(err, dbapi_connection, cursor)
        if lost:
            connection_lost(conn.engine)
            conn.invalidate(err)
        raise sa_exc.DBAPIError.instance(
            statement.sql,
            None,
            err,
            dbapi.Error,
            hide_parameters=True,
            connection_invalidated=lost,
            dialect=conn.dialect,
        ) from err
    except Exception as err:  # a value SQLAlchemy's conversion refused: its error, as SQLAlchemy raises it
        raise sa_exc.StatementError(str(err), statement.sql, None, err, hide_parameters=True) from err
    finally:
        cursor.close()


def execute_many(
    conn: Connection, name: str, build: Any, keys: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    """The prebuilt statement ``name`` for each row (every row with ``keys``): on SQLite on the
    driver's cursor, elsewhere through SQLAlchemy (psycopg2 pages an executemany there)."""
    statement = on_driver(conn, name, build, keys) if conn.dialect.name == "sqlite" else None
    if statement is None:
        conn.execute(prebuilt(conn, name, build), list(rows))
        return
    with driver_cursor(conn, statement) as cursor:
        cursor.executemany(statement.sql, [statement.values(row) for row in rows])


def execute_each(conn: Connection, statement: DriverStatement, rows: Sequence[Mapping[str, Any]]) -> list[bool]:
    """SQLite: ``statement`` once per row on the driver's cursor; for each row, whether it changed
    anything (an INSERT ... ON CONFLICT that found the row already there did not)."""
    changed = []
    with driver_cursor(conn, statement) as cursor:
        for row in rows:
            cursor.execute(statement.sql, statement.values(row))
            changed.append(cursor.rowcount > 0)
    return changed


def insert_returning(conn: Connection, statement: DriverStatement, rows: Sequence[Mapping[str, Any]]) -> list[Any]:
    """PostgreSQL through psycopg2: the rows in multi-row INSERTs (``execute_values``, pages of
    ``PAGE_ROWS``); the RETURNING rows."""
    from psycopg2.extras import execute_values

    if conn.dialect.driver != "psycopg2":
        raise TypeError(f"insert_returning runs on psycopg2, not {conn.dialect.driver}")
    with driver_cursor(conn, statement) as cursor:
        values = [statement.values(row) for row in rows]
        return execute_values(cursor, statement.sql, values, statement.template, page_size=PAGE_ROWS, fetch=True)


def recordset_insert(statement: DriverStatement, table: Table) -> str:
    """PostgreSQL through psycopg2: the INSERT of ``on_driver`` taking its rows as one JSON array
    (``INSERT ... SELECT * FROM json_to_recordset(...)``), so that its SQL is the same for any number
    of rows (``Prepared``): that SQL, with one ``%s`` (``rows_json``'s text, typed ``json``). The rows
    go in the array's order: their key order, when they are given in it."""
    keys = _column_keys(statement)
    if statement.template is None or statement.sql.count("%") != 1 or "VALUES %s" not in statement.sql:
        raise ValueError(f"not an INSERT with one VALUES mark and no other '%': {statement.sql}")
    # Each column as the table types it: a text longer than its column is refused, as by VALUES.
    quote = _POSTGRESQL.identifier_preparer.quote
    columns = ", ".join(f"{quote(key)} {table.c[key].type.compile(dialect=_POSTGRESQL)}" for key in keys)
    return statement.sql.replace("VALUES %s", f"SELECT * FROM json_to_recordset(%s) AS row_values ({columns})")


def rows_json(statement: DriverStatement, rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows for ``recordset_insert``: one JSON object a row, its values converted as SQLAlchemy
    converts them. One value for the driver, where one per row and column cost psycopg2 most of a
    commit's CPU (docs/benchmarks.md, ninth pass). Each row has exactly the statement's keys (a
    key missing would be NULL). Refused here, without the value in the error: a NUL in a text, and
    a number JSON cannot hold (NaN, infinity; the receiver's parser refuses such times first)."""
    keys = set(_column_keys(statement))
    if any(row.keys() != keys for row in rows):
        raise ValueError(f"rows without exactly the keys {sorted(keys)}")
    converted = [(key, convert) for key, convert in statement.params if key is not None and convert is not None]
    if converted:
        rows = [{**row, **{key: convert(row[key]) for key, convert in converted}} for row in rows]
    text = json.dumps(rows, ensure_ascii=False, allow_nan=False)
    # PostgreSQL refuses a NUL too, but its error quotes the JSON around it: a phone number, say.
    if "\\u0000" in text and any(isinstance(value, str) and "\x00" in value for row in rows for value in row.values()):
        raise ValueError("a text holds a NUL (0x00) character, which PostgreSQL cannot store")
    return text


def _column_keys(statement: DriverStatement) -> list[str]:
    keys = [key for key, _ in statement.params if key is not None]
    if len(keys) != len(statement.params):
        raise ValueError(f"a value written in the statement, where each mark should be a column's: {statement.sql}")
    return keys


_POSTGRESQL = postgresql.dialect()


class Prepared:
    """A statement PostgreSQL (psycopg2) plans once per connection (``PREPARE``), then runs by name
    (``EXECUTE``): for a statement of a few rows, parsing and planning cost the server more than
    running it (docs/benchmarks.md, ninth pass). ``sql`` has a ``%s`` per value, ``types`` each
    one's type; ``label`` is what an error names (never the values)."""

    def __init__(self, label: DriverStatement, sql: str, types: Sequence[str]) -> None:
        if sql.count("%") != sql.count("%s") or sql.count("%s") != len(types):
            raise ValueError(f"a %s per type and no other '%' in: {sql}")
        self.label, self.types = label, tuple(types)
        numbered = iter(range(1, len(types) + 1))
        typed = iter(types)
        self.inline_sql = re.sub("%s", lambda _: f"%s::{next(typed)}", sql)  # the values written in
        self.name = "pepipost_" + hashlib.sha256(self.inline_sql.encode()).hexdigest()[:24]  # a name a text
        self.prepare_sql = f"PREPARE {self.name} AS " + re.sub("%s", lambda _: f"${next(numbered)}", self.inline_sql)
        self.execute_sql = f"EXECUTE {self.name} ({', '.join(f'%s::{kind}' for kind in self.types)})"
        self.execute_one_plan_sql = f"{ONE_PLAN}; {self.execute_sql}"  # one query: its own transaction


# conn.connection.info[name]: when the statement was prepared on that connection (time.monotonic),
# or _FORGOTTEN: the server forgot it (see run_prepared).
_FORGOTTEN = "forgotten"
REPLAN_AFTER = 1.0  # seconds: a plan a second a connection costs the server 0.3-0.5 ms a second


def run_prepared(
    conn: Connection, statement: Prepared, values_of: Callable[[], Sequence[Any]]
) -> list[tuple[Any, ...]]:
    """``statement`` with the values ``values_of`` gives (a value SQLAlchemy's conversion refuses is
    its ``StatementError``, as in ``driver_cursor``), its rows. Outside a transaction
    (``autocommit``) by its name, prepared on the connection the first time; where the server
    forgot it (a pooler such as PgBouncer in transaction mode hands each statement to another
    server's session), and inside a transaction (where a failed statement would end it), with its
    values written in.

    Its one plan (``ONE_PLAN``) is made again every ``REPLAN_AFTER`` seconds: a plan is made from
    the tables' sizes at the time and kept, and one made on a new store's near-empty ledger scanned
    it whole once it held a million rows (100-400 ms a commit, where 2 ms by its indexes).
    PostgreSQL plans again after each ANALYZE, but autovacuum runs that when it gets to it, and
    never where it is off."""
    info = conn.connection.info  # lives as long as the driver's connection, cleared when it is lost
    dbapi_connection: Any = conn.connection.dbapi_connection
    with driver_cursor(conn, statement.label) as cursor:
        values = values_of()
        if dbapi_connection.autocommit and info.get(statement.name) != _FORGOTTEN:
            try:
                now, prepared_at = time.monotonic(), info.get(statement.name)
                if prepared_at is None:
                    _prepare(cursor, statement)
                    info[statement.name] = now
                elif now - prepared_at >= REPLAN_AFTER:
                    # Forgotten here first: should the PREPARE fail after the DEALLOCATE (a lock
                    # timeout, say), the next run prepares it anew.
                    del info[statement.name]
                    cursor.execute(f"DEALLOCATE {statement.name}; {statement.prepare_sql}")
                    info[statement.name] = now
                one_plan = dbapi_connection.server_version >= ONE_PLAN_SINCE
                cursor.execute(statement.execute_one_plan_sql if one_plan else statement.execute_sql, values)
                return cursor.fetchall()
            except conn.dialect.loaded_dbapi.Error as err:
                if getattr(err, "pgcode", None) != _NO_SUCH_PREPARED_STATEMENT:
                    raise
                info[statement.name] = _FORGOTTEN  # nothing ran: run it with its values written in
                log.warning(
                    "PostgreSQL forgot the prepared statement %s on this connection (a pooler in transaction"
                    " mode?): it runs with its values written in from now on, planned every time",
                    statement.name,
                )
        cursor.execute(statement.inline_sql, values)
        return cursor.fetchall()


_NO_SUCH_PREPARED_STATEMENT, _PREPARED_ALREADY = "26000", "42P05"


def _prepare(cursor: Any, statement: Prepared) -> None:
    try:
        cursor.execute(statement.prepare_sql)
    except Exception as err:
        if getattr(err, "pgcode", None) != _PREPARED_ALREADY:  # a pooler's server session had it: the same text
            raise


# One plan for every run (a generic plan), never one a run: a custom plan knows the values (an
# empty array of headers looks cheaper), so PostgreSQL would keep planning it every time, and
# planning is what preparing saves. SET LOCAL: for that run alone, nothing else on the connection.
# PostgreSQL 12 and later (before, it is planned run by run).
ONE_PLAN = "SET LOCAL plan_cache_mode = force_generic_plan"
ONE_PLAN_SINCE = 120000  # server_version


@contextmanager
def autocommit(conn: Connection) -> Iterator[None]:
    """PostgreSQL through psycopg2: inside, each statement run on the driver's cursor is a
    transaction of its own, committed before the driver returns (no BEGIN, no COMMIT)."""
    dbapi_connection: Any = conn.connection.dbapi_connection
    dbapi_connection.autocommit = True
    try:
        yield
    finally:
        if not dbapi_connection.closed:  # a lost connection was invalidated: it is not used again
            dbapi_connection.autocommit = False


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
