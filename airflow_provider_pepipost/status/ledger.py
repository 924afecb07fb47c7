"""The send ledger: what each task instance claimed, sent and heard back, by idempotency key.

Functions of an open connection; ``StatusStore`` runs them in its transactions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, bindparam, case, func, null, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import execute_each, execute_many, insert_for, on_driver, prebuilt
from airflow_provider_pepipost.status.model import LedgerState

IN_FLIGHT_STATES = (LedgerState.SENDING.value, LedgerState.UNKNOWN.value)
# Rows a later try may send again: the vendor refused them, a stopped campaign never sent them, or
# the number was suppressed then (a later try checks the suppression list again).
RESENDABLE_STATES = (LedgerState.REJECTED.value, LedgerState.NOT_SENT.value, LedgerState.SUPPRESSED.value)


def campaign_hash(campaign_key: str) -> str:
    """How the ledger keeps a campaign key (which may be longer than any column)."""
    return hashlib.sha256(campaign_key.encode()).hexdigest()[: limits.CAMPAIGN_HASH_MAX]


@dataclass(frozen=True)
class TaskKey:
    """The task instance that sent a set of messages, and which of its rows a reader wants."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    # Only the rows whose send outcome was unknown (the sensor's share of a listed send whose
    # accepted ids travel beside this reference), reconciled ones included.
    only_unknown: bool = False
    # Only the rows of this campaign (``campaign_hash``): a task instance may have sent two.
    campaign: str | None = None

    def of_campaign(self, campaign_key: str) -> TaskKey:
        """This task instance's rows of one campaign only."""
        return dataclasses.replace(self, campaign=campaign_hash(campaign_key))

    @property
    def instance(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)


@dataclass(frozen=True, slots=True)
class Claim:
    """A message about to be sent, as the ledger records it."""

    key: str
    api_header: str
    recipient: str
    row_index: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one send."""

    key: str
    state: str  # accepted | rejected | unknown | not_sent (a claim given back unsent)
    message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class LedgerEntry:
    idempotency_key: str
    api_header: str
    message_id: str | None
    state: str
    row_index: int
    error_code: str | None = None
    error_message: str | None = None
    reconciled: bool = False  # the message id came from a delivery report, after an unknown outcome
    campaign: str | None = None  # ``campaign_hash`` of the row's campaign key


@dataclass(frozen=True, slots=True)
class RowRecord:
    """What became of one input row, as the task's XCom ``messages`` says it (the campaign page
    and its CSV read these, one per input row)."""

    row_index: int
    recipient: str
    state: str  # accepted | fallback | rejected | unknown | duplicate | not_sent | suppressed
    ledger_key: str | None  # the ledger row of the message that stands for it, if any
    message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimAnswer:
    """What the ledger said to one claim. Only a granted claim may be sent."""

    granted: bool
    # The number is on the suppression list: the row is recorded ``suppressed``, not sent.
    suppressed: bool = False
    # Another task instance of this run sent it before the run was cleared: the row now belongs
    # to the claimer, which reports this entry instead of sending again.
    taken_over: LedgerEntry | None = None

    def __bool__(self) -> bool:
        return self.granted


GRANTED, HELD = ClaimAnswer(True), ClaimAnswer(False)
SUPPRESSED = ClaimAnswer(False, suppressed=True)


def task_filter(task: TaskKey) -> tuple[Any, ...]:
    """The ledger rows of one task instance."""
    led = schema.ledger
    return (
        led.c.dag_id == task.dag_id,
        led.c.run_id == task.run_id,
        led.c.task_id == task.task_id,
        led.c.map_index == task.map_index,
    )


def open_ledger(conn: Connection, task: TaskKey) -> dict[str, LedgerEntry]:
    """What earlier tries of this task instance recorded, by idempotency key.

    Rows an earlier try left 'sending' died in flight: they may have been accepted, so they
    become 'unknown' and are never sent again.
    """
    led = schema.ledger
    conn.execute(
        update(led)
        .where(*task_filter(task), led.c.state == LedgerState.SENDING.value)
        .values(
            state=LedgerState.UNKNOWN.value,
            error_message="the try that sent it ended before the answer came",
            updated_at=time.time(),
        )
    )
    rows = conn.execute(
        select(
            led.c.idempotency_key,
            led.c.api_header,
            led.c.message_id,
            led.c.state,
            led.c.row_index,
            led.c.error_code,
            led.c.error_message,
            led.c.reconciled_at.is_not(None),
            led.c.campaign,
        ).where(*task_filter(task))
    ).all()
    return {row.idempotency_key: LedgerEntry(*row) for row in rows}


def claim(
    conn: Connection,
    task: TaskKey,
    claims: Sequence[Claim],
    *,
    attempt: str,
    resend_unknown: bool,
    campaign: str | None,
    now: float,
    generation: int = 0,
) -> list[ClaimAnswer]:
    """Record that these messages are being sent; the ledger's answer to each claim.

    A claim is granted only when the ledger does not hold the message yet, or holds it as
    rejected, not sent or suppressed by another try than ``attempt`` (with ``resend_unknown``,
    also as unknown). Anything else (sent, in flight, unknown, or a duplicate row of this try)
    must not go out again.

    ``generation`` is how many times the run was cleared (Airflow's ``clear_number``). A row held
    by another task instance of the same run is a duplicate row when that instance claimed it in
    this generation; from an earlier one (a clear whose upstream put the row in another map
    index), the claimer takes the row over and reports what it holds, never sending it again.
    """
    rows = _claim_rows(task, claims, attempt=attempt, campaign=campaign, now=now, generation=generation)
    granted = _grant_claims(conn, resend_unknown, rows)
    answers = [GRANTED if ok else HELD for ok in granted]
    held = {row["idempotency_key"]: index for index, row in enumerate(rows) if not granted[index]}
    held_rows = {key: rows[index] for key, index in held.items()}
    for key, entry in _take_over_from_earlier_clears(conn, task, held_rows, generation, now).items():
        answers[held[key]] = ClaimAnswer(False, taken_over=entry)
    return answers


def _claim_statement(conn: Connection, resend_unknown: bool) -> postgresql.Insert | sqlite.Insert:
    """The upsert of one claim: it inserts the row, or takes over a row a later try may send
    again, and changes nothing else."""
    led = schema.ledger
    resendable = (*RESENDABLE_STATES, LedgerState.UNKNOWN.value) if resend_unknown else RESENDABLE_STATES
    insert_stmt = insert_for(conn, led)
    new = insert_stmt.excluded
    owner = ("dag_id", "run_id", "task_id", "map_index", "row_index", "attempt", "campaign", "generation")
    return insert_stmt.on_conflict_do_update(
        index_elements=[led.c.idempotency_key],
        set_={
            "state": LedgerState.SENDING.value,
            "error_code": None,
            "error_message": None,
            "updated_at": new.updated_at,
            "sent_at": new.sent_at,
            # A row taken over belongs to the task instance that sends it now (a campaign_key
            # shared by two runs): its summaries and clears see it.
            **{name: getattr(new, name) for name in owner},
        },
        # or_ of equalities, not in_: an IN list is an expanding parameter, which a multi-row
        # statement cannot hold.
        where=or_(*(led.c.state == state for state in resendable))
        & (led.c.attempt.is_(None) | (led.c.attempt != new.attempt))
        & _not_a_sibling_of_this_clear(led, new),
    )


# The keys of the rows each statement is given (on SQLite, the order of its values on the driver).
_CLAIM_KEYS = (
    "idempotency_key", "api_header", "recipient", "row_index", "dag_id", "run_id", "task_id", "map_index", "state",
    "sent_at", "updated_at", "attempt", "campaign", "generation",
)  # fmt: skip
_ROW_KEYS = (
    "dag_id", "run_id", "task_id", "map_index", "row_index", "state", "recipient", "ledger_key", "message_id",
    "error_code", "error_message", "campaign", "attempt", "updated_at",
)  # fmt: skip
_OUTCOME_KEYS = ("key", "new_state", "new_message_id", "new_error_code", "new_error_message", "now")


def _claim_rows(
    task: TaskKey, claims: Sequence[Claim], *, attempt: str, campaign: str | None, now: float, generation: int
) -> list[dict[str, Any]]:
    """The ledger rows the claims write: each one 'sending', owned by ``task`` and this try."""
    common = {
        "dag_id": task.dag_id,
        "run_id": task.run_id,
        "task_id": task.task_id,
        "map_index": task.map_index,
        "state": LedgerState.SENDING.value,
        "sent_at": now,
        "updated_at": now,
        "attempt": attempt,
        "campaign": campaign_hash(campaign) if campaign is not None else None,
        "generation": generation,
    }
    return [
        {
            "idempotency_key": c.key,
            "api_header": c.api_header,
            "recipient": c.recipient,
            "row_index": c.row_index,
            **common,
        }
        for c in claims
    ]


def _not_a_sibling_of_this_clear(led: Any, new: Any) -> Any:
    """The held row is not another task instance's of the same run and the same clear."""
    same_instance = (
        (led.c.dag_id == new.dag_id)
        & (led.c.run_id == new.run_id)
        & (led.c.task_id == new.task_id)
        & (led.c.map_index == new.map_index)
    )
    other_run = (led.c.dag_id != new.dag_id) | (led.c.run_id != new.run_id)
    return same_instance | other_run | (func.coalesce(led.c.generation, -1) < new.generation)


def _take_over_from_earlier_clears(
    conn: Connection, task: TaskKey, held: dict[str, dict[str, Any]], generation: int, now: float
) -> dict[str, LedgerEntry]:
    """Rows held by another task instance of this run from before its last clear: move them to
    ``task`` as they are (a row left sending by the cleared try becomes unknown). Returns them.

    ``held``: the claims' ledger rows (as ``claim`` built them) by idempotency key.
    """
    if not held:
        return {}
    led = schema.ledger
    older = func.coalesce(led.c.generation, -1) < generation
    other_instance = (led.c.task_id != task.task_id) | (led.c.map_index != task.map_index)
    candidates = conn.execute(
        select(
            led.c.idempotency_key, led.c.api_header, led.c.message_id, led.c.state, led.c.row_index,
            led.c.error_code, led.c.error_message, led.c.reconciled_at.is_not(None), led.c.campaign,
        ).where(
            led.c.idempotency_key.in_(list(held)),
            led.c.dag_id == task.dag_id, led.c.run_id == task.run_id, other_instance, older,
        )
    ).all()  # fmt: skip
    taken: dict[str, LedgerEntry] = {}
    for row in candidates:
        entry = LedgerEntry(*row)
        if entry.state == LedgerState.SENDING.value:
            cleared = "the try that sent it was cleared before the answer came"
            entry = dataclasses.replace(entry, state=LedgerState.UNKNOWN.value, error_message=cleared)
        claimed = held[entry.idempotency_key]
        entry = dataclasses.replace(entry, row_index=claimed["row_index"])
        values = {
            "dag_id": task.dag_id, "run_id": task.run_id, "task_id": task.task_id, "map_index": task.map_index,
            "row_index": claimed["row_index"], "attempt": claimed["attempt"], "generation": generation,
            "updated_at": now, "state": entry.state, "error_message": entry.error_message,
        }  # fmt: skip
        # Two instances of this clear may hold the same row: the first to move it has it.
        moved = conn.execute(update(led).where(led.c.idempotency_key == entry.idempotency_key, older).values(values))
        if moved.rowcount:
            taken[entry.idempotency_key] = entry
    return taken


def _grant_claims(conn: Connection, resend_unknown: bool, rows: list[dict[str, Any]]) -> list[bool]:
    """Run the claim upsert for each row; True where it inserted or took over the row."""
    # Built once per dialect (engines.prebuilt): the send loop claims a batch every few ms. The
    # key and the statement must read the flag alike: a truthy "False" must not pass for False.
    resend_unknown = bool(resend_unknown)
    if conn.dialect.name != "postgresql":
        # In-process SQLite: one execute per claim on the driver's cursor, its rowcount the answer.
        statement = on_driver(
            conn, f"ledger.claim.{resend_unknown}", lambda c: _claim_statement(c, resend_unknown), _CLAIM_KEYS
        )
        assert statement is not None
        return execute_each(conn, statement, rows)
    claim_stmt = prebuilt(
        conn,
        f"ledger.claim.{resend_unknown}.returning",
        lambda c: _claim_statement(c, resend_unknown).returning(schema.ledger.c.idempotency_key),
    )
    # PostgreSQL: one multi-row statement whose RETURNING names the keys granted. A key twice in
    # one statement is an error there, and only its first row may win anyway.
    first: dict[str, int] = {}
    for index, row in enumerate(rows):
        first.setdefault(row["idempotency_key"], index)
    unique = [rows[index] for index in first.values()]
    won = set(conn.execute(claim_stmt, unique).scalars())
    return [key in won and first[key] == index for index, key in enumerate(r["idempotency_key"] for r in rows)]


def mark_suppressed(conn: Connection, keys: Sequence[str], now: float) -> None:
    """Claimed rows whose number is on the suppression list: recorded, never sent."""
    led = schema.ledger
    for start in range(0, len(keys), 500):
        conn.execute(
            update(led)
            .where(led.c.idempotency_key.in_(keys[start : start + 500]))
            .values(
                state=LedgerState.SUPPRESSED.value,
                error_message=SUPPRESSED_REASON,
                updated_at=now,
            )
        )


SUPPRESSED_REASON = "the recipient opted out: the number is on the status store's suppression list"


def record_rows(
    conn: Connection, task: TaskKey, rows: Sequence[RowRecord], *, campaign: str | None, attempt: str, now: float
) -> None:
    """What became of these input rows: a later try's record of a row replaces an earlier try's."""
    where = {"dag_id": task.dag_id, "run_id": task.run_id, "task_id": task.task_id, "map_index": task.map_index}
    campaign_value = campaign_hash(campaign) if campaign is not None else None
    execute_many(
        conn,
        "ledger.record_rows",
        _record_rows_statement,
        _ROW_KEYS,
        [
            {
                **where,
                "row_index": r.row_index,
                "state": r.state,
                "recipient": r.recipient,
                "ledger_key": r.ledger_key,
                "message_id": r.message_id,
                "error_code": r.error_code,
                "error_message": limits.storable(r.error_message, limits.REASON_MAX) if r.error_message else None,
                "campaign": campaign_value,
                "attempt": attempt,
                "updated_at": now,
            }
            for r in rows
        ],
    )


def _record_rows_statement(conn: Connection) -> Any:
    table = schema.campaign_rows
    stmt = insert_for(conn, table)
    changing = ("state", "recipient", "ledger_key", "message_id", "error_code", "error_message", "campaign", "attempt")
    return stmt.on_conflict_do_update(
        index_elements=[table.c.dag_id, table.c.run_id, table.c.task_id, table.c.map_index, table.c.row_index],
        set_={**{name: getattr(stmt.excluded, name) for name in changing}, "updated_at": stmt.excluded.updated_at},
    )


def prune_rows(conn: Connection, task: TaskKey, attempt: str) -> None:
    """Forget the rows an earlier try recorded beyond this try's audience (it had fewer rows)."""
    table = schema.campaign_rows
    conn.execute(
        table.delete().where(
            table.c.dag_id == task.dag_id,
            table.c.run_id == task.run_id,
            table.c.task_id == task.task_id,
            table.c.map_index == task.map_index,
            table.c.attempt != attempt,
        )
    )


def record_outcomes(conn: Connection, outcomes: Sequence[Outcome], now: float) -> None:
    """The answers to sends; the outcome ``not_sent`` gives back a claim whose request never went out."""
    execute_many(
        conn,
        "ledger.record_outcomes",
        _record_outcomes_statement,
        _OUTCOME_KEYS,
        [
            {
                "key": o.key,
                "new_state": o.state,
                "new_message_id": o.message_id,
                "new_error_code": o.error_code,
                "new_error_message": o.error_message,
                "now": now,
            }
            for o in outcomes
        ],
    )


def _record_outcomes_statement(conn: Connection) -> Any:
    led = schema.ledger
    accepted = LedgerState.ACCEPTED.value
    # A delivery report may have reconciled the row while its request hung: a late 'unknown' (or
    # 'rejected') must not wipe the message id it found.
    return (
        update(led)
        .where(
            led.c.idempotency_key == bindparam("key"),
            led.c.message_id.is_(None) | (bindparam("new_state") == accepted),
        )
        .values(
            state=bindparam("new_state"),
            message_id=bindparam("new_message_id"),
            error_code=bindparam("new_error_code"),
            error_message=bindparam("new_error_message"),
            updated_at=bindparam("now"),
            # The send's own answer wins over a report that came first: that row was never
            # unknown, and the XCom lists its id (the sensor must not count it twice).
            reconciled_at=case((bindparam("new_state") == accepted, null()), else_=led.c.reconciled_at),
        )
    )


def message_ids(conn: Connection, task: TaskKey) -> list[str]:
    """The ids of every accepted message of a task instance, in input order."""
    led = schema.ledger
    return list(
        conn.execute(
            select(led.c.message_id).where(*task_filter(task), led.c.message_id.is_not(None)).order_by(led.c.row_index)
        ).scalars()
    )


def task_keys(conn: Connection, dag_id: str, run_id: str | None = None) -> list[TaskKey]:
    """The task instances of a DAG (and run) that sent messages."""
    led = schema.ledger
    query = select(led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index).distinct()
    query = query.where(led.c.dag_id == dag_id)
    if run_id is not None:
        query = query.where(led.c.run_id == run_id)
    return [TaskKey(*row) for row in conn.execute(query.order_by(led.c.run_id, led.c.task_id, led.c.map_index))]
