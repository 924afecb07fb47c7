"""Filing webhook batches: delivery events (each stored once), the current status of each message
(raised, never lowered), unknown sends reconciled from the reports, dead letters and inbound messages.

Functions of an open connection; ``StatusStore`` runs them in its transactions. ``ingest_many``
files each list of ``status.inbound.WebhookBatch`` through its own step, in ``FILING_STEPS``. On
PostgreSQL through psycopg2 the delivery reports of a commit are one statement
(``DeliveryReports``), and a commit of nothing else is that statement alone, its own transaction
(``ingest_reports_alone``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, String, any_, bindparam, case, func, literal_column, select, update
from sqlalchemy.dialects.postgresql import ARRAY

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.consent import VIA_REPLY, set_opted_out
from airflow_provider_pepipost.status.engines import (
    PAGE_ROWS,
    DriverStatement,
    Prepared,
    autocommit,
    chunks,
    driver_cursor,
    execute_each,
    execute_many,
    insert_for,
    insert_returning,
    on_driver,
    prebuilt,
    recordset_insert,
    rows_json,
    run_prepared,
    transaction_lock,
)
from airflow_provider_pepipost.status.inbound import DeadLetter, InboundMessage, WebhookBatch
from airflow_provider_pepipost.status.ledger import IN_FLIGHT_STATES
from airflow_provider_pepipost.status.model import DeliveryEvent, LedgerState


@dataclass
class IngestResult:
    """What one webhook batch did to the store; ``dead_letters`` are the items kept aside."""

    accepted: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    inbound: int = 0
    reconciled: int = 0
    opt_outs: int = 0  # senders of stop-word replies put on the suppression list

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def event_key(message_id: str, status: str, reported_at: float | None) -> str:
    """A report sent twice has the same key, so it is stored once."""
    return hashlib.sha256(f"{message_id}\x1f{status}\x1f{reported_at}".encode()).hexdigest()[:40]


# transaction_lock's key for the order of customer messages ("pepi" in ASCII).
INBOUND_ORDER_LOCK = 0x70657069


def ingest_many(conn: Connection, batches: Sequence[WebhookBatch], now: float) -> list[IngestResult]:
    """Several webhook batches in one transaction; each batch gets its own counts, and an item in
    two batches counts in the first."""
    results = [IngestResult(dead_letters=len(batch.dead_letters), inbound=len(batch.inbound)) for batch in batches]
    if any(batch.inbound for batch in batches):
        # Customer messages take their ids and commit in one order, so that a reader of the reply
        # feed never sees a message before one with a lower id that is still being written.
        # Taken first, before any other lock of the transaction: two of these never wait on each other.
        transaction_lock(conn, INBOUND_ORDER_LOCK)
    for step in FILING_STEPS:
        step(conn, batches, results, now)
    return results


def _file_events(conn: Connection, batches: Sequence[WebhookBatch], results: list[IngestResult], now: float) -> None:
    """Delivery reports: each stored once, statuses raised, unknown sends reconciled."""
    reports = DeliveryReports(batches, now)
    if reports.rows:
        reports.count(results, *reports.file(conn))


def reports_alone(batches: Sequence[WebhookBatch], now: float) -> DeliveryReports | None:
    """On psycopg2: a commit's delivery reports when it holds nothing else (no dead letter, no
    customer message) and they fit one statement; None otherwise (checked first, without reading them)."""
    if any(batch.dead_letters or batch.inbound for batch in batches):
        return None
    reports = DeliveryReports(batches, now)
    return reports if reports.rows and reports.fit_one_statement() else None


def ingest_reports_alone(conn: Connection, reports: DeliveryReports) -> list[IngestResult]:
    """Delivery reports alone (``reports_alone``) as one statement that is its own transaction,
    committed before it answers: one round trip, where BEGIN and COMMIT took two more."""
    results = [IngestResult() for _ in reports.batches]
    with autocommit(conn):
        reports.count(results, *reports.in_one_statement(conn))
    return results


class DeliveryReports:
    """The delivery reports of one commit, ready to file: one row per event, each message's best
    status, and the x-apiheaders that may give unknown sends their message id."""

    def __init__(self, batches: Sequence[WebhookBatch], now: float) -> None:
        self.batches, self.now = batches, now
        self.events = [ev for batch in batches for ev in batch.events]
        self.keys = [event_key(ev.message_id, ev.status, ev.reported_at) for ev in self.events]
        self.rows, self.statuses = _event_rows(self.events, self.keys, now), _status_rows(self.events, now)
        self.by_header = {ev.api_header: ev.message_id for ev in self.events if ev.api_header}

    def fit_one_statement(self) -> bool:
        """As one statement on psycopg2: each INSERT holds its rows in one page, and no two headers
        give the same message id (one by one, the first in header order would take it)."""
        return max(len(self.rows), len(self.statuses)) <= PAGE_ROWS and len(set(self.by_header.values())) == len(
            self.by_header
        )

    def file(self, conn: Connection) -> tuple[set[str], set[str]]:
        """Filed in ``conn``'s transaction: the keys of the events added, the headers reconciled."""
        if conn.dialect.driver == "psycopg2" and self.fit_one_statement():
            return self.in_one_statement(conn)
        fresh = _insert_new_events(conn, self.rows)
        _raise_statuses(conn, self.statuses)
        return fresh, _reconcile(conn, self.by_header, self.now)

    def in_one_statement(self, conn: Connection) -> tuple[set[str], set[str]]:
        """The events, the statuses and the unknown sends reconciled, as one statement (a commit of
        a few reports was mostly round trips: docs/benchmarks.md, eighth pass), prepared once a
        connection where it can be (``engines.run_prepared``)."""
        found = run_prepared(conn, _one_statement(conn), lambda: self.values(conn))
        fresh = {value for kind, value in found if kind == "added"}
        return fresh, {value for kind, value in found if kind == "reconciled"}

    def values(self, conn: Connection) -> list[Any]:
        """The values of ``_one_statement``: the events' rows and the statuses' as two JSON arrays,
        in key order (see ``_event_rows``), then the reconcile's (no header: none to do)."""
        events, upsert = _driver_inserts(conn)
        headers = sorted(self.by_header)
        waiting = list(IN_FLIGHT_STATES)
        reconcile: list[Any] = [headers, [self.by_header[header] for header in headers], waiting, waiting]
        reconcile += [LedgerState.ACCEPTED.value, self.now, self.now, waiting]
        return [rows_json(events, self.rows), rows_json(upsert, self.statuses), *reconcile]

    def count(self, results: list[IngestResult], fresh: set[str], reconciled: set[str]) -> None:
        """Each batch's counts: an event (or a reconciled header) in two batches counts in the first."""
        keyed = iter(zip(self.keys, self.events, strict=True))  # the events, batch by batch, in order
        for result, batch in zip(results, self.batches, strict=True):
            for key, ev in itertools.islice(keyed, len(batch.events)):
                if key in fresh:
                    fresh.discard(key)
                    result.accepted += 1
                else:
                    result.duplicates += 1
                if ev.api_header in reconciled:
                    reconciled.discard(ev.api_header)
                    result.reconciled += 1


def _file_dead_letters(
    conn: Connection, batches: Sequence[WebhookBatch], results: list[IngestResult], now: float
) -> None:
    letters = [letter for batch in batches for letter in batch.dead_letters]
    if letters:
        _insert_dead_letters(conn, letters, now)


def _file_inbound(conn: Connection, batches: Sequence[WebhookBatch], results: list[IngestResult], now: float) -> None:
    """Customer messages: each stored once; the senders of new stop-word replies opted out."""
    inbound = [item for batch in batches for item in batch.inbound]
    if not inbound:
        return
    stopped = _insert_inbound(conn, inbound, now)
    items = iter(inbound)  # the messages, batch by batch, in order: each answer counts its own
    for result, batch in zip(results, batches, strict=True):
        senders = {item.sender for item in itertools.islice(items, len(batch.inbound)) if id(item) in stopped}
        result.opt_outs += len(senders)


# The columns only some kinds fill: every row names them all (one multi-row INSERT).
_NO_KIND_COLUMNS = dict.fromkeys(("text", "button_payload", "media_id", "latitude", "longitude"))

# How each list of a batch is filed, in this order (a reply's STOP after the reports it came with).
FilingStep = Callable[[Connection, Sequence[WebhookBatch], list[IngestResult], float], None]
FILING_STEPS: tuple[FilingStep, ...] = (_file_events, _file_dead_letters, _file_inbound)


def _letter_key(letter: DeadLetter) -> str:
    if letter.key:
        return letter.key[:40]
    return hashlib.sha256(f"{letter.reason}\x1f{letter.raw}".encode("utf-8", "surrogatepass")).hexdigest()[:40]


def _insert_dead_letters(conn: Connection, letters: Sequence[DeadLetter], now: float) -> None:
    # Keyed, so that a body sent again adds no dead letters; a letter without a key is keyed by its
    # content.
    keyed = {_letter_key(letter): letter for letter in letters}
    conn.execute(
        prebuilt(conn, "dead_letters", _dead_letters_insert),
        [
            {"received_at": now, "reason": letter.reason, "raw": letter.raw, "letter_key": key}
            for key, letter in sorted(keyed.items())  # in key order (see _insert_new_events)
        ],
    )


def _insert_inbound(conn: Connection, inbound: Sequence[InboundMessage], now: float) -> set[int]:
    """Store the messages not stored yet; put the senders of new stop-word replies on the
    suppression list. Returns the ``id()`` of each of those replies."""
    rows: dict[str, InboundMessage] = {}
    for item in inbound:  # a message in two bodies counts in the first
        rows.setdefault(hashlib.sha256(item.raw.encode()).hexdigest()[:40], item)
    table = schema.inbound_messages
    seen: set[str] = set()
    for chunk in chunks(list(rows)):
        seen.update(conn.execute(select(table.c.inbound_key).where(table.c.inbound_key.in_(chunk))).scalars())
    new = {key: item for key, item in rows.items() if key not in seen}
    if not new:
        return set()
    conn.execute(
        insert_for(conn, table).on_conflict_do_nothing(index_elements=["inbound_key"]),
        [
            {
                "inbound_key": key,
                "sender": item.sender,
                "context_message_id": item.context_message_id,
                "received_at": now,
                "raw": item.raw,
                "kind": item.kind,
                "message_id": item.message_id,
                **_NO_KIND_COLUMNS,
                **item.columns(),  # each kind's own: the one handler a new kind may need
            }
            for key, item in new.items()
        ],
    )
    # Only a reply stored now counts: the same reply posted again must not undo a later opt-in.
    stops: list[InboundMessage] = []
    words: dict[str, str] = {}  # sender -> the stop word (one opt-out per sender)
    for item in new.values():
        if item.opt_out and item.sender:
            stops.append(item)
            words[item.sender] = item.opt_out
    for sender, word in words.items():
        set_opted_out(conn, [sender], True, VIA_REPLY, f"replied {word!r}", now)
    return {id(item) for item in stops}


def _event_rows(events: Sequence[DeliveryEvent], keys: Sequence[str], now: float) -> list[dict[str, Any]]:
    """One row per event not repeated in this commit, in key order, as every commit writes them:
    two commits at once on PostgreSQL never wait on each other in a cycle (a deadlock)."""
    rows: dict[str, dict[str, Any]] = {}
    for key, ev in zip(keys, events, strict=True):
        rows.setdefault(
            key,
            {
                "event_key": key,
                "message_id": ev.message_id,
                "status": ev.status,
                "raw_status": ev.raw_status,
                "remark": ev.remark,
                "reported_at": ev.reported_at,
                "received_at": now,
                "api_header": ev.api_header,
                "recipient": ev.recipient,
                "raw": ev.raw,
            },
        )
    return [rows[key] for key in sorted(rows)]


def _insert_new_events(conn: Connection, rows: Sequence[dict[str, Any]]) -> set[str]:
    """Store the events not stored yet; returns the keys this transaction added."""
    statement = on_driver(conn, "events", _events_insert, _EVENT_COLUMNS)
    if conn.dialect.name == "postgresql":
        # One multi-row INSERT whose RETURNING names exactly the rows added, even when another
        # receiver adds the same ones at the same time.
        if statement is None:  # another driver than psycopg2
            return set(conn.execute(prebuilt(conn, "events", _events_insert), rows).scalars())
        return {key for (key,) in insert_returning(conn, statement, rows)}
    # SQLite: each row on the driver's cursor, which tells whether it was added (one writer at a
    # time holds the database, so nobody adds it in between).
    assert statement is not None
    added = execute_each(conn, statement, rows)
    return {row["event_key"] for row, was_added in zip(rows, added, strict=True) if was_added}


def _status_rows(events: Sequence[DeliveryEvent], now: float) -> list[dict[str, Any]]:
    """Each message's best status of this commit, and when it was first delivered and first read
    (the campaign page's latencies): one row per message, in key order (see ``_event_rows``)."""
    best: dict[str, DeliveryEvent] = {}
    reached: dict[str, list[float | None]] = {}  # message id -> [first delivered, first read]
    priced: dict[str, DeliveryEvent] = {}  # message id -> the first of its events with pricing
    for ev in events:
        held = best.get(ev.message_id)
        if held is None or ev.rank > held.rank:
            best[ev.message_id] = ev
        if ev.billable is not None:
            priced.setdefault(ev.message_id, ev)
        if ev.status in ("delivered", "read"):  # read implies delivered
            when = ev.reported_at if ev.reported_at is not None else now
            times = reached.setdefault(ev.message_id, [None, None])
            times[0] = when if times[0] is None else min(times[0], when)
            if ev.status == "read":
                times[1] = when if times[1] is None else min(times[1], when)
    return [
        {
            "message_id": ev.message_id,
            "status": ev.status,
            "rank": ev.rank,
            "remark": ev.remark,
            "reported_at": ev.reported_at,
            "updated_at": now,
            "delivered_at": reached.get(ev.message_id, (None, None))[0],
            "read_at": reached.get(ev.message_id, (None, None))[1],
            **_pricing_of(priced.get(ev.message_id)),
        }
        for _, ev in sorted(best.items())
    ]


def _raise_statuses(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Move each message's current status up, never down (one row per message per statement)."""
    statement = on_driver(conn, "status_upsert", _status_upsert, _STATUS_COLUMNS)
    if statement is not None and statement.template is not None:  # PostgreSQL: one multi-row INSERT
        insert_returning(conn, statement, rows)
    else:
        execute_many(conn, "status_upsert", _status_upsert, _STATUS_COLUMNS, rows)


def _pricing_of(ev: DeliveryEvent | None) -> dict[str, Any]:
    if ev is None:
        return {"billable": None, "category": None, "pricing_model": None}
    return {"billable": ev.billable, "category": ev.category, "pricing_model": ev.pricing_model}


def _reconcile(conn: Connection, by_header: dict[str, str], now: float) -> set[str]:
    """Give unknown sends their message id from reports that echo their x-apiheader
    (``by_header``: each header with its message id). Returns the headers whose rows were reconciled.
    """
    if not by_header:
        return set()
    led = schema.ledger
    waiting: dict[str, list[str]] = {}
    for key, header in _waiting_sends_for(conn, list(by_header)):
        waiting.setdefault(header, []).append(key)
    reconciled: set[str] = set()
    for header, keys in sorted(waiting.items()):  # in one order (see _event_rows)
        if len(keys) != 1:
            continue  # a header shared by several rows cannot tell them apart
        message_id = by_header[header]
        if conn.execute(select(led.c.idempotency_key).where(led.c.message_id == message_id)).first():
            continue
        conn.execute(
            update(led)
            .where(led.c.idempotency_key == keys[0])
            .values(message_id=message_id, state=LedgerState.ACCEPTED.value, reconciled_at=now, updated_at=now)
        )
        reconciled.add(header)
    return reconciled


# What a failure of the one statement names, rather than its SQL: that holds the values.
_ONE_STATEMENT = DriverStatement("the events, statuses and unknown sends of one commit (ingest._one_statement)", ())

# _reconcile in one statement, as WITH clauses of _one_statement: the same rows (those waiting for
# their message id that sent a header no other waiting row sent, and whose message id no row has
# yet). They are locked in header order first, as one by one locks them, whatever join the planner
# picks for the update: two commits never wait on each other's rows in a cycle. That order is code
# point order (COLLATE "C"), as Python sorts: a database's own collation may order them otherwise
# (en-US does). The update checks them again once locked (another commit may have reconciled one
# meanwhile). Its values, typed in _RECONCILE_TYPES: the headers and their message ids as two
# arrays, the states of rows waiting (twice), the state they take, the time (twice), the states of
# rows waiting.
_RECONCILE_SQL = f"""locked AS (
    SELECT l.idempotency_key, h.api_header, h.message_id
    FROM {schema.ledger.name} AS l JOIN unnest(%s, %s) AS h (api_header, message_id)
    ON l.api_header = h.api_header
    WHERE l.message_id IS NULL AND l.state = ANY(%s)
    AND NOT EXISTS (
        SELECT FROM {schema.ledger.name} AS other WHERE other.api_header = h.api_header
        AND other.message_id IS NULL AND other.state = ANY(%s) AND other.idempotency_key <> l.idempotency_key
    )
    AND NOT EXISTS (SELECT FROM {schema.ledger.name} AS taken WHERE taken.message_id = h.message_id)
    ORDER BY h.api_header COLLATE "C", l.idempotency_key COLLATE "C"
    FOR UPDATE OF l
), reconciled AS (
    UPDATE {schema.ledger.name} AS l
    SET message_id = locked.message_id, state = %s, reconciled_at = %s, updated_at = %s
    FROM locked
    WHERE l.idempotency_key = locked.idempotency_key AND l.message_id IS NULL AND l.state = ANY(%s)
    RETURNING locked.api_header
)"""
_RECONCILE_TYPES = ("text[]", "text[]", "text[]", "text[]", "text", "float8", "float8", "text[]")

_ONE_STATEMENTS: dict[str, Prepared] = {}


def _driver_inserts(conn: Connection) -> tuple[DriverStatement, DriverStatement]:
    events = on_driver(conn, "events", _events_insert, _EVENT_COLUMNS)
    upsert = on_driver(conn, "status_upsert", _status_upsert, _STATUS_COLUMNS)
    assert events is not None and upsert is not None  # psycopg2
    return events, upsert


def _one_statement(conn: Connection) -> Prepared:
    """The delivery reports of a commit as one statement, the same SQL for any number of rows: the
    events' INSERT, the statuses' upsert and the reconcile as WITH clauses, each read by the SELECT
    in turn, so that PostgreSQL runs them in the order of one by one: the events, the statuses,
    then the ledger, each in key order. Built once (psycopg2 only)."""
    if "psycopg2" not in _ONE_STATEMENTS:
        events, upsert = _driver_inserts(conn)
        events_sql, upsert_sql = (
            recordset_insert(events, schema.events),
            recordset_insert(upsert, schema.message_status),
        )
        sql = (
            f"WITH new_events AS ({events_sql}), raised AS ({upsert_sql}), {_RECONCILE_SQL}"
            " SELECT 'added', event_key FROM new_events UNION ALL SELECT 'raised', message_id FROM raised"
            " UNION ALL SELECT 'reconciled', api_header FROM reconciled"
        )
        _ONE_STATEMENTS["psycopg2"] = Prepared(_ONE_STATEMENT, sql, ("json", "json", *_RECONCILE_TYPES))
    return _ONE_STATEMENTS["psycopg2"]


# The keys of the rows each statement is given (on SQLite, the order of its values on the driver).
_EVENT_COLUMNS = (
    "event_key", "message_id", "status", "raw_status", "remark", "reported_at", "received_at", "api_header",
    "recipient", "raw",
)  # fmt: skip
_STATUS_COLUMNS = (
    "message_id", "status", "rank", "remark", "reported_at", "updated_at", "delivered_at", "read_at", "billable",
    "category", "pricing_model",
)  # fmt: skip


# The statements of every commit, built once per dialect (``engines.prebuilt``): for small commits
# building them (and SQLAlchemy's cache key of each new statement) cost more than running them.
def _dead_letters_insert(conn: Connection) -> Any:
    return insert_for(conn, schema.dead_letters).on_conflict_do_nothing(index_elements=["letter_key"])


def _events_insert(conn: Connection) -> Any:
    stmt = insert_for(conn, schema.events).on_conflict_do_nothing(index_elements=["event_key"])
    return stmt.returning(schema.events.c.event_key) if conn.dialect.name == "postgresql" else stmt


def _status_upsert(conn: Connection) -> Any:
    ms = schema.message_status
    stmt = insert_for(conn, ms)
    new = stmt.excluded
    # Only a higher status is written (the one statement's WHERE, as cheap as before v6), or the
    # first pricing; the first times and the first pricing it brings are kept. A 'delivered' that
    # comes after 'read' changes nothing: the delivered time is then when the read report came.
    higher = ms.c.rank < new.rank
    stmt = stmt.on_conflict_do_update(
        index_elements=[ms.c.message_id],
        set_={
            "status": case((higher, new.status), else_=ms.c.status),
            "rank": case((higher, new.rank), else_=ms.c.rank),
            "remark": case((higher, new.remark), else_=ms.c.remark),
            "reported_at": case((higher, new.reported_at), else_=ms.c.reported_at),
            "updated_at": new.updated_at,
            "delivered_at": func.coalesce(ms.c.delivered_at, new.delivered_at),
            "read_at": func.coalesce(ms.c.read_at, new.read_at),
            "billable": func.coalesce(ms.c.billable, new.billable),
            "category": func.coalesce(ms.c.category, new.category),
            "pricing_model": func.coalesce(ms.c.pricing_model, new.pricing_model),
        },
        where=higher | (ms.c.billable.is_(None) & new.billable.is_not(None)),
    )
    if conn.dialect.name == "postgresql":
        stmt = stmt.returning(ms.c.message_id)  # one multi-row INSERT (see _insert_new_events)
    return stmt


def _waiting_sends_for(conn: Connection, headers: list[str]) -> list[tuple[str, str]]:
    """(idempotency key, header) of the ledger rows still waiting for their message id that sent
    one of these headers."""
    # The lists in one value each, so that the SQL is the same for any number of headers, run on the
    # driver's cursor: through SQLAlchemy (an expanding IN) this look-up was a fifth of the client's
    # CPU in a PostgreSQL commit of 15 reports (docs/benchmarks.md, sixth pass).
    lists: dict[str, Any]
    if conn.dialect.name == "sqlite":
        statement = on_driver(conn, "waiting_sends_json", _waiting_sends_json, ("headers", "states"))
        lists = {"headers": json.dumps(headers), "states": _IN_FLIGHT_JSON}
    elif conn.dialect.driver == "psycopg2":
        statement = on_driver(conn, "waiting_sends_any", _waiting_sends_any, ("headers", "states"))
        lists = {"headers": headers, "states": list(IN_FLIGHT_STATES)}
    else:
        statement = None
    if statement is None:
        lookup = prebuilt(conn, "waiting_sends", _waiting_sends)
        return [tuple(row) for chunk in chunks(headers) for row in conn.execute(lookup, {"headers": list(chunk)})]
    with driver_cursor(conn, statement) as cursor:
        cursor.execute(statement.sql, statement.values(lists))
        return cursor.fetchall()


_IN_FLIGHT_JSON = json.dumps(IN_FLIGHT_STATES)


def _waiting_sends_json(conn: Connection) -> Any:
    """SQLite's: the lists as JSON arrays (json_each), so that the SQL is the same for any number of headers."""
    led = schema.ledger

    def each(name: str) -> Any:
        return select(func.json_each(bindparam(name, type_=String)).table_valued("value").c.value).scalar_subquery()

    # Without statistics SQLite would walk every row without a message id (each refused or
    # suppressed row of every campaign) rather than look the headers up: told that most rows have
    # none, it looks them up.
    waiting = func.likelihood(led.c.message_id.is_(None), literal_column("0.9375"))
    return select(led.c.idempotency_key, led.c.api_header).where(
        led.c.api_header.in_(each("headers")), waiting, led.c.state.in_(each("states"))
    )


def _waiting_sends_any(conn: Connection) -> Any:
    """PostgreSQL's: the lists as arrays (``= ANY``), each one value however long."""
    led = schema.ledger
    return select(led.c.idempotency_key, led.c.api_header).where(
        led.c.api_header == any_(bindparam("headers", type_=ARRAY(String))),
        led.c.message_id.is_(None),
        led.c.state == any_(bindparam("states", type_=ARRAY(String))),
    )


def _waiting_sends(conn: Connection) -> Any:
    led = schema.ledger
    return select(led.c.idempotency_key, led.c.api_header).where(
        led.c.api_header.in_(bindparam("headers", expanding=True)),
        led.c.message_id.is_(None),
        led.c.state.in_(IN_FLIGHT_STATES),
    )
