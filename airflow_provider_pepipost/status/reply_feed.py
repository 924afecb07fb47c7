"""Customer messages as a feed: a cursor per feed, kept in the store, and each message claimed by
one DAG run per consumer.

Functions of an open connection; ``StatusStore`` runs them. ``WhatsAppReplyTrigger`` reads the
feed and advances its cursor once Airflow has stored the events it fired; a run that handles
replies claims them, so that a reply delivered twice (a triggerer restart redelivers what was not
yet confirmed) is handled once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, func, select, update

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import chunks, insert_for
from airflow_provider_pepipost.status.replies import Reply, replies_where

CLAIM_CHUNK = 1000  # rows an INSERT carries: SQLite caps the parameters of one statement


def latest_inbound_id(conn: Connection) -> int:
    """The newest customer message's id; 0 when the store has none."""
    return int(conn.execute(select(func.max(schema.inbound_messages.c.id))).scalar() or 0)


def open_cursor(conn: Connection, name: str, now: float, start: int | None = None) -> int:
    """Where the feed ``name`` has got to; a new feed starts at ``start``, by default the newest
    message (never an old one)."""
    cursors = schema.reply_cursors
    found = conn.execute(select(cursors.c.last_inbound_id).where(cursors.c.name == name)).scalar()
    if found is not None:
        return int(found)
    start = latest_inbound_id(conn) if start is None else start
    conn.execute(
        insert_for(conn, cursors)
        .values(name=name, last_inbound_id=start, first_inbound_id=start, updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
    )
    # Two triggerers opening the same new feed at once: the first one's start holds.
    return int(conn.execute(select(cursors.c.last_inbound_id).where(cursors.c.name == name)).scalar_one())


def feed_start(conn: Connection, name: str) -> int | None:
    """The newest message's id when the feed ``name`` was made (it fires for none up to it); None: no such feed."""
    cursors = schema.reply_cursors
    found = conn.execute(select(cursors.c.first_inbound_id).where(cursors.c.name == name)).scalar()
    return None if found is None else int(found)


def unclaimed(
    conn: Connection, consumer: str, after_id: int, received_since: float, limit: int, **only: Any
) -> list[Reply]:
    """Customer messages after ``after_id``, received since ``received_since``, that no run of
    ``consumer`` claimed; oldest first, at most ``limit``. ``only`` narrows them in the query:
    ``kinds``, ``button_payloads``, and ``dag_id`` / ``task_id`` of the message they answer."""
    inbound, claims, led = schema.inbound_messages, schema.reply_claims, schema.ledger
    taken = select(claims.c.inbound_id).where(claims.c.consumer == consumer, claims.c.inbound_id == inbound.c.id)
    where = [inbound.c.id > after_id, inbound.c.received_at >= received_since, ~taken.exists()]
    if only.get("kinds"):
        where.append(inbound.c.kind.in_(only["kinds"]))
    if only.get("button_payloads"):
        where.append(inbound.c.button_payload.in_(only["button_payloads"]))
    for field in ("dag_id", "task_id"):
        if only.get(field):
            where.append(led.c[field] == only[field])
    return replies_where(conn, *where, limit=limit)


def advance_cursor(conn: Connection, name: str, inbound_id: int, now: float) -> None:
    """Move the feed's cursor forward to ``inbound_id``; never back."""
    cursors = schema.reply_cursors
    conn.execute(
        update(cursors)
        .where(cursors.c.name == name, cursors.c.last_inbound_id < inbound_id)
        .values(last_inbound_id=inbound_id, updated_at=now)
    )


def claim(
    conn: Connection, consumer: str, inbound_ids: Iterable[int], dag_id: str, run_id: str, now: float
) -> list[int]:
    """Claim these messages for ``consumer`` as this run; return the ones this run holds.

    A message another run claimed first is not returned; one this run claimed before (a retry of
    the claiming task) is returned again.
    """
    claims = schema.reply_claims
    wanted = sorted({int(inbound_id) for inbound_id in inbound_ids})
    if not wanted:
        return []
    rows = [
        {"consumer": consumer, "inbound_id": inbound_id, "dag_id": dag_id, "run_id": run_id, "claimed_at": now}
        for inbound_id in wanted
    ]
    held: list[int] = []
    for chunk in chunks(rows, CLAIM_CHUNK):
        insert = insert_for(conn, claims).values(chunk)
        conn.execute(insert.on_conflict_do_nothing(index_elements=["consumer", "inbound_id"]))
        mine = select(claims.c.inbound_id).where(
            claims.c.consumer == consumer,
            claims.c.inbound_id.in_([row["inbound_id"] for row in chunk]),
            claims.c.dag_id == dag_id,
            claims.c.run_id == run_id,
        )
        held.extend(int(inbound_id) for inbound_id in conn.execute(mine).scalars())
    return sorted(held)
