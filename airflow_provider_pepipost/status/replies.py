"""Reading the customer messages the receiver filed: one by its id, with what it answered.

Functions of an open connection; ``StatusStore`` runs them. A message answers one of the
provider's messages when its ``context.ncmessage_id`` is a message id of the ledger: the reply is
then linked to that send's campaign, DAG run, task, map index and input row. Whole numbers and the
customer's words are read from here by the task that needs them, so that they never sit in
Airflow's metadata database (XCom, asset events).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, select

from airflow_provider_pepipost.status import schema


@dataclass(frozen=True)
class AnsweredMessage:
    """The provider's message a reply answers, and the send task row it came from."""

    message_id: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    row: int


@dataclass(frozen=True)
class Reply:
    """One customer message as the store filed it (``kind``: text, button, image, location...)."""

    inbound_id: int
    kind: str
    sender: str | None  # the whole, canonical number
    received_at: float
    text: str | None = None  # a text reply's or a button's text; a media's caption
    button_payload: str | None = None
    media_id: str | None = None
    latitude: float | None = None
    longitude: float | None = None
    message_id: str | None = None  # the vendor's id of the inbound message
    in_reply_to: AnsweredMessage | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def reply(conn: Connection, inbound_id: int) -> Reply | None:
    """The customer message of this id, linked to the ledger row it answers; None when none."""
    inbound, led = schema.inbound_messages, schema.ledger
    row = conn.execute(select(inbound).where(inbound.c.id == inbound_id)).mappings().first()
    if row is None:
        return None
    answered = None
    if row["context_message_id"]:
        sent = conn.execute(
            select(led.c.message_id, led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index, led.c.row_index)
            .where(led.c.message_id == row["context_message_id"])
            .limit(1)
        ).first()
        answered = AnsweredMessage(*sent) if sent is not None else None
    return Reply(
        inbound_id=row["id"],
        kind=row["kind"] or "unknown",
        sender=row["sender"],
        received_at=row["received_at"],
        text=row["text"],
        button_payload=row["button_payload"],
        media_id=row["media_id"],
        latitude=row["latitude"],
        longitude=row["longitude"],
        message_id=row["message_id"],
        in_reply_to=answered,
    )
