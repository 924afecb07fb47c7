"""Read a Pepipost webhook body: delivery reports (v1 and v2), customer replies, and what is malformed.

Pure code: it decides what each item is; the store keeps all three kinds.
"""

from __future__ import annotations

import calendar
import json
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_pepipost.status.model import DeliveryEvent, normalize_status

MAX_ID_LENGTH = 128
MAX_STATUS_LENGTH = 64
MAX_HEADER_LENGTH = 512
MAX_RAW_CHARS = 65_536  # of a dead letter: enough to see what went wrong


@dataclass
class ParsedBatch:
    events: list[DeliveryEvent] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, raw)
    inbound: list[dict[str, Any]] = field(default_factory=list)


def _raw(item: Any) -> str:
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"), default=str)
    except (TypeError, ValueError, RecursionError):
        text = repr(item)
    return text[:MAX_RAW_CHARS]


def parse_time(value: Any) -> float | None:
    """Epoch seconds from the report's ``received_at``.

    v1 sends "YYYY-MM-DD HH:MM:SS" (read as UTC: the vendor names no zone), v2 epoch seconds,
    as a number or a string; epoch milliseconds are recognized by their size.
    """
    if value is None or value == "" or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
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
    if seconds != seconds or seconds < 0:  # NaN or negative
        raise ValueError(f"received_at {value!r} is not a time")
    if seconds > 1e11:  # milliseconds
        seconds /= 1000.0
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
    return text


def parse_delivery_item(item: Any) -> DeliveryEvent:
    """One ``delivery_status[]`` item; raises ValueError with the reason when it cannot be used."""
    if not isinstance(item, dict):
        raise ValueError(f"item must be an object, not {type(item).__name__}")
    message_id = _text_field(item, "ncmessage_id", MAX_ID_LENGTH, required=True)
    raw_status = _text_field(item, "status", MAX_STATUS_LENGTH, required=True)
    remark = item.get("status_remark")
    return DeliveryEvent(
        message_id=message_id or "",
        status=normalize_status(raw_status),
        raw_status=raw_status or "",
        reported_at=parse_time(item.get("received_at")),
        remark="" if remark is None else str(remark)[:2000],
        api_header=_text_field(item, "x-apiheader", MAX_HEADER_LENGTH, required=False),
        recipient=_text_field(item, "recipient", MAX_ID_LENGTH, required=False),
        raw=_raw(item),
    )


def parse_body(body: Any) -> ParsedBatch:
    """Sort a decoded webhook body into delivery events, inbound messages and rejected items."""
    batch = ParsedBatch()
    if not isinstance(body, dict):
        batch.rejected.append((f"body must be a JSON object, not {type(body).__name__}", _raw(body)))
        return batch
    reports = body.get("delivery_status")
    replies = body.get("incoming_message")
    if reports is None and replies is None:
        batch.rejected.append(("body has neither delivery_status[] nor incoming_message[]", _raw(body)))
        return batch
    if reports is not None:
        if not isinstance(reports, list):
            batch.rejected.append(("delivery_status must be a list", _raw(reports)))
        else:
            for index, item in enumerate(reports):
                try:
                    batch.events.append(parse_delivery_item(item))
                except (ValueError, TypeError) as err:
                    batch.rejected.append((f"delivery_status[{index}]: {err}", _raw(item)))
    if replies is not None:
        if not isinstance(replies, list):
            batch.rejected.append(("incoming_message must be a list", _raw(replies)))
        else:
            for index, item in enumerate(replies):
                if not isinstance(item, dict):
                    batch.rejected.append((f"incoming_message[{index}]: item must be an object", _raw(item)))
                    continue
                context = item.get("context") if isinstance(item.get("context"), dict) else {}
                batch.inbound.append(
                    {
                        "sender": str(item.get("from") or "")[:MAX_ID_LENGTH] or None,
                        "context_message_id": str(context.get("ncmessage_id") or "")[:MAX_ID_LENGTH] or None,
                        "raw": _raw(item),
                    }
                )
    return batch
