"""What the status store's columns hold: one set of limits for the schema, the webhook parser and the operator.

Pure code, no I/O. The schema sizes its ``String(n)`` columns from these constants, and whatever
writes to those columns checks its values against the same constants first, so that a value the
database would refuse (too long, a NUL, a lone surrogate, a time out of range) is caught as bad
input with a reason instead of failing a transaction.
"""

from __future__ import annotations

import math

# -- column lengths, in characters -----------------------------------------------------------
MESSAGE_ID_MAX = 128  # the vendor's data.id / ncmessage_id
RECIPIENT_MAX = 64  # a phone number (10-15 digits) or a group id
STATUS_MAX = 32  # a status as stored, lower-cased ("read", "failed", or an unknown value kept)
RAW_STATUS_MAX = 64  # the status as the vendor spelled it (never longer than STATUS_MAX once parsed)
API_HEADER_MAX = 512  # x-apiheader, echoed back by webhook v2
IDEMPOTENCY_KEY_MAX = 64
AIRFLOW_ID_MAX = 250  # dag_id, run_id, task_id
LEDGER_STATE_MAX = 16
ATTEMPT_MAX = 32  # the id of the try that claimed a ledger row
CAMPAIGN_HASH_MAX = 32  # the hash of a campaign key, as the ledger keeps it
ERROR_CODE_MAX = 32
PRICING_MAX = 32  # a report's pricing category, pricing model or type ("marketing", "CBP")
EVENT_KEY_MAX = 64
SENDER_MAX = 64  # the sender of an inbound reply (a phone number)
INBOUND_KIND_MAX = 32  # an inbound message's kind: text, button, image, location, or the vendor's own word
BUTTON_PAYLOAD_MAX = 256  # what a quick-reply button was approved to send back
MEDIA_ID_MAX = 256  # the id of a media a customer sent
REPLY_FEED_NAME_MAX = 200  # a reply feed's or a reply consumer's name

# -- lengths of Text columns: not limited by the database, capped so one item stays small -----
REMARK_MAX = 2000  # status_remark: the vendor's failure reason
REASON_MAX = 1000  # a dead letter's reason
RAW_MAX = 65_536  # an item kept for audits, or a dead letter: enough to see what went wrong

# -- times: epoch seconds ---------------------------------------------------------------------
TIME_MIN = 0.0
TIME_MAX = 253_402_300_799.0  # 9999-12-31 23:59:59 UTC, the last second a datetime can hold


def text_problem(value: str) -> str | None:
    """Why the database cannot store this text (a NUL, a lone surrogate), or None when it can.

    PostgreSQL refuses NUL in text; neither backend can encode a lone surrogate as UTF-8.
    """
    if "\x00" in value:
        return "contains a NUL character"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone surrogate (not valid Unicode)"
    return None


def storable(value: str, limit: int = RAW_MAX) -> str:
    """The text made safe to store whatever it holds: NUL and lone surrogates escaped, length capped.

    For what is kept only to be looked at (dead letters, raw items), never for ids that must match.
    """
    if text_problem(value) is not None:
        value = value.replace("\x00", "\\u0000").encode("utf-8", "backslashreplace").decode("utf-8")
    return value[:limit]


def time_problem(seconds: float) -> str | None:
    """Why these epoch seconds are not a time the store keeps (non-finite or out of range), or None."""
    if not math.isfinite(seconds):
        return "is not a finite number"
    if not TIME_MIN <= seconds <= TIME_MAX:
        return f"is outside {TIME_MIN:.0f}..{TIME_MAX:.0f} epoch seconds"
    return None
