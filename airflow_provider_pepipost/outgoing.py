"""The contract every outgoing message kind keeps: what the engine, the hook and the ledger ask of it.

Pure code, no I/O. A new kind (a text message, an interactive list...) is a frozen dataclass that
keeps this contract, a row builder (``messages.Builder``: item, defaults, row -> the message or
the row's problems), and a thin operator that names them (docs/architecture.md, "Where a change
goes"); the engine, the ledger, the hook and the XCom contract need no change.
"""

from __future__ import annotations

from typing import Any, Protocol


class OutgoingMessage(Protocol):
    """One validated message of any kind, ready to be sent."""

    @property
    def recipient(self) -> str:
        """The canonical number (or group id) the message goes to."""
        ...

    @property
    def api_header(self) -> str | None:
        """The ``x-apiheader`` delivery reports echo; None until the engine derives it."""
        ...

    @property
    def fallback(self) -> OutgoingMessage | None:
        """The template to send instead when the vendor answers 8007 (the 24-hour window is closed).

        Not part of the message's body or identity. None for kinds that need none (a template).
        """
        ...

    def identity(self) -> str:
        """Everything the recipient would see, as one string: two messages that differ in it are two
        messages, so it goes into the idempotency key."""
        ...

    def to_payload(self) -> dict[str, Any]:
        """One element of the request's ``message`` list, field for field as the vendor's page shows."""
        ...

    def with_header(self, api_header: str) -> OutgoingMessage:
        """The same message carrying ``api_header``."""
        ...

    def with_fallback(self, fallback: OutgoingMessage | None) -> OutgoingMessage:
        """The same message, sent as ``fallback`` instead where the window is closed."""
        ...


def request_body(message: OutgoingMessage) -> dict[str, Any]:
    """The whole request body of any message kind: one message per request, the documented reading."""
    return {"message": [message.to_payload()]}
