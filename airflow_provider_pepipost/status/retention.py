"""The store over time: purging what is older than a cut-off, erasing a person, the size per table.

Functions of an engine and its write lock (``StatusStore`` passes them its own), because a purge
is many short transactions, not one: a receiver on the same store waits for one batch at most.

Erasure keeps a STOP: the person's suppression row stays, its number replaced by a keyed hash
(``numbers.number_hash``), which the send path checks beside the plain number. The key is the
deployment's secret (``$PEPIPOST_ERASURE_KEY`` or ``[pepipost] erasure_key``), never in the store:
a dump of the store alone cannot be hashed back to numbers, ten digits being few enough to try.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, literal_column, or_, select, text, update
from sqlalchemy.sql.expression import ColumnClause

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.numbers import (
    canonical_number,
    key_fingerprint,
    keyed_hash,
    mask_numbers_in,
    normalize_phone,
    number_hash,
)
from airflow_provider_pepipost.status import approvals, schema
from airflow_provider_pepipost.status.consent import RACED, raced_key
from airflow_provider_pepipost.status.engines import chunks
from airflow_provider_pepipost.status.ledger import IN_FLIGHT_STATES
from airflow_provider_pepipost.status.migrations import ERASURE_FINGERPRINT, UNKNOWN_FINGERPRINT
from airflow_provider_pepipost.status.resolver import erasure_key

__all__ = ["Erased", "TableStats", "erase", "erasure_key", "purge", "stats"]

VIA_ERASURE = "erasure"
DEFAULT_PURGE_BATCH = 5000

Writing = Callable[[], AbstractContextManager[Connection]]

# What a purge deletes, table by table: (table, key column, the time a row is judged by, and the
# rows never purged whatever their age).
_PURGED = (
    (schema.events, "id", "received_at", None),
    (schema.inbound_messages, "id", "received_at", None),
    (schema.dead_letters, "id", "received_at", None),
    # A row still in flight is never purged: its try may come back to it.
    (schema.ledger, "idempotency_key", "updated_at", schema.ledger.c.state.in_(IN_FLIGHT_STATES)),
    (schema.campaign_rows, None, "updated_at", None),
    (schema.message_status, "message_id", "updated_at", None),
    (schema.consent_batches, "batch_key", "updated_at", None),
    (schema.reply_claims, None, "claimed_at", None),
    (schema.approval_answers, "inbound_id", "decided_at", None),
    (schema.approval_requests, "message_id", "created_at", None),
)


def purge(
    engine: Engine, writing: Writing, older_than: float, *, batch_size: int = DEFAULT_PURGE_BATCH, dry_run: bool = False
) -> dict[str, int]:
    """Delete what is older than ``older_than`` seconds, a batch per transaction; the suppression
    list is never purged. Returns the rows deleted (or, with ``dry_run``, that would be) per table."""
    cutoff = time.time() - older_than
    counts: dict[str, int] = {}
    for table, key, when, kept in _PURGED:
        old = table.c[when] < cutoff
        if kept is not None:
            old = old & ~kept
        if dry_run:
            with engine.connect() as conn:
                counts[table.name] = int(conn.execute(select(func.count()).select_from(table).where(old)).scalar() or 0)
            continue
        counts[table.name] = sum(_delete_in_batches(writing, table, key, old, batch_size))
    return counts


def _delete_in_batches(writing: Writing, table: Any, key: str | None, old: Any, batch_size: int) -> Iterator[int]:
    """Delete matching rows ``batch_size`` at a time, each batch in its own short transaction."""
    while True:
        with writing() as conn:
            if key:
                found = conn.execute(select(table.c[key]).where(old).limit(batch_size)).scalars().all()
                if found:
                    conn.execute(delete(table).where(table.c[key].in_(found)))
                deleted = len(found)
            else:
                deleted = _delete_by_row_id(conn, table, old, batch_size)
        if deleted:
            yield deleted
        if deleted < batch_size:
            return


def _delete_by_row_id(conn: Connection, table: Any, old: Any, batch_size: int) -> int:
    """One batch of a table with a composite key, by the database's own row id (PostgreSQL's ctid,
    SQLite's rowid): a list of composite keys in the DELETE made PostgreSQL scan the whole table
    once per batch (18 s a batch at a million rows)."""
    row_id: ColumnClause[Any] = literal_column("ctid" if conn.dialect.name == "postgresql" else "rowid")
    found = select(row_id).select_from(table).where(old).limit(batch_size).scalar_subquery()
    if conn.dialect.name == "postgresql":
        # = ANY(ARRAY(...)) is what PostgreSQL answers with a TID scan; ctid IN (...) is a join.
        statement = delete(table).where(row_id == func.any(func.array(found)))
    else:
        statement = delete(table).where(row_id.in_(found))
    return int(conn.execute(statement).rowcount or 0)


@dataclass
class Erased:
    """What erasing one number changed, table by table."""

    suppression_kept: bool = False
    ledger_rows: int = 0
    campaign_rows: int = 0
    events: int = 0
    statuses: int = 0
    inbound: int = 0
    dead_letters: int = 0
    consent_batches: int = 0
    approval_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def erase(writing: Writing, number: str, key: str) -> Erased:
    """Remove or anonymise every row that holds ``number`` (in any spelling), in one transaction;
    keep it suppressed under its keyed hash, so that a STOP survives and it is never messaged.

    The ledger's idempotency keys are hashes of the number too (unkeyed, so a list of numbers
    would find it): they become keyed hashes of themselves."""
    phone = normalize_phone(number)
    hashed = number_hash(phone, key)
    found = Erased()
    with writing() as conn:
        _record_key(conn, key)
        _keep_suppressed(conn, phone, hashed)
        found.suppression_kept = True
        message_ids = _anonymise_ledger(conn, phone, hashed, key, found)
        ev, st = schema.events, schema.message_status
        for chunk in chunks(message_ids):
            found.events += conn.execute(delete(ev).where(ev.c.message_id.in_(chunk))).rowcount
            found.statuses += conn.execute(update(st).where(st.c.message_id.in_(chunk)).values(remark="")).rowcount
        found.events += conn.execute(delete(ev).where(ev.c.recipient == phone)).rowcount
        found.inbound = conn.execute(
            delete(schema.inbound_messages).where(schema.inbound_messages.c.sender == phone)
        ).rowcount
        found.inbound += _delete_mentions(conn, schema.inbound_messages, "id", ("raw",), phone)
        found.events += _delete_mentions(conn, ev, "id", ("raw", "remark"), phone)
        found.dead_letters = _delete_mentions(conn, schema.dead_letters, "id", ("raw", "reason"), phone)
        _scrub_mentions(conn, st, "message_id", "remark", phone)
        _scrub_mentions(conn, schema.ledger, "idempotency_key", "error_message", phone)
        _scrub_mentions(conn, schema.campaign_rows, None, "error_message", phone)
        found.consent_batches = _scrub_mentions(conn, schema.consent_batches, "batch_key", "error_message", phone)
        found.consent_batches += _forget_raced(conn, phone)
        found.approval_requests = approvals.forget_approver(conn, phone)
    return found


def _forget_raced(conn: Connection, phone: str) -> int:
    """Delete the records of the number's STOPs that raced an opt-in: their keys hash the number."""
    table = schema.consent_batches
    batch_keys = conn.execute(select(table.c.batch_key).where(table.c.state != RACED)).scalars()
    deleted = 0
    for chunk in chunks([raced_key(batch_key, phone) for batch_key in batch_keys]):
        deleted += conn.execute(delete(table).where(table.c.batch_key.in_(chunk))).rowcount
    return deleted


def _record_key(conn: Connection, key: str) -> None:
    """Keep the erasure key's fingerprint; refuse another key than the one earlier erasures used."""
    settings = schema.store_settings
    held = conn.execute(select(settings.c.value).where(settings.c.name == ERASURE_FINGERPRINT)).scalar()
    fingerprint = key_fingerprint(key)
    if held not in (None, UNKNOWN_FINGERPRINT, fingerprint):
        raise PepipostConfigError(
            "this erasure key is not the one this store's erased numbers were kept with: erasing with it would "
            "leave them unrecognised; set the original key"
        )
    if held is None:
        conn.execute(settings.insert().values(name=ERASURE_FINGERPRINT, value=fingerprint, updated_at=time.time()))
    elif held != fingerprint:  # erased before v9 kept fingerprints: this key is theirs from now on
        known = update(settings).where(settings.c.name == ERASURE_FINGERPRINT)
        conn.execute(known.values(value=fingerprint, updated_at=time.time()))


def _anonymise_ledger(conn: Connection, phone: str, hashed: str, key: str, found: Erased) -> list[str]:
    """The number's ledger and page rows under its hash, their idempotency keys keyed; returns the
    ids of its messages."""
    led, rows = schema.ledger, schema.campaign_rows
    held = conn.execute(select(led.c.idempotency_key, led.c.message_id).where(led.c.recipient == phone)).all()
    for old_key, _ in held:
        new_key = keyed_hash(old_key, key)
        found.ledger_rows += conn.execute(
            update(led)
            .where(led.c.idempotency_key == old_key)
            .values(idempotency_key=new_key, recipient=hashed, api_header=hashed, error_message=None)
        ).rowcount
        conn.execute(update(rows).where(rows.c.ledger_key == old_key).values(ledger_key=new_key))
    found.campaign_rows = conn.execute(
        update(rows).where(rows.c.recipient == phone).values(recipient=hashed, error_message=None)
    ).rowcount
    return [message_id for _, message_id in held if message_id is not None]


def _keep_suppressed(conn: Connection, phone: str, hashed: str) -> None:
    sup = schema.suppressions
    held = conn.execute(select(sup).where(sup.c.recipient == phone)).mappings().first()
    conn.execute(delete(sup).where(sup.c.recipient.in_([phone, hashed])))
    detail = "erased on request" + (f"; it had {held['detail']}" if held and held["detail"] else "")
    values = {
        "recipient": hashed,
        "opted_out": True,
        "changed_at": time.time(),
        "via": held["via"] if held else VIA_ERASURE,
        "detail": mask_numbers_in(detail)[:200],
        "synced_at": held["synced_at"] if held else None,
        "revision": (held["revision"] + 1) if held else 1,
    }
    conn.execute(sup.insert().values(values))


def _mentioning(conn: Connection, table: Any, columns: tuple[str, ...], phone: str) -> Iterator[Any]:
    """Rows whose text columns spell ``phone`` in any way: a prefilter in the database on its last
    eight digits with separators taken out, then every digit run in the text compared."""
    tail = phone[-8:]
    like = or_(*(_without_separators(table.c[column]).like(f"%{tail}%") for column in columns))
    for row in conn.execute(select(table).where(like)).mappings():
        if any(_spells(row[column] or "", phone) for column in columns):
            yield row


def _without_separators(column: Any) -> Any:
    for separator in _SEPARATORS:
        column = func.replace(column, separator, "")
    return column


_SEPARATORS = (" ", "-", ".", "(", ")", "/", "\u00a0")
# Digits as people and gateways write a number: separated by spaces, dashes, dots or brackets.
_DIGIT_RUNS = re.compile(r"\+?\(?\d[\d\s().\-/]{6,30}\d")
_MAX_COUNTRY_CODE = 3


def _spells(text_value: str, phone: str) -> bool:
    """True when the text holds the number: whole, or without its country code (a national form,
    a leading trunk 0 included), in any of the spellings of ``_DIGIT_RUNS``."""
    if phone in text_value:
        return True
    for run in _DIGIT_RUNS.findall(text_value):
        digits = canonical_number(run)
        national = digits.lstrip("0")
        if digits == phone or (len(national) >= len(phone) - _MAX_COUNTRY_CODE and phone.endswith(national)):
            return True
    return False


def _delete_mentions(conn: Connection, table: Any, key: str, columns: tuple[str, ...], phone: str) -> int:
    doomed = [row[key] for row in _mentioning(conn, table, columns, phone)]
    for chunk in chunks(doomed):
        conn.execute(delete(table).where(table.c[key].in_(chunk)))
    return len(doomed)


def _scrub_mentions(conn: Connection, table: Any, key: str | None, column: str, phone: str) -> int:
    columns = [table.c[key]] if key else list(table.primary_key.columns)
    mentions = list(_mentioning(conn, table, (column,), phone))
    for row in mentions:
        where = [c == row[c.name] for c in columns]
        conn.execute(update(table).where(*where).values({column: "(erased)"}))
    return len(mentions)


@dataclass(frozen=True)
class TableStats:
    """One table of the store: its rows, its bytes on disk (None where the database cannot say)
    and when its oldest row was written (epoch seconds, or None)."""

    table: str
    rows: int
    bytes: int | None
    oldest: float | None


_AGE_COLUMNS = {
    "pepipost_events": "received_at",
    "pepipost_inbound_messages": "received_at",
    "pepipost_dead_letters": "received_at",
    "pepipost_ledger": "sent_at",
    "pepipost_campaign_rows": "updated_at",
    "pepipost_message_status": "updated_at",
    "pepipost_consent_batches": "updated_at",
    "pepipost_reply_claims": "claimed_at",
    "pepipost_reply_cursors": "updated_at",
    "pepipost_approval_requests": "created_at",
    "pepipost_approval_answers": "decided_at",
    "pepipost_suppressions": "changed_at",
    "pepipost_store_settings": "updated_at",
    "pepipost_schema_version": "applied_at",
}


def stats(engine: Engine) -> list[TableStats]:
    """Rows, bytes and the oldest row of every table of the store."""
    found = []
    with engine.connect() as conn:
        sizes = _table_bytes(conn)
        for name, table in sorted(schema.metadata.tables.items()):
            column = table.c[_AGE_COLUMNS[name]]
            rows, oldest = conn.execute(select(func.count(), func.min(column)).select_from(table)).one()
            found.append(TableStats(name, int(rows), sizes.get(name), oldest))
    return found


def _table_bytes(conn: Connection) -> dict[str, int]:
    """Bytes per table, its indexes included: PostgreSQL's relation sizes, SQLite's dbstat pages."""
    names = list(schema.metadata.tables)
    if conn.dialect.name == "postgresql":
        query = text("SELECT relname, pg_total_relation_size(oid) FROM pg_class WHERE relname = ANY(:names)")
        return {name: int(size) for name, size in conn.execute(query, {"names": names})}
    try:
        pages = conn.execute(text("SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')")).all()
        owner = {name: table for name, table in pages}
        sizes: dict[str, int] = {}
        for name, size in conn.execute(text("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")):
            table = owner.get(name, name)
            sizes[table] = sizes.get(table, 0) + int(size)
        return {name: sizes[name] for name in names if name in sizes}
    except Exception:  # an SQLite built without the dbstat table
        return {}
