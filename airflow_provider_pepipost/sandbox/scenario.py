"""What the sandbox does to each request and message: faults, rejections and final statuses.

Every choice is a pure function of the seed and what the audience fixes: the recipient's number,
the message's kind (media or template) and the how-many-th try of that message it is. Never of the
run id, the date, the x-apiheader derived from them, a message id or arrival order: a test that
sends the same audience meets the same outcomes in every run, whatever the concurrency.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FINAL_STATUSES = ("sent", "delivered", "read", "failed")
RECIPIENT_ERRORS = {
    "8002": "Phone number is not opted in.",
    "8003": "WhatsApp contact does not exist.",
    "8007": "Message can not be sent as free form message. Please send template message.",
}
# Why a message failed, as the vendor words it; one names the recipient, as real remarks can.
FAILED_REMARKS = (
    "Message undeliverable",
    "Recipient phone unreachable",
    "Media download failed",
    "Recipient {recipient} has blocked this business",
)


@dataclass
class Scenario:
    """How the sandbox behaves. All ratios are shares in [0, 1]; all times are seconds."""

    seed: int = 7
    latency: float = 0.0  # added to every send request
    # Final status of accepted messages, by share; the path there goes sent -> delivered -> read.
    final_mix: dict[str, float] = field(
        default_factory=lambda: {"read": 0.6, "delivered": 0.25, "sent": 0.05, "failed": 0.1}
    )
    status_delay: float = 0.05  # between one status of a message and the next
    duplicate_ratio: float = 0.0  # reports posted twice
    out_of_order_ratio: float = 0.0  # 'read' posted before 'delivered'
    inbound_ratio: float = 0.0  # customer replies posted as incoming_message[]
    # Rejections by recipient (vendor codes 8002, 8003, 8007), as shares of recipients. 8007 (the
    # 24-hour window is closed) is only ever the answer to a session (media) message.
    reject_ratio: dict[str, float] = field(default_factory=dict)
    closed_window_ratio: float = 0.0  # recipients who have not written in 24 h: media gets 8007
    # Recipients without an opt-in: every send gets 8002 until the consent API opts them in.
    optin_required_ratio: float = 0.0
    stop_reply_ratio: float = 0.0  # accepted messages whose recipient replies stop_reply_text
    stop_reply_text: str = "STOP"
    # Template messages with quick-reply buttons whose recipient taps one (equal shares); a STOP
    # reply comes first, and a recipient who does not tap may still reply text (inbound_ratio).
    button_tap_ratio: float = 0.0
    # Approved templates: name -> {"locale", "attributes" (how many), "header" (None or a type),
    # optionally "buttons": [{"text", "payload"}, ...] (static quick replies, approved with it)}.
    templates: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {
            "invoice_ready": {"locale": "en", "attributes": 2, "header": "document"},
            "spring_offer": {"locale": "en", "attributes": 1, "header": None},
            # The notifier's suggested alert: task, DAG, run, try, log URL.
            "airflow_task_alert": {"locale": "en", "attributes": 5, "header": None},
            "slot_offer": {
                "locale": "en",
                "attributes": 1,
                "header": None,
                "buttons": [{"text": "Yes, book it", "payload": "YES_BOOK"}, {"text": "Not now", "payload": "NOT_NOW"}],
            },
            # WhatsAppHITLNotifier's suggested request: subject, body, link; a button per option.
            "airflow_approval_request": {
                "locale": "en",
                "attributes": 3,
                "header": None,
                "buttons": [{"text": "Approve", "payload": "Approve"}, {"text": "Reject", "payload": "Reject"}],
            },
            # WhatsAppHITLNotifier's suggested confirmation: "Your answer {{1}} was recorded."
            "airflow_approval_recorded": {"locale": "en", "attributes": 1, "header": None},
            # The confirmation whatsapp_reply_router sends to those who tapped "Yes, book it".
            "slot_booked": {"locale": "en", "attributes": 0, "header": None},
        }
    )
    # Faults, as shares of requests (each try of a message is drawn again).
    rate_429: float = 0.0
    retry_after: float | None = 0.2  # Retry-After of a 429; None sends none
    rate_5xx: float = 0.0
    rate_8005: float = 0.0
    rate_drop: float = 0.0  # the connection is closed without an answer, before accepting
    rate_slow: float = 0.0  # accepted, but answered only after slow_seconds
    slow_seconds: float = 5.0
    # Faults after the message was accepted: what gateways and broken proxies send back.
    rate_gateway_502: float = 0.0  # accepted, then a gateway's HTML 502 page instead of the answer
    rate_trickle: float = 0.0  # accepted, the answer sent a byte every trickle_interval
    trickle_interval: float = 0.5
    rate_huge: float = 0.0  # accepted, then an answer of huge_bytes that starts like the real one
    huge_bytes: int = 200 * 1024 * 1024
    keep_alive_timeout: float = 30.0  # idle keep-alive connections are closed after this long
    outage_after: int | None = None  # after this many requests, answer 503 for outage_seconds...
    outage_seconds: float = 0.0
    outage_requests: int = 0  # ...or to the next outage_requests requests (not bound to timing)
    failures_with_http_200: bool = False  # the vendor's failure bodies with HTTP 200
    webhook_version: int = 2
    batch_size: int = 50
    batch_interval: float = 0.05

    def __post_init__(self) -> None:
        for name, template in self.templates.items():
            for button in template.get("buttons") or []:
                if not (isinstance(button, dict) and _text(button.get("text")) and _text(button.get("payload"))):
                    raise ValueError(
                        f"templates.{name}.buttons: each button must be "
                        f'{{"text": "...", "payload": "..."}} with non-empty strings, not {button!r}'
                    )

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        data = json.loads(text) if text else {}
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown scenario keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- deterministic draws --------------------------------------------------------------------

    def draw(self, *parts: Any) -> float:
        """A number in [0, 1) fixed by the seed and the parts."""
        digest = hashlib.blake2b("\x1f".join(map(str, (self.seed, *parts))).encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def request_fault(self, identity: str, attempt: int) -> str | None:
        """The fault this try of this message meets (a name in the loop below), or None."""
        roll = self.draw("fault", identity, attempt)
        for name, rate in (
            ("429", self.rate_429),
            ("5xx", self.rate_5xx),
            ("8005", self.rate_8005),
            ("drop", self.rate_drop),
            ("slow", self.rate_slow),
            ("gateway_502", self.rate_gateway_502),
            ("trickle", self.rate_trickle),
            ("huge", self.rate_huge),
        ):
            if roll < rate:
                return name
            roll -= rate
        return None

    def recipient_error(self, recipient: str, message_type: str = "media") -> str | None:
        roll = self.draw("recipient", recipient)
        for code, rate in sorted(self.reject_ratio.items()):
            if roll < rate:
                return None if code == "8007" and message_type != "media" else code
            roll -= rate
        if message_type == "media" and self.draw("window", recipient) < self.closed_window_ratio:
            return "8007"
        return None

    def needs_optin(self, recipient: str) -> bool:
        """True for the recipients who start without an opt-in."""
        return self.draw("optin", recipient) < self.optin_required_ratio

    def buttons(self, template: str | None) -> list[dict[str, str]]:
        """The quick-reply buttons of an approved template ([] for none, or for no template)."""
        if template is None:
            return []
        return list(self.templates.get(template, {}).get("buttons") or [])

    def button_tap(self, identity: str, template: str | None) -> dict[str, str] | None:
        """The button the recipient of this template message taps, or None (no buttons, no tap)."""
        buttons = self.buttons(template)
        if not buttons or self.draw("tap", identity) >= self.button_tap_ratio:
            return None
        return buttons[int(self.draw("tap-button", identity) * len(buttons))]

    @staticmethod
    def draw_key(recipient: str, message_type: str) -> str:
        """What a message's draws are keyed on: the same for the same audience in every run."""
        return f"{recipient}|{message_type}"

    def final_status(self, identity: str) -> str:
        roll = self.draw("final", identity)
        total = sum(self.final_mix.values()) or 1.0
        for status in FINAL_STATUSES:
            share = self.final_mix.get(status, 0.0) / total
            if roll < share:
                return status
            roll -= share
        return "read"

    def status_path(self, identity: str) -> list[str]:
        """The statuses reported for one accepted message, in the order the phone reached them."""
        final = self.final_status(identity)
        if final == "failed":
            return ["sent", "failed"]
        return ["sent", "delivered", "read"][: ["sent", "delivered", "read"].index(final) + 1]


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value)
