"""Consent in the store: the suppression list (numbers that opted out) and the consent batches
the vendor confirmed, so that a retried consent task does not call it again for them.

Functions of an open connection; ``StatusStore`` runs them in its transactions. Every number is
written and compared in its canonical form (``numbers.canonical_number``). An opt-out is written
whatever the row held; an opt-in only where the row still holds what it held when the consent
call's rows were read (its ``revision``), so a STOP that arrives while the call is with the
vendor is never undone by the call's confirmation. Nothing compares clocks: the order is the
database's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import Connection, select, update

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.numbers import canonical_number, key_fingerprint, number_hash
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import chunks, insert_for
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.migrations import ERASURE_FINGERPRINT, UNKNOWN_FINGERPRINT
from airflow_provider_pepipost.status.resolver import ERASURE_KEY_ENV, erasure_key

# The state of the record of a number of a confirmed opt-in batch that said STOP while the call
# was with the vendor (kept under ``raced_key``, beside the batch's own record).
RACED = "raced"

# How a number came to be on (or off) the suppression list.
VIA_REPLY = "reply"  # an inbound reply that was a stop word (the receiver)
VIA_CONSENT_API = "consent_api"  # a consent task's opt-out or opt-in, confirmed by the vendor


@dataclass(frozen=True, slots=True)
class Consent:
    """What the suppression list held for a number when a consent call's rows were read."""

    opted_out: bool
    revision: int


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
    """Put numbers on the suppression list (``opted_out``) or take them off it, whatever it held."""
    rows = [_row(number, opted_out, via, detail, now) for number in dict.fromkeys(map(canonical_number, recipients))]
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
            "revision": sup.c.revision + 1,
        },
    )
    conn.execute(stmt, rows)


def opt_in_if_unchanged(conn: Connection, expected: dict[str, Consent | None], detail: str, now: float) -> set[str]:
    """Take numbers off the suppression list (or record their opt-in) where the row still holds
    what ``expected`` says it held when the call's rows were read (None: no row).

    Returns the numbers whose row changed meanwhile: their opt-in is not recorded.
    """
    sup = schema.suppressions
    changed: set[str] = set()
    for number, held in expected.items():
        number = canonical_number(number)
        if held is None:
            stmt = insert_for(conn, sup).on_conflict_do_nothing(index_elements=[sup.c.recipient])
            done = conn.execute(stmt, _row(number, False, VIA_CONSENT_API, detail, now)).rowcount
        else:
            values = {**_row(number, False, VIA_CONSENT_API, detail, now), "revision": sup.c.revision + 1}
            where = (sup.c.recipient == number, sup.c.revision == held.revision)
            done = conn.execute(update(sup).where(*where).values(values)).rowcount
        if not done:
            changed.add(number)
    return changed


def raced_key(batch_key: str, number: str) -> str:
    """The record of a number of the confirmed batch ``batch_key`` that said STOP while the call was
    with the vendor: a retry that reuses the batch finds it by the batch's rows."""
    return "cr-" + hashlib.sha256(f"{batch_key}:{number}".encode()).hexdigest()[:40]


def consents(conn: Connection, recipients: Iterable[str]) -> dict[str, Consent]:
    """What the suppression list holds for these numbers (canonical), by number; absent: no row.

    An erased number's opt-out, kept under its keyed hash, counts as the number's own: a consent
    call must not opt in at the vendor someone whose STOP survived their erasure."""
    key = usable_erasure_key(conn)
    sup = schema.suppressions
    found: dict[str, Consent] = {}
    numbers = list(dict.fromkeys(map(canonical_number, recipients)))
    hashed = {number_hash(number, key): number for number in numbers} if key else {}
    for chunk in chunks([*numbers, *hashed]):
        query = select(sup.c.recipient, sup.c.opted_out, sup.c.revision).where(sup.c.recipient.in_(chunk))
        for recipient, out, revision in conn.execute(query):
            if recipient in hashed and out:
                found[hashed[recipient]] = Consent(True, revision)
            elif recipient not in hashed:
                found.setdefault(recipient, Consent(bool(out), revision))
    return found


def usable_erasure_key(conn: Connection) -> str | None:
    """The erasure key, when this store holds erased numbers; raises when they cannot be recognised.

    Without the key (or with another one) the send path would not find an erased number's hash,
    and would message someone whose STOP survived their erasure: so nothing is sent instead.
    """
    key = erasure_key()
    settings = schema.store_settings
    held = conn.execute(select(settings.c.value).where(settings.c.name == ERASURE_FINGERPRINT)).scalar()
    if held is None:
        return key
    if key is None:
        raise PepipostConfigError(
            "this status store holds numbers erased on request, kept suppressed under a keyed hash; without the "
            f"erasure key (${ERASURE_KEY_ENV} or [pepipost] erasure_key) they cannot be recognised, so nothing is "
            "sent. Set the key the numbers were erased with for every Airflow component"
        )
    if held not in (UNKNOWN_FINGERPRINT, key_fingerprint(key)):
        raise PepipostConfigError(
            f"the erasure key set (${ERASURE_KEY_ENV} or [pepipost] erasure_key) is not the one this status store's "
            "erased numbers were kept with, so they cannot be recognised and nothing is sent; set the original key"
        )
    return key


def suppressed(conn: Connection, recipients: Iterable[str]) -> set[str]:
    """Which of these numbers have opted out, as the caller spelled them; an erased number is
    found by its keyed hash (``numbers.number_hash``); a store that holds any needs the right key."""
    key = usable_erasure_key(conn)
    spelled: dict[str, list[str]] = {}
    for recipient in recipients:
        number = canonical_number(recipient)
        spelled.setdefault(number, []).append(recipient)
        if key:
            spelled.setdefault(number_hash(number, key), []).append(recipient)
    sup = schema.suppressions
    found: set[str] = set()
    for chunk in chunks(list(spelled)):
        for number in conn.execute(
            select(sup.c.recipient).where(sup.c.recipient.in_(chunk), sup.c.opted_out.is_(True))
        ).scalars():
            found.update(spelled[number])
    return found


def _row(number: str, opted_out: bool, via: str, detail: str, now: float) -> dict:
    return {
        "recipient": number,
        "opted_out": opted_out,
        "changed_at": now,
        "via": via,
        "detail": detail[:200],
        "synced_at": None,
        "revision": 1,
    }


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
    for chunk in chunks(list(dict.fromkeys(map(canonical_number, recipients)))):
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
