"""Reading the customer messages the receiver filed: one by its id, with what it answered.

Functions of an open connection; ``StatusStore`` runs them. A message answers one of the
provider's messages when its ``context.ncmessage_id`` is a message id of the ledger: the reply is
then linked to that send's campaign, DAG run, task, map index and input row. Whole numbers and the
customer's words are read from here by the task that needs them, so that they never sit in
Airflow's metadata database (XCom, asset events).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import ColumnElement, Connection, select

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import chunks


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


_LEDGER_LINK = (
    schema.ledger.c.message_id,
    schema.ledger.c.dag_id,
    schema.ledger.c.run_id,
    schema.ledger.c.task_id,
    schema.ledger.c.map_index,
    schema.ledger.c.row_index,
)


# What a Reply is read from: not the item as received (``raw``, up to 64 KiB a row).
_REPLY_COLUMNS = (
    "id", "kind", "sender", "received_at", "text", "button_payload", "media_id", "latitude", "longitude", "message_id",
)  # fmt: skip


def replies_where(conn: Connection, *where: ColumnElement[bool], limit: int | None = None) -> list[Reply]:
    """Customer messages matching ``where``, in id order, each with the ledger row it answers."""
    inbound, led = schema.inbound_messages, schema.ledger
    query = (
        select(*(inbound.c[name] for name in _REPLY_COLUMNS), *(c.label(f"led_{c.name}") for c in _LEDGER_LINK))
        .select_from(inbound.outerjoin(led, led.c.message_id == inbound.c.context_message_id))
        .where(*where)
        .order_by(inbound.c.id)
    )
    if limit is not None:
        query = query.limit(limit)
    found = []
    for row in conn.execute(query).mappings():
        answered = None
        if row["led_message_id"] is not None:
            answered = AnsweredMessage(*(row[f"led_{column.name}"] for column in _LEDGER_LINK))
        found.append(
            Reply(
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
        )
    return found


def replies_after(conn: Connection, after_id: int, limit: int) -> list[Reply]:
    """Up to ``limit`` customer messages with an id above ``after_id``, oldest first."""
    return replies_where(conn, schema.inbound_messages.c.id > after_id, limit=limit)


def replies_to(conn: Connection, message_ids: Sequence[str]) -> list[Reply]:
    """The customer messages that answer any of these messages of the provider, oldest first."""
    found: list[Reply] = []
    for chunk in chunks(list(message_ids)):
        found.extend(replies_where(conn, schema.inbound_messages.c.context_message_id.in_(chunk)))
    return sorted(found, key=lambda reply: reply.inbound_id)


def reply(conn: Connection, inbound_id: int) -> Reply | None:
    """The customer message of this id, linked to the ledger row it answers; None when none."""
    found = replies_where(conn, schema.inbound_messages.c.id == inbound_id)
    return found[0] if found else None
