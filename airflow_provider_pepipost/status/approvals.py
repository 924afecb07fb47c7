"""Approval requests sent on WhatsApp, and the taps that answer them, in the status store.

Functions of an open connection; ``StatusStore`` runs them. The notifier records a request per
message it sent; the receiver reads the taps on those messages not handled yet (``pending_taps``)
and decides each. A tap that answers is claimed first (``claim``: one row per tap, whoever inserts
it first asks Airflow), then finished with what Airflow said; a claim whose receiver died is taken
over once it is stale. So a tap is answered once, however many receivers share the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from sqlalchemy import Connection, delete, or_, select, update

from airflow_provider_pepipost.approvals import ApprovalRequest, Confirmation
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import insert_for

SUBMITTING = "submitting"  # the outcome of a claimed tap whose answer is with Airflow


@dataclass(frozen=True)
class Tap:
    """A reply to an approval request, not handled yet."""

    inbound_id: int
    sender: str | None
    payload: str | None
    received_at: float
    request: ApprovalRequest


@dataclass(frozen=True)
class Answer:
    """What became of a tap: ``verdict``, the ``option``, Airflow's ``outcome``, who (masked)."""

    inbound_id: int
    message_id: str
    verdict: str
    option: str | None
    outcome: str | None
    answered_by: str | None
    decided_at: float


def record_request(
    conn: Connection,
    message_id: str,
    task: tuple[str, str, str, int, int],
    options_by_payload: Mapping[str, str],
    approvers: Iterable[str],
    now: float,
    confirmation: Confirmation | None = None,
) -> None:
    """A request message, asking for the task instance ``task`` (dag, run, task, map index, try)."""
    dag_id, run_id, task_id, map_index, try_number = task
    row = {
        "message_id": message_id,
        "dag_id": dag_id,
        "run_id": run_id,
        "task_id": task_id,
        "map_index": map_index,
        "try_number": try_number,
        "options": json.dumps(dict(options_by_payload), sort_keys=True),
        "approvers": json.dumps(sorted(approvers)),
        "confirmation": json.dumps(asdict(confirmation)) if confirmation else None,
        "created_at": now,
    }
    conn.execute(insert_for(conn, schema.approval_requests).values(row).on_conflict_do_nothing())


def _request(row: Mapping) -> ApprovalRequest:
    return ApprovalRequest(
        message_id=row["message_id"],
        dag_id=row["dag_id"],
        run_id=row["run_id"],
        task_id=row["task_id"],
        map_index=row["map_index"],
        try_number=row["try_number"],
        options_by_payload=json.loads(row["options"]),
        approvers=frozenset(json.loads(row["approvers"])),
        confirmation=Confirmation(**json.loads(row["confirmation"])) if row["confirmation"] else None,
    )


def pending_taps(conn: Connection, limit: int, stale_before: float) -> list[Tap]:
    """Replies to request messages not handled yet (and claims older than ``stale_before``), oldest first."""
    inbound, requests, answers = schema.inbound_messages, schema.approval_requests, schema.approval_answers
    handled = select(answers.c.inbound_id).where(
        answers.c.inbound_id == inbound.c.id,
        or_(answers.c.outcome.is_(None), answers.c.outcome != SUBMITTING, answers.c.decided_at >= stale_before),
    )
    query = (
        select(
            inbound.c.id, inbound.c.sender, inbound.c.button_payload, inbound.c.text, inbound.c.received_at, requests
        )
        .join(requests, requests.c.message_id == inbound.c.context_message_id)
        .where(~handled.exists())
        .order_by(inbound.c.id)
        .limit(limit)
    )
    taps = []
    for row in conn.execute(query).mappings():
        # A tap from before 2024-09-10 came as plain text: its words are the button's payload.
        payload = row["button_payload"] if row["button_payload"] is not None else row["text"]
        taps.append(Tap(row["id"], row["sender"], payload, row["received_at"], _request(row)))
    return taps


def claim(
    conn: Connection, inbound_id: int, message_id: str, answered_by: str, now: float, stale_before: float
) -> bool:
    """Take the tap to ask Airflow with it; False when another receiver holds it (or it is handled)."""
    answers = schema.approval_answers
    row = {"inbound_id": inbound_id, "message_id": message_id, "verdict": "answer", "outcome": SUBMITTING,
           "answered_by": answered_by, "decided_at": now}  # fmt: skip
    inserted = conn.execute(insert_for(conn, answers).values(row).on_conflict_do_nothing())
    if inserted.rowcount:
        return True
    taken_over = conn.execute(
        update(answers)
        .where(answers.c.inbound_id == inbound_id, answers.c.outcome == SUBMITTING, answers.c.decided_at < stale_before)
        .values(decided_at=now)
    )
    return bool(taken_over.rowcount)


def finish(conn: Connection, answer: Answer) -> None:
    """What became of a claimed tap."""
    answers = schema.approval_answers
    conn.execute(
        update(answers)
        .where(answers.c.inbound_id == answer.inbound_id)
        .values(
            option=answer.option, outcome=answer.outcome, answered_by=answer.answered_by, decided_at=answer.decided_at
        )
    )


def release(conn: Connection, inbound_id: int) -> None:
    """Give a claimed tap back (Airflow could not take it yet): it is pending again."""
    answers = schema.approval_answers
    conn.execute(delete(answers).where(answers.c.inbound_id == inbound_id, answers.c.outcome == SUBMITTING))


def record_answer(conn: Connection, answer: Answer) -> None:
    """A tap decided without asking Airflow (not an approver's, an unknown button, expired)."""
    conn.execute(insert_for(conn, schema.approval_answers).values(asdict(answer)).on_conflict_do_nothing())


def answers_for_task(conn: Connection, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[Answer]:
    """Every tap on the requests for this task instance and what became of it, oldest first."""
    requests, answers = schema.approval_requests, schema.approval_answers
    query = (
        select(answers)
        .join(requests, requests.c.message_id == answers.c.message_id)
        .where(
            requests.c.dag_id == dag_id,
            requests.c.run_id == run_id,
            requests.c.task_id == task_id,
            requests.c.map_index == map_index,
        )
        .order_by(answers.c.inbound_id)
    )
    fields = ("inbound_id", "message_id", "verdict", "option", "outcome", "answered_by", "decided_at")
    return [Answer(*(row[field] for field in fields)) for row in conn.execute(query).mappings()]


def forget_approver(conn: Connection, number: str) -> int:
    """Erasure: the number leaves every request's approvers; returns the requests changed."""
    requests = schema.approval_requests
    changed = 0
    holding = select(requests.c.message_id, requests.c.approvers).where(requests.c.approvers.contains(number))
    for message_id, approvers in conn.execute(holding).all():
        kept = [approver for approver in json.loads(approvers) if approver != number]
        conn.execute(update(requests).where(requests.c.message_id == message_id).values(approvers=json.dumps(kept)))
        changed += 1
    return changed
