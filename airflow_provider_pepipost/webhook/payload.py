"""Read a Pepipost webhook body: delivery reports (v1 and v2), customer messages, and what is malformed.

Pure code: it decides what each item is (``status.inbound``'s types); the store files them. Which
list of a body holds which kind, and which ``message_type`` of a customer message is which kind,
are the tables ``BODY_LISTS`` and ``INBOUND_KINDS``. Every value bound for a
column is checked against ``limits`` first, so an item the database would refuse is a dead letter
with a reason, never a failed transaction. The work one body can cause is bounded: past
MAX_ITEM_LETTERS bad items, the rest of a body's bad items are kept together as one dead letter.
"""

from __future__ import annotations

import calendar
import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.consent import is_stop_reply, normalize_reply, stop_word_set
from airflow_provider_pepipost.numbers import phone_or_none
from airflow_provider_pepipost.status.inbound import (
    ButtonReply,
    DeadLetter,
    InboundMessage,
    LocationReply,
    MediaReply,
    TextReply,
    WebhookBatch,
)
from airflow_provider_pepipost.status.model import DeliveryEvent, normalize_status

MAX_RAW_CHARS = limits.RAW_MAX  # of a dead letter: enough to see what went wrong
MAX_ITEM_LETTERS = 20  # dead letters of their own per body; the rest of its bad items share one

DEFAULT_STOP_SET = stop_word_set()

ParsedBatch = WebhookBatch  # its name here before status.inbound held it


def body_key(body: bytes | str) -> str:
    """The hash a body's dead letters are keyed by."""
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
    return hashlib.sha256(data).hexdigest()


def letter(reason: str, raw: str, key: str | None = None, where: str = "") -> DeadLetter:
    """A dead letter safe to store: reason and raw escaped and capped; keyed by body and position."""
    reason = limits.storable(reason, limits.REASON_MAX)
    raw = limits.storable(raw, limits.RAW_MAX)
    seed = f"{key}\x1f{where}" if key else f"{reason}\x1f{raw}"
    return DeadLetter(reason, raw, hashlib.sha256(seed.encode()).hexdigest()[:40])


# One encoder for every item kept raw: json.dumps with settings builds one per call.
_RAW_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=str)


def _encoded(item: Any) -> str | None:
    """The whole item as JSON text; None when JSON cannot show it."""
    try:
        return _RAW_ENCODER.encode(item)
    except (TypeError, ValueError, RecursionError):
        return None


def _raw(item: Any) -> str:
    text = _encoded(item)
    return _shown(item) if text is None else text[:MAX_RAW_CHARS]


def _shown(item: Any) -> str:
    """What JSON cannot show of an item: its ``repr``, or a note when it is nested too deeply even for that."""
    try:
        return repr(item)[:MAX_RAW_CHARS]
    except RecursionError:
        return f"<a {type(item).__name__} nested too deeply to show>"


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


def _raw_and_clean(item: Any) -> tuple[str, bool]:
    """``_raw(item)``, and whether every text in the item is storable as it is: True only when the
    item could be encoded and its JSON holds neither a NUL (always escaped there, as ``\\u0000``)
    nor a lone surrogate (left as it is). Then no field of it needs a check of its own."""
    text = _encoded(item)
    if text is None:
        return _shown(item), False
    clean = "\\u0000" not in text and limits.text_problem(text) is None  # the whole text, not the part kept
    return text[:MAX_RAW_CHARS], clean


def _text_field(item: dict[str, Any], name: str, limit: int, required: bool, clean: bool = False) -> str | None:
    """The field's text; ``clean``: the item's JSON showed every text in it storable (``_raw_and_clean``)."""
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
    if not clean and (problem := limits.text_problem(text)):
        raise ValueError(f"'{name}' {problem}")
    return text


def parse_delivery_item(item: Any) -> DeliveryEvent:
    """One ``delivery_status[]`` item; raises ValueError with the reason when it cannot be stored."""
    if not isinstance(item, dict):
        raise ValueError(f"item must be an object, not {type(item).__name__}")
    # One look at the whole item's JSON spares a check of each field (a tenth of a report's route).
    raw, clean = _raw_and_clean(item)
    message_id = _text_field(item, "ncmessage_id", limits.MESSAGE_ID_MAX, required=True, clean=clean)
    raw_status = _text_field(item, "status", limits.STATUS_MAX, required=True, clean=clean)
    if not clean and (problem := limits.text_problem(raw)):  # anywhere in the item, even in a field not kept
        raise ValueError(f"item {problem}")
    remark = item.get("status_remark")
    remark = "" if remark is None else str(remark)[: limits.REMARK_MAX]
    if not clean and (problem := limits.text_problem(remark)):
        raise ValueError(f"'status_remark' {problem}")
    return DeliveryEvent(
        message_id=message_id or "",
        status=normalize_status(raw_status),
        raw_status=raw_status or "",
        reported_at=parse_time(item.get("received_at")),
        remark=remark,
        api_header=_text_field(item, "x-apiheader", limits.API_HEADER_MAX, required=False, clean=clean),
        recipient=_canonical(_text_field(item, "recipient", limits.RECIPIENT_MAX, required=False, clean=clean)),
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


def parse_inbound_item(item: Any, stop_words: frozenset[str] = DEFAULT_STOP_SET) -> InboundMessage:
    """One ``incoming_message[]`` item as its kind's dataclass; ValueError when it cannot be stored.

    The kind comes from ``message_type`` through ``INBOUND_KINDS``; a kind not in the table is
    kept as a plain ``InboundMessage``, never dropped.
    """
    if not isinstance(item, dict):
        raise ValueError("item must be an object")
    raw = _raw(item)
    if problem := limits.text_problem(raw):
        raise ValueError(f"item {problem}")
    context = item.get("context")
    if not isinstance(context, dict):
        context = {}
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
    kind = str(item.get("message_type") or "unknown").strip().lower()[: limits.INBOUND_KIND_MAX] or "unknown"
    message_id = _short_text(item.get("message_id"), limits.MESSAGE_ID_MAX)
    shared = InboundMessage(kind, phone_or_none(sender) or sender or None, context_id or None, raw, None, message_id)
    return INBOUND_KINDS.get(kind, _as_it_came)(item, shared, stop_words)


def _as_it_came(item: dict[str, Any], shared: InboundMessage, stop_words: frozenset[str]) -> InboundMessage:
    """A kind the table does not name: its shared fields; a stop word in a text it holds still counts."""
    text = _short_text(_kind_object(item, "text").get("text"), limits.REMARK_MAX)
    return dataclasses.replace(shared, opt_out=_stop_word(shared, stop_words, text))


def _text_reply(item: dict[str, Any], shared: InboundMessage, stop_words: frozenset[str]) -> InboundMessage:
    """A text message (``text_type.text``): a stop word from a number opts that number out."""
    text = _short_text(_kind_object(item, "text").get("text"), limits.REMARK_MAX)
    return TextReply(**_fields(shared), opt_out=_stop_word(shared, stop_words, text), text=text)


def _button_reply(item: dict[str, Any], shared: InboundMessage, stop_words: frozenset[str]) -> InboundMessage:
    """A quick-reply button tap (since 2024-09-10: ``message_type`` button, ``text_type.payload``
    and its text). A button whose text or payload is a stop word opts its sender out too."""
    body = _kind_object(item, "button", "text")
    payload = _short_text(body.get("payload"), limits.BUTTON_PAYLOAD_MAX)
    text = _short_text(body.get("text"), limits.REMARK_MAX)
    opt_out = _stop_word(shared, stop_words, text) or _stop_word(shared, stop_words, payload)
    return ButtonReply(**_fields(shared), opt_out=opt_out, payload=payload, text=text)


def _media_reply(item: dict[str, Any], shared: InboundMessage, stop_words: frozenset[str]) -> InboundMessage:
    """An image, audio, video, document or sticker: its media id and caption (``<kind>_type``)."""
    body = _kind_object(item, shared.kind, "media")
    media_id = _short_text(body.get("id") or body.get("media_id"), limits.MEDIA_ID_MAX)
    caption = _short_text(body.get("caption"), limits.REMARK_MAX)
    return MediaReply(**_fields(shared), media_id=media_id, caption=caption)


def _location_reply(item: dict[str, Any], shared: InboundMessage, stop_words: frozenset[str]) -> InboundMessage:
    """A shared location (``location_type``): its latitude and longitude, when they are coordinates."""
    body = _kind_object(item, "location")
    latitude, longitude = _coordinate(body.get("latitude"), 90), _coordinate(body.get("longitude"), 180)
    return LocationReply(**_fields(shared), latitude=latitude, longitude=longitude)


def _fields(shared: InboundMessage) -> dict[str, Any]:
    return {name: getattr(shared, name) for name in ("kind", "sender", "context_message_id", "raw", "message_id")}


def _kind_object(item: dict[str, Any], *names: str) -> dict[str, Any]:
    """The object a kind keeps its fields in: ``<name>_type`` (the vendor's spelling for text) or
    ``<name>``, for the first name that has one; {} for none."""
    for name in names:
        for key in (f"{name}_type", name):
            value = item.get(key)
            if isinstance(value, dict):
                return value
    return {}


def _short_text(value: Any, limit: int) -> str | None:
    """A text a column can hold: a string (or number) without NUL or lone surrogates, capped."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text[:limit] if text and not limits.text_problem(text) else None


def _coordinate(value: Any, bound: float) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if -bound <= number <= bound else None  # NaN is no coordinate either


def _stop_word(shared: InboundMessage, stop_words: frozenset[str], text: str | None) -> str | None:
    """The stop word ``text`` is, when it is one and the sender is a number; else None."""
    if text is None or not shared.sender or phone_or_none(shared.sender) is None:
        return None
    return normalize_reply(text) if is_stop_reply(text, stop_words) else None


# message_type (lower case) -> the function that reads the rest of that kind of customer message.
InboundParser = Callable[[dict[str, Any], InboundMessage, frozenset[str]], InboundMessage]
INBOUND_KINDS: dict[str, InboundParser] = {
    "text": _text_reply,
    "button": _button_reply,
    "location": _location_reply,
    **dict.fromkeys(("image", "audio", "video", "document", "sticker", "voice"), _media_reply),
}


class _DeadLetters:
    """A body's bad items: the first MAX_ITEM_LETTERS each a dead letter, the rest one dead letter."""

    def __init__(self, batch: WebhookBatch, key: str | None) -> None:
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


def parse_body(body: Any, key: str | None = None, stop_words: frozenset[str] = DEFAULT_STOP_SET) -> WebhookBatch:
    """Sort a decoded webhook body into delivery events, inbound messages and dead letters.

    :param key: the body's hash (``body_key``): its dead letters are keyed by it and their place
        in the body, so the same body sent twice adds no dead letters.
    :param stop_words: text replies that opt their sender out (``consent.stop_word_set``).
    """
    batch = WebhookBatch()
    if not isinstance(body, dict):
        return _whole(batch, f"body must be a JSON object, not {type(body).__name__}", body, key)
    if all(body.get(name) is None for name in BODY_LISTS):
        return _whole(batch, "body has neither delivery_status[] nor incoming_message[]", body, key)
    letters = _DeadLetters(batch, key)
    for name, kind in BODY_LISTS.items():
        items = body.get(name)
        if items is None:
            continue
        if not isinstance(items, list):
            letters.add(name, None, "must be a list", items)
            continue
        into = getattr(batch, kind.into)
        for index, item in enumerate(items):
            if letters.full and kind.plausible is not None and not kind.plausible(item):
                # Past the cap, junk costs as little as can be.
                letters.first_overflow = letters.first_overflow or f"{name}[{index}]"
                letters.overflow.append(item)
                continue
            try:
                into.append(kind.read(item, stop_words))
            except (ValueError, TypeError) as err:
                letters.add(name, index, str(err), item)
            except RecursionError:  # an item nested deeper than Python can walk
                letters.add(name, index, "item nested too deeply", item)
    letters.close()
    return batch


@dataclass(frozen=True)
class BodyList:
    """How the items of one list of a webhook body are read."""

    read: Callable[[Any, frozenset[str]], Any]  # an item -> its dataclass; ValueError when unusable
    into: str  # the WebhookBatch list that keeps what it reads
    plausible: Callable[[Any], bool] | None = None  # a quick test for junk, used past the dead-letter cap


# The lists a body may hold -> how their items are read.
BODY_LISTS: dict[str, BodyList] = {
    "delivery_status": BodyList(lambda item, _: parse_delivery_item(item), "events", _may_be_report),
    "incoming_message": BodyList(parse_inbound_item, "inbound"),
}


def _whole(batch: WebhookBatch, reason: str, body: Any, key: str | None) -> WebhookBatch:
    batch.dead_letters.append(letter(reason, _raw(body), key, "body"))
    batch.dead_letter_items = 1
    return batch
