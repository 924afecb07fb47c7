"""What a delivery status means: its rank, one delivery event, a summary, and the sensor's verdict.

Pure code shared by the store, the receiver, the trigger and the sensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Status only moves up this ladder: a late 'delivered' never overwrites 'read'. 'failed' sits
# above everything, so it is terminal. Values we do not know rank 0: kept, never promoted over.
STATUS_RANK: dict[str, int] = {"sent": 1, "delivered": 2, "read": 3, "failed": 100}
TARGET_STATUSES = ("sent", "delivered", "read")
# The vendor does not document the spelling of the failed value; these all mean it.
_FAILED_SPELLINGS = frozenset({"failed", "fail", "failure", "undelivered", "rejected", "error"})

# The words the XCom, the page, its CSV and docs/campaign-page.md use, each defined once. What the send task
# did with an input row (XCom ``messages`` ``state``; ``send_summary`` counts them):
TASK_STATE_MEANINGS: dict[str, str] = {
    "accepted": "the vendor took the message and gave it an id",
    "fallback": "the vendor refused the session message (8007, the 24-hour window is closed) and took the "
    "fallback template instead",
    "rejected": "the vendor refused the message (its code and reason are kept); a later try sends it again",
    "unknown": "the request left, but the answer could not tell whether the vendor took it; never resent "
    "on its own, reconciled from delivery reports",
    "duplicate": "the same recipient and content as an earlier row of the campaign: not sent twice",
    "not_sent": "never reached the vendor (the campaign stopped, or the network failed first); a later try sends it",
    "suppressed": "the number is on the suppression list (it said STOP, or was opted out): not sent",
}
# What the phones reported of a message the vendor took (the sensor's summary):
DELIVERY_STATUS_MEANINGS: dict[str, str] = {
    "pending": "no delivery report yet",
    "sent": "the last report says sent: WhatsApp has it, the phone has not confirmed",
    "delivered": "the phone received it",
    "read": "the recipient opened it",
    "failed": "WhatsApp could not deliver it (the remark says why); final",
    "unknown": "the send's own outcome is unknown and no report has matched it yet",
}

FAIL_ON_POLICIES = ("unreachable", "any", "never")
UNKNOWN_POLICIES = ("wait", "ignore", "fail")


def normalize_status(raw: Any) -> str:
    """The canonical status for a vendor value: 'READ' -> 'read', 'Failure' -> 'failed'.

    Unknown values are kept, lower-cased, rather than dropped.
    """
    value = str(raw).strip().lower()
    return "failed" if value in _FAILED_SPELLINGS else value


def status_rank(status: str) -> int:
    return STATUS_RANK.get(status, 0)


class LedgerState(str, Enum):
    """Where one message of a send task stands in the ledger (the send side; statuses are the phone's)."""

    SENDING = "sending"  # claimed: its request is about to go out, or went out and no answer is in yet
    ACCEPTED = "accepted"  # the vendor gave it a message id (or a report matched it to one)
    REJECTED = "rejected"  # the vendor refused it (8002, 8003, 8007, 8001, 8006, 8004, 8008)
    UNKNOWN = "unknown"  # the request left; the answer could not tell whether the vendor took it
    NOT_SENT = "not_sent"  # claimed, but its request never reached the vendor: a later try sends it
    SUPPRESSED = "suppressed"  # the number was on the suppression list when claimed: never sent


@dataclass(frozen=True, slots=True)
class DeliveryEvent:
    """One item of a delivery-report batch, parsed."""

    message_id: str
    status: str
    raw_status: str
    reported_at: float | None  # epoch seconds, as the vendor reported it
    remark: str = ""
    api_header: str | None = None
    recipient: str | None = None
    raw: str = ""  # the item as received, JSON text, for audits
    # Webhook v2's pricing, when the item carries it (None: not reported).
    billable: bool | None = None
    category: str | None = None
    pricing_model: str | None = None

    @property
    def rank(self) -> int:
        return status_rank(self.status)


@dataclass
class DeliverySummary:
    """Where a set of messages stands. Small enough for XCom: counts and the failed ids only."""

    total: int
    counts: dict[str, int] = field(default_factory=dict)  # current status -> messages
    pending: int = 0  # no report yet
    unknown: int = 0  # send outcome unknown (timed out) and not yet reconciled
    failed: list[dict[str, str]] = field(default_factory=list)  # [{"message_id", "remark"}], capped
    failed_total: int = 0
    # What the reports said the messages cost (webhook v2's pricing): billable messages by
    # category, those not billable, and those whose reports carry no pricing (v1, or none yet).
    billable: dict[str, int] = field(default_factory=dict)
    not_billable: int = 0
    pricing_not_reported: int = 0

    MAX_FAILED_LISTED = 100

    def add_pricing(self, billable: bool | None, category: str | None, count: int) -> None:
        if billable is None:
            self.pricing_not_reported += count
        elif billable:
            name = category or "uncategorized"
            self.billable[name] = self.billable.get(name, 0) + count
        else:
            self.not_billable += count

    def reached(self, target_status: str) -> int:
        """Messages at the target status or beyond it (failed never counts as beyond)."""
        target = status_rank(target_status)
        return sum(n for status, n in self.counts.items() if status != "failed" and status_rank(status) >= target)

    def funnel(self) -> dict[str, int]:
        """Messages that got at least this far: sent -> delivered -> read; failed and pending apart."""
        return {
            "total": self.total,
            "sent": self.reached("sent"),
            "delivered": self.reached("delivered"),
            "read": self.reached("read"),
            "failed": self.failed_total,
            "pending": self.pending,
            "unknown": self.unknown,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "counts": dict(sorted(self.counts.items())),
            "pending": self.pending,
            "unknown": self.unknown,
            "failed_total": self.failed_total,
            "failed": self.failed,
            "billable": dict(sorted(self.billable.items())),
            "not_billable": self.not_billable,
            "pricing_not_reported": self.pricing_not_reported,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeliverySummary:
        return cls(
            total=data["total"],
            counts=dict(data["counts"]),
            pending=data["pending"],
            unknown=data.get("unknown", 0),
            failed=list(data["failed"]),
            failed_total=data["failed_total"],
            billable=dict(data.get("billable", {})),
            not_billable=data.get("not_billable", 0),
            pricing_not_reported=data.get("pricing_not_reported", 0),
        )


@dataclass(frozen=True)
class Verdict:
    """The sensor's decision on a summary: keep waiting, succeed, or fail with a reason."""

    done: bool
    failed: bool = False
    reason: str = ""


def evaluate(
    summary: DeliverySummary,
    target_status: str,
    min_success_ratio: float,
    fail_on: str = "unreachable",
    unknown_policy: str = "wait",
) -> Verdict:
    """Decide whether enough messages reached ``target_status``.

    ``fail_on``: 'unreachable' fails once so many messages failed that the ratio cannot be met;
    'any' fails at the first failed message; 'never' waits (the sensor's timeout ends it).
    ``unknown_policy``: sends whose outcome is unknown are waited on ('wait'), left out of the
    count ('ignore'), or fail the sensor ('fail').
    """
    total = summary.total
    unknown = summary.unknown
    if unknown_policy == "fail" and unknown:
        return Verdict(True, True, f"{unknown} message(s) have an unknown send outcome (timed out)")
    if unknown_policy == "ignore":
        total -= unknown
    needed = share_of(total, min_success_ratio)
    reached = summary.reached(target_status)
    failed = summary.failed_total
    if fail_on == "any" and failed:
        return Verdict(True, True, _failure_reason(summary, failed, "a message failed"))
    if reached >= needed:
        return Verdict(True, False, f"{reached} of {total} message(s) reached '{target_status}'")
    if fail_on == "unreachable" and total - failed < needed:
        return Verdict(
            True,
            True,
            _failure_reason(
                summary, failed, f"{needed} of {total} must reach '{target_status}', at most {total - failed} still can"
            ),
        )
    return Verdict(False)


def share_of(total: int, ratio: float) -> int:
    """``ratio`` of ``total``, rounded up, with a small tolerance so that 0.9 * 10 is 9, not 10."""
    exact = total * ratio
    whole = int(exact)
    return whole if exact - whole < 1e-9 else whole + 1


def _failure_reason(summary: DeliverySummary, failed: int, why: str) -> str:
    listed = ", ".join(f"{f['message_id']} ({f['remark'] or 'no remark'})" for f in summary.failed[:10])
    more = f" and {failed - 10} more" if failed > 10 else ""
    return f"{why}: {failed} failed: {listed}{more}"
