"""Bring a status store made by an older provider version up to ``schema.SCHEMA_VERSION``.

``create_all`` makes missing tables, never missing columns: each version that adds a column to an
existing table has a step here, run once, in order, inside the schema transaction.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, delete, insert, inspect, select, text, update

from airflow_provider_pepipost.numbers import phone_or_none
from airflow_provider_pepipost.status import schema


def _add_column(conn: Connection, table: str, column: str, ddl_type: str) -> None:
    # Two processes may migrate at once: adding a column that is already there is a no-op.
    if column not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl_type}"))


def _v2_ledger_attempt(conn: Connection) -> None:
    """v2: the ledger records which try claimed a row, so that no decision compares clocks."""
    _add_column(conn, schema.ledger.name, "attempt", "VARCHAR(32)")


def _v3_dead_letter_key(conn: Connection) -> None:
    """v3: dead letters carry a key (the body's hash and the item's place), stored once each."""
    _add_column(conn, schema.dead_letters.name, "letter_key", "VARCHAR(64)")
    # IF NOT EXISTS: SQLite and PostgreSQL both know it, and two migrating processes may race.
    table = schema.dead_letters.name
    conn.execute(text(f"CREATE UNIQUE INDEX IF NOT EXISTS ux_pepipost_dead_letters_key ON {table} (letter_key)"))


def _v4_ledger_campaign(conn: Connection) -> None:
    """v4: the ledger records each row's campaign, so that summaries keep two campaigns apart."""
    _add_column(conn, schema.ledger.name, "campaign", "VARCHAR(32)")


def _v5_consent_tables(conn: Connection) -> None:
    """v5: the suppression list and the consent calls: new tables, which ``create_all`` made."""


def _v6_first_delivered_and_read(conn: Connection) -> None:
    """v6: each message's first delivered and first read time, filled from the events stored."""
    table = schema.message_status.name
    _add_column(conn, table, "delivered_at", "FLOAT")
    _add_column(conn, table, "read_at", "FLOAT")

    def first(statuses: str) -> str:
        return (
            "(SELECT MIN(COALESCE(e.reported_at, e.received_at)) FROM pepipost_events e "
            f"WHERE e.message_id = {table}.message_id AND e.status IN {statuses})"
        )

    delivered, read = first("('delivered', 'read')"), first("('read')")
    conn.execute(
        text(f"UPDATE {table} SET delivered_at = {delivered}, read_at = {read} WHERE status IN ('delivered', 'read')")
    )


def _v7_canonical_numbers(conn: Connection) -> None:
    """v7: every stored number in its canonical form; the ledger's clear generation and the
    suppression list's revision.

    Before v7 a reply's sender was stored as written ('+91 98330 78369'), and a leading '00' was
    kept everywhere, so a STOP could miss the same number spelled another way.
    """
    _add_column(conn, schema.ledger.name, "generation", "INTEGER")
    _add_column(conn, schema.suppressions.name, "revision", "INTEGER NOT NULL DEFAULT 1")
    _canonical_suppressions(conn)
    for table, key, column in (
        (schema.inbound_messages, "id", "sender"),
        (schema.events, "id", "recipient"),
        (schema.ledger, "idempotency_key", "recipient"),
    ):
        _canonical_column(conn, table, key, column)


def _not_canonical(conn: Connection, column: str) -> str:
    """SQL true for values that may not be canonical: a leading 00, or anything but digits."""
    other = f"{column} ~ '[^0-9]'" if conn.dialect.name == "postgresql" else f"{column} GLOB '*[^0-9]*'"
    return f"({column} LIKE '00%' OR {other})"


def _canonical_column(conn: Connection, table, key: str, column: str) -> None:
    """Rewrite the values that are numbers written another way (group ids and junk stay)."""
    found = conn.execute(
        select(table.c[key], table.c[column]).where(text(_not_canonical(conn, f"{table.name}.{column}")))
    ).all()
    fixes = [(row_key, number) for row_key, value in found if (number := phone_or_none(value)) and number != value]
    for row_key, number in fixes:
        conn.execute(update(table).where(table.c[key] == row_key).values({column: number}))


def _canonical_suppressions(conn: Connection) -> None:
    """One row per canonical number; where spellings collide, the latest change wins (an opt-out on a tie)."""
    sup = schema.suppressions
    rows = conn.execute(select(sup)).mappings().all()
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(phone_or_none(row["recipient"]) or row["recipient"], []).append(dict(row))
    for number, group in groups.items():
        if len(group) == 1 and group[0]["recipient"] == number:
            continue
        winner = max(group, key=lambda row: (row["changed_at"], row["opted_out"]))
        conn.execute(delete(sup).where(sup.c.recipient.in_([row["recipient"] for row in group])))
        conn.execute(insert(sup).values({**winner, "recipient": number}))


def _v8_campaign_rows_and_pricing(conn: Connection) -> None:
    """v8: what each report said the message cost; one row per input row, filled from the ledger.

    Rows the ledger never held (duplicates, rows a stopped campaign never claimed) cannot be
    recovered for runs before v8: their pages show what the ledger has. A row's pick is its best
    ledger row (accepted, then in flight, suppressed, not sent, rejected); an accepted template
    beside a session message refused with 8007 is the row's fallback.
    """
    table = schema.message_status.name
    _add_column(conn, table, "billable", "BOOLEAN")
    _add_column(conn, table, "category", "VARCHAR(32)")
    _add_column(conn, table, "pricing_model", "VARCHAR(32)")
    place = "dag_id, run_id, task_id, map_index, row_index"
    rank = (
        "CASE state WHEN 'accepted' THEN 5 WHEN 'unknown' THEN 4 WHEN 'sending' THEN 4 WHEN 'suppressed' THEN 3 "
        "WHEN 'not_sent' THEN 2 ELSE 1 END"
    )
    conn.execute(
        text(
            f"INSERT INTO {schema.campaign_rows.name} ({place}, state, recipient, ledger_key, message_id, error_code, "
            "error_message, campaign, attempt, updated_at) "
            f"SELECT {place}, CASE WHEN state = 'sending' THEN 'unknown' "
            "WHEN state = 'accepted' AND closed = 1 THEN 'fallback' ELSE state END, "
            "recipient, idempotency_key, message_id, error_code, error_message, campaign, attempt, updated_at "
            f"FROM (SELECT l.*, ROW_NUMBER() OVER (PARTITION BY {place} ORDER BY {rank} DESC, idempotency_key) "
            "AS pick, "
            "MAX(CASE WHEN state = 'rejected' AND error_code = '8007' THEN 1 ELSE 0 END) "
            f"OVER (PARTITION BY {place}) AS closed FROM {schema.ledger.name} l) ranked WHERE pick = 1"
        )
    )


def _v9_store_settings(conn: Connection) -> None:
    """v9: the store's settings (a new table, which ``create_all`` made); a store that erased
    numbers before v9 records that it did, with a fingerprint it cannot know: from now on the send
    path needs the erasure key to recognise them."""
    sup, settings = schema.suppressions, schema.store_settings
    erased = conn.execute(select(sup.c.recipient).where(sup.c.recipient.like("h:%")).limit(1)).first()
    known = conn.execute(select(settings.c.name).where(settings.c.name == ERASURE_FINGERPRINT)).first()
    if erased and not known:
        conn.execute(insert(settings).values(name=ERASURE_FINGERPRINT, value=UNKNOWN_FINGERPRINT, updated_at=0.0))


def _v10_inbound_kinds(conn: Connection) -> None:
    """v10: what each kind of inbound message carries, in columns; replies found by what they answer."""
    table = schema.inbound_messages.name
    for column, ddl_type in (
        ("kind", "VARCHAR(32)"),
        ("message_id", "VARCHAR(128)"),
        ("text", "TEXT"),
        ("button_payload", "VARCHAR(256)"),
        ("media_id", "VARCHAR(256)"),
        ("latitude", "FLOAT"),
        ("longitude", "FLOAT"),
    ):
        _add_column(conn, table, column, ddl_type)
    conn.execute(text(f"CREATE INDEX IF NOT EXISTS ix_pepipost_inbound_context ON {table} (context_message_id)"))


def _v11_reply_feeds(conn: Connection) -> None:
    """v11: the reply feeds' cursors and the replies' claims (new tables, which ``create_all``
    made); on SQLite, customer messages rebuilt with AUTOINCREMENT, so that the id of an erased or
    purged message is never given to the next one, which a cursor or a claim would take for it."""
    if conn.dialect.name != "sqlite":
        return
    table = schema.inbound_messages
    ddl = text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :name")
    if "AUTOINCREMENT" in (conn.execute(ddl, {"name": table.name}).scalar() or "").upper():
        return
    conn.execute(text(f"ALTER TABLE {table.name} RENAME TO {table.name}_v10"))
    for index in table.indexes:  # they moved with the old table; the new one makes them again
        conn.execute(text(f"DROP INDEX IF EXISTS {index.name}"))
    table.create(conn)
    columns = ", ".join(column.name for column in table.columns)
    conn.execute(text(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM {table.name}_v10"))
    conn.execute(text(f"DROP TABLE {table.name}_v10"))


def _v12_approvals(conn: Connection) -> None:
    """v12: approval requests sent on WhatsApp and the taps that answered them: new tables, which
    ``create_all`` made."""


ERASURE_FINGERPRINT = "erasure_key_fingerprint"
UNKNOWN_FINGERPRINT = "unknown"

# version -> the step that makes it from the version before
MIGRATIONS: dict[int, Callable[[Connection], None]] = {
    2: _v2_ledger_attempt,
    3: _v3_dead_letter_key,
    4: _v4_ledger_campaign,
    5: _v5_consent_tables,
    6: _v6_first_delivered_and_read,
    7: _v7_canonical_numbers,
    8: _v8_campaign_rows_and_pricing,
    9: _v9_store_settings,
    10: _v10_inbound_kinds,
    11: _v11_reply_feeds,
    12: _v12_approvals,
}


def migrate(conn: Connection, found: int) -> list[int]:
    """Run the steps after version ``found``; return the versions applied."""
    applied = []
    for version in range(found + 1, schema.SCHEMA_VERSION + 1):
        MIGRATIONS[version](conn)
        applied.append(version)
    return applied
