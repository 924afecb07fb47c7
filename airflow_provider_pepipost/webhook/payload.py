"""Read a Pepipost webhook body: delivery reports (v1 and v2), customer replies, and what is malformed.

Pure code: it decides what each item is; the store keeps all three kinds. Every value bound for a
column is checked against ``limits`` first, so an item the database would refuse is a dead letter
with a reason, never a failed transaction. The work one body can cause is bounded: past
MAX_ITEM_LETTERS bad items, the rest of a body's bad items are kept together as one dead letter.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.consent import is_stop_reply, normalize_reply, stop_word_set
from airflow_provider_pepipost.numbers import phone_or_none
from airflow_provider_pepipost.status.model import DeliveryEvent, normalize_status

MAX_RAW_CHARS = limits.RAW_MAX  # of a dead letter: enough to see what went wrong
MAX_ITEM_LETTERS = 20  # dead letters of their own per body; the rest of its bad items share one

# A dead letter as the store takes it: (reason, raw, key). Equal keys are stored once, so a body
# sent again adds no dead letters.
DeadLetter = tuple[str, str, str]

DEFAULT_STOP_SET = stop_word_set()


@dataclass
class ParsedBatch:
    events: list[DeliveryEvent] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    inbound: list[dict[str, Any]] = field(default_factory=list)
    dead_letter_items: int = 0  # items that could not be used; more than len(dead_letters) past the cap


def body_key(body: bytes | str) -> str:
    """The hash a body's dead letters are keyed by."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return hashlib.sha256(data).hexdigest()


def letter(reason: str, raw: str, key: str | None = None, where: str = "") -> DeadLetter:
    """A dead letter safe to store: reason and raw escaped and capped; keyed by body and position."""
    reason = limits.storable(reason, limits.REASON_MAX)
    raw = limits.storable(raw, limits.RAW_MAX)
    seed = f"{key}\x1f{where}" if key else f"{reason}\x1f{raw}"
    return reason, raw, hashlib.sha256(seed.encode()).hexdigest()[:40]


def _raw(item: Any) -> str:
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(item)
    return text[:MAX_RAW_CHARS]


def parse_time(value: Any) -> float | None:
    """Epoch seconds from the report's ``received_at``; raises ValueError when it is not a time.

    v1 sends "YYYY-MM-DD HH:MM:SS" (read as UTC: the vendor names no zone), v2 epoch seconds,
    as a number or a string; epoch milliseconds are recognized by their size. Infinity, NaN and
    times outside year 0..9999 (1e400, 10**400) are not times.
    """
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError(f"received_at {str(value)[:40]!r} is out of range") from None
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            for pattern in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%SZ"):
                try:
                    return float(calendar.timegm(time.strptime(text, pattern)))
                except ValueError:
                    continue
            raise ValueError(f"received_at {text[:40]!r} is neither epoch seconds nor 'YYYY-MM-DD HH:MM:SS'") from None
    if seconds > 1e11:  # milliseconds
        seconds /= 1000.0
    if problem := limits.time_problem(seconds):
        raise ValueError(f"received_at {str(value)[:40]!r} {problem}")
    return seconds


def _text_field(item: dict[str, Any], name: str, limit: int, required: bool) -> str | None:
    value = item.get(name)
    if value is None or value == "":
        if required:
            raise ValueError(f"'{name}' is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"'{name}' must be a string, not {type(value).__name__}")
    text = str(value).strip()
    if len(text) > limit:
        raise ValueError(f"'{name}' is longer than {limit} characters")
    if problem := limits.text_problem(text):
        raise ValueError(f"'{name}' {problem}")
    return text


def parse_delivery_item(item: Any) -> DeliveryEvent:
    """One ``delivery_status[]`` item; raises ValueError with the reason when it cannot be stored."""
    if not isinstance(item, dict):
        raise ValueError(f"item must be an object, not {type(item).__name__}")
    message_id = _text_field(item, "ncmessage_id", limits.MESSAGE_ID_MAX, required=True)
    raw_status = _text_field(item, "status", limits.STATUS_MAX, required=True)
    raw = _raw(item)
    if problem := limits.text_problem(raw):  # anywhere in the item, even in a field not kept
        raise ValueError(f"item {problem}")
    remark = item.get("status_remark")
    remark = "" if remark is None else str(remark)[: limits.REMARK_MAX]
    if problem := limits.text_problem(remark):
        raise ValueError(f"'status_remark' {problem}")
    return DeliveryEvent(
        message_id=message_id or "",
        status=normalize_status(raw_status),
        raw_status=raw_status or "",
        reported_at=parse_time(item.get("received_at")),
        remark=remark,
        api_header=_text_field(item, "x-apiheader", limits.API_HEADER_MAX, required=False),
        recipient=_canonical(_text_field(item, "recipient", limits.RECIPIENT_MAX, required=False)),
        raw=raw,
        **_pricing(item.get("pricing")),
    )


def _pricing(value: Any) -> dict[str, Any]:
    """Webhook v2's ``pricing {billable, category, pricing_model, type}``; what cannot be read is left
    out (a report's status never depends on its pricing)."""
    if not isinstance(value, dict):
        return {}
    billable = value.get("billable")
    if isinstance(billable, str) and billable.strip().lower() in ("true", "false"):
        billable = billable.strip().lower() == "true"
    if not isinstance(billable, bool):
        return {}
    found: dict[str, Any] = {"billable": billable}
    for name in ("category", "pricing_model"):
        text = value.get(name)
        if isinstance(text, str) and text.strip() and len(text) <= limits.PRICING_MAX and not limits.text_problem(text):
            found[name] = text.strip().lower() if name == "category" else text.strip()
    return found


def _canonical(number: str | None) -> str | None:
    """A number in its canonical form; what is not a phone number (a group id) as it came."""
    return (phone_or_none(number) or number) if number else number


def _inbound_item(item: dict[str, Any], stop_words: frozenset[str]) -> dict[str, Any]:
    """One ``incoming_message[]`` item as the store keeps it; ValueError when it cannot be stored.

    ``sender`` is the canonical number (as it came when it is none). ``opt_out`` holds the
    reply's text when it is one of ``stop_words`` and the sender is a number: the store then puts
    the sender on the suppression list.
    """
    raw = _raw(item)
    if problem := limits.text_problem(raw):
        raise ValueError(f"item {problem}")
    context = item.get("context") if isinstance(item.get("context"), dict) else {}
    sender = str(item.get("from") or "")
    context_id = str(context.get("ncmessage_id") or "")
    for name, text, limit in (
        ("from", sender, limits.SENDER_MAX),
        ("context.ncmessage_id", context_id, limits.MESSAGE_ID_MAX),
    ):
        if problem := limits.text_problem(text):
            raise ValueError(f"'{name}' {problem}")
        if len(text) > limit:
            raise ValueError(f"'{name}' is longer than {limit} characters")
    text = item.get("text_type", {}).get("text") if isinstance(item.get("text_type"), dict) else None
    number = phone_or_none(sender) if sender else None
    opt_out = normalize_reply(text) if number and is_stop_reply(text, stop_words) else None
    sender = number or sender
    return {"sender": sender or None, "context_message_id": context_id or None, "raw": raw, "opt_out": opt_out}


class _DeadLetters:
    """A body's bad items: the first MAX_ITEM_LETTERS each a dead letter, the rest one dead letter."""

    def __init__(self, batch: ParsedBatch, key: str | None) -> None:
        self.batch, self.key = batch, key
        self.full = False  # past the cap: bad items go to the one shared dead letter
        self.overflow: list[Any] = []  # those items (parse_body appends junk to it directly)
        self.first_overflow = ""  # where the first of them was

    def add(self, name: str, index: int | None, reason: str, item: Any) -> None:
        where = name if index is None else f"{name}[{index}]"
        if self.full:
            self.first_overflow = self.first_overflow or where
            self.overflow.append(item)
            return
        self.batch.dead_letter_items += 1
        self.batch.dead_letters.append(letter(f"{where}: {reason}", _raw(item), self.key, where))
        self.full = len(self.batch.dead_letters) >= MAX_ITEM_LETTERS

    def close(self) -> None:
        if not self.overflow:
            return
        self.batch.dead_letter_items += len(self.overflow)
        parts, size = [], 0
        for item in self.overflow:  # as much as fits in one dead letter, not a byte more
            part = _raw(item)
            size += len(part) + 1
            if size > MAX_RAW_CHARS:
                break
            parts.append(part)
        reason = f"{len(self.overflow)} more items could not be read, the first at {self.first_overflow}"
        self.batch.dead_letters.append(letter(reason, "[" + ",".join(parts) + "]", self.key, "overflow"))


def _may_be_report(item: Any) -> bool:
    """False for what is certainly not a report: a quick test, without exceptions, for junk bodies."""
    return type(item) is dict and item.get("ncmessage_id") not in (None, "") and item.get("status") not in (None, "")


def parse_body(body: Any, key: str | None = None, stop_words: frozenset[str] = DEFAULT_STOP_SET) -> ParsedBatch:
    """Sort a decoded webhook body into delivery events, inbound messages and dead letters.

    :param key: the body's hash (``body_key``): its dead letters are keyed by it and their place
        in the body, so the same body sent twice adds no dead letters.
    :param stop_words: text replies that opt their sender out (``consent.stop_word_set``).
    """
    batch = ParsedBatch()
    if not isinstance(body, dict):
        return _whole(batch, f"body must be a JSON object, not {type(body).__name__}", body, key)
    reports = body.get("delivery_status")
    replies = body.get("incoming_message")
    if reports is None and replies is None:
        return _whole(batch, "body has neither delivery_status[] nor incoming_message[]", body, key)
    letters = _DeadLetters(batch, key)
    if reports is not None:
        if not isinstance(reports, list):
            letters.add("delivery_status", None, "must be a list", reports)
        else:
            junk = letters.overflow
            for index, item in enumerate(reports):
                if letters.full and not _may_be_report(item):  # past the cap, junk costs as little as can be
                    letters.first_overflow = letters.first_overflow or f"delivery_status[{index}]"
                    junk.append(item)
                    continue
                try:
                    batch.events.append(parse_delivery_item(item))
                except (ValueError, TypeError) as err:
                    letters.add("delivery_status", index, str(err), item)
    if replies is not None:
        if not isinstance(replies, list):
            letters.add("incoming_message", None, "must be a list", replies)
        else:
            for index, item in enumerate(replies):
                try:
                    if not isinstance(item, dict):
                        raise ValueError("item must be an object")
                    batch.inbound.append(_inbound_item(item, stop_words))
                except ValueError as err:
                    letters.add("incoming_message", index, str(err), item)
    letters.close()
    return batch


def _whole(batch: ParsedBatch, reason: str, body: Any, key: str | None) -> ParsedBatch:
    batch.dead_letters.append(letter(reason, _raw(body), key, "body"))
    batch.dead_letter_items = 1
    return batch
