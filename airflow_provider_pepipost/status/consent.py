"""Consent in the store: the suppression list (numbers that opted out) and the consent batches
the vendor confirmed, so that a retried consent task does not call it again for them.

Functions of an open connection; ``StatusStore`` runs them in its transactions. The last change
written wins: opting in after an opt-out lifts it, a stop word after an opt-in suppresses again.
Nothing compares clocks: the order is the database's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import chunks, insert_for
from airflow_provider_pepipost.status.ledger import TaskKey

# How a number came to be on (or off) the suppression list.
VIA_REPLY = "reply"  # an inbound reply that was a stop word (the receiver)
VIA_CONSENT_API = "consent_api"  # a consent task's opt-out or opt-in, confirmed by the vendor


@dataclass(frozen=True)
class ConsentBatch:
    """A consent call of a task instance, as the store recorded it."""

    batch_key: str
    kind: str
    rows: int
    state: str  # confirmed | refused
    error_code: str | None = None
    error_message: str | None = None


def set_opted_out(
    conn: Connection, recipients: Iterable[str], opted_out: bool, via: str, detail: str, now: float
) -> None:
    """Put numbers on the suppression list (``opted_out``) or take them off it."""
    rows = [
        {
            "recipient": r,
            "opted_out": opted_out,
            "changed_at": now,
            "via": via,
            "detail": detail[:200],
            "synced_at": None,
        }
        for r in dict.fromkeys(recipients)
    ]
    if not rows:
        return
    sup = schema.suppressions
    stmt = insert_for(conn, sup)
    stmt = stmt.on_conflict_do_update(
        index_elements=[sup.c.recipient],
        set_={
            "opted_out": stmt.excluded.opted_out,
            "changed_at": stmt.excluded.changed_at,
            "via": stmt.excluded.via,
            "detail": stmt.excluded.detail,
            "synced_at": stmt.excluded.synced_at,
        },
    )
    conn.execute(stmt, rows)


def suppressed(conn: Connection, recipients: Iterable[str]) -> set[str]:
    """Which of these numbers have opted out."""
    sup = schema.suppressions
    found: set[str] = set()
    for chunk in chunks(list(dict.fromkeys(recipients))):
        found.update(
            conn.execute(select(sup.c.recipient).where(sup.c.recipient.in_(chunk), sup.c.opted_out.is_(True))).scalars()
        )
    return found


def unsynced_reply_opt_outs(conn: Connection, limit: int) -> list[str]:
    """Numbers that opted out by a reply and were not passed on to the vendor yet, oldest first."""
    sup = schema.suppressions
    query = (
        select(sup.c.recipient)
        .where(sup.c.opted_out.is_(True), sup.c.via == VIA_REPLY, sup.c.synced_at.is_(None))
        .order_by(sup.c.changed_at, sup.c.recipient)
        .limit(limit)
    )
    return list(conn.execute(query).scalars())


def mark_synced(conn: Connection, recipients: Sequence[str], now: float) -> None:
    """The vendor confirmed the opt-out of these numbers (still opted out by a reply)."""
    sup = schema.suppressions
    for chunk in chunks(list(recipients)):
        conn.execute(
            update(sup)
            .where(sup.c.recipient.in_(chunk), sup.c.opted_out.is_(True), sup.c.via == VIA_REPLY)
            .values(synced_at=now)
        )


def batches_of(conn: Connection, task: TaskKey) -> dict[str, ConsentBatch]:
    """The consent calls an earlier try of this task instance recorded, by batch key."""
    cb = schema.consent_batches
    rows = conn.execute(
        select(cb.c.batch_key, cb.c.kind, cb.c.rows, cb.c.state, cb.c.error_code, cb.c.error_message).where(
            cb.c.dag_id == task.dag_id,
            cb.c.run_id == task.run_id,
            cb.c.task_id == task.task_id,
            cb.c.map_index == task.map_index,
        )
    )
    return {row.batch_key: ConsentBatch(*row) for row in rows}


def record_batch(
    conn: Connection,
    task: TaskKey,
    batch: ConsentBatch,
    now: float,
) -> None:
    """Record one consent call's outcome (a later try's outcome replaces an earlier one's)."""
    cb = schema.consent_batches
    values = {
        "batch_key": batch.batch_key,
        "dag_id": task.dag_id,
        "run_id": task.run_id,
        "task_id": task.task_id,
        "map_index": task.map_index,
        "kind": batch.kind,
        "rows": batch.rows,
        "state": batch.state,
        "error_code": batch.error_code,
        "error_message": limits.storable(batch.error_message, limits.REASON_MAX) if batch.error_message else None,
        "updated_at": now,
    }
    stmt = insert_for(conn, cb)
    stmt = stmt.on_conflict_do_update(
        index_elements=[cb.c.batch_key],
        set_={name: getattr(stmt.excluded, name) for name in ("state", "error_code", "error_message", "updated_at")},
    )
    conn.execute(stmt, values)
