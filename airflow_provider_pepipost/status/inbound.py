"""What a webhook body holds once read, as one named type from the parser to the store.

Pure data, no I/O: ``webhook.payload`` makes these, ``status.ingest`` files them. A body is a
``WebhookBatch`` of delivery events (``model.DeliveryEvent``), customer messages
(``InboundMessage`` and its kinds) and dead letters. A new inbound kind is a dataclass here, an
entry in the parser's table (``webhook.payload.INBOUND_KINDS``) and, where it needs more than the
shared columns, a handler in ``status.ingest`` (see docs/architecture.md, "Where a change goes").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from airflow_provider_pepipost.status.model import DeliveryEvent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item (or a whole body) that could not be used, kept aside with the reason.

    ``key`` (a hash of the body and the item's place in it) makes a body sent again add none; a
    letter without one is keyed by its reason and content.
    """

    reason: str
    raw: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One ``incoming_message[]`` item: a customer wrote to the business (never a delivery status).

    ``kind`` is the vendor's ``message_type`` in lower case (``text``...; ``unknown`` without one):
    a kind the provider does not know yet is kept, not dropped. The kinds the parser reads have a
    dataclass of their own below, whose ``columns()`` are what the store keeps of them beyond the
    shared fields.
    """

    kind: str
    sender: str | None  # the canonical number; as it came when it is none
    context_message_id: str | None  # the provider's message it answers, when it is a reply
    raw: str  # the item as received, JSON text
    # The stop word, when the message's text is one and the sender a number: the store then puts
    # the sender on the suppression list.
    opt_out: str | None = None
    message_id: str | None = None  # the vendor's id of this inbound message

    def columns(self) -> dict[str, object]:
        """The kind's own columns of ``pepipost_inbound_messages`` (none for a kind not read)."""
        return {}


@dataclass(frozen=True, slots=True)
class TextReply(InboundMessage):
    """A text message: ``text_type.text``."""

    text: str | None = None

    def columns(self) -> dict[str, object]:
        return {"text": self.text}


@dataclass(frozen=True, slots=True)
class ButtonReply(InboundMessage):
    """A tap on a template's quick-reply button: the payload the button was approved with, and its text."""

    payload: str | None = None
    text: str | None = None

    def columns(self) -> dict[str, object]:
        return {"button_payload": self.payload, "text": self.text}


@dataclass(frozen=True, slots=True)
class MediaReply(InboundMessage):
    """An image, audio, video, document or sticker a customer sent: its media id and caption."""

    media_id: str | None = None
    caption: str | None = None

    def columns(self) -> dict[str, object]:
        return {"media_id": self.media_id, "text": self.caption}


@dataclass(frozen=True, slots=True)
class LocationReply(InboundMessage):
    """A location a customer shared."""

    latitude: float | None = None
    longitude: float | None = None

    def columns(self) -> dict[str, object]:
        return {"latitude": self.latitude, "longitude": self.longitude}


@dataclass
class WebhookBatch:
    """One webhook body, read: what the store files in one transaction (or with others)."""

    events: list[DeliveryEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    inbound: list[InboundMessage] = field(default_factory=list)
    # Items that could not be used; more than len(dead_letters) once a body's bad items share one.
    dead_letter_items: int = 0
