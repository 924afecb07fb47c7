"""Load delivery reports from a JSON Lines file into the store, through the receiver's own checks.

For reports the receiver never got (it was down longer than the vendor retries): exported from the
vendor's dashboard, or kept by a proxy in front of the receiver. Each line is one report object
(a ``delivery_status[]`` item) or one whole webhook body. Reports already stored count as
duplicates, so a file can be loaded twice; lines that cannot be used become dead letters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from airflow_provider_pepipost.status.inbound import DeadLetter, WebhookBatch
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.payload import body_key, letter, parse_body

LINES_PER_TRANSACTION = 500


def _parse_line(line: str, number: int) -> tuple[str, Any]:
    """("item", report), ("body", whole body) or ("bad", reason)."""
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as err:
        return "bad", f"line {number}: not JSON: {str(err)[:200]}"
    if isinstance(value, dict) and ("delivery_status" in value or "incoming_message" in value):
        return "body", value
    return "item", value


def import_reports(lines: Iterable[str], store: StatusStore) -> dict[str, int]:
    """Store every report of ``lines``; returns the counts (accepted, duplicates, dead_letters, ...)."""
    totals = {"lines": 0, **IngestResult().to_dict()}
    items: list[Any] = []
    numbers: list[int] = []  # the line of each item

    def flush(batch: WebhookBatch) -> None:
        result = store.ingest_many([batch])[0]
        for name, value in result.to_dict().items():
            totals[name] += value
        totals["dead_letters"] += batch.dead_letter_items - len(batch.dead_letters)

    def flush_items() -> None:
        if items:
            key = body_key(json.dumps(items, ensure_ascii=True, default=str))
            batch = parse_body({"delivery_status": items}, key)
            # Name the lines, not the places in this chunk, in the dead letters' reasons.
            batch.dead_letters = [
                DeadLetter(_renumber(dead.reason, numbers), dead.raw, dead.key) for dead in batch.dead_letters
            ]
            flush(batch)
            items.clear()
            numbers.clear()

    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        totals["lines"] += 1
        kind, value = _parse_line(line, number)
        if kind == "item":
            items.append(value)
            numbers.append(number)
            if len(items) >= LINES_PER_TRANSACTION:
                flush_items()
            continue
        flush_items()  # keep the file's order: earlier reports first
        if kind == "body":
            flush(parse_body(value, body_key(line)))
        else:
            flush(WebhookBatch(dead_letters=[letter(value, line, body_key(line), "line")], dead_letter_items=1))
    flush_items()
    return totals


def _renumber(reason: str, numbers: list[int]) -> str:
    """'delivery_status[3]: ...' -> 'line 13: ...' when the chunk's fourth item came from line 13."""
    head, sep, rest = reason.partition("]: ")
    if sep and head.startswith("delivery_status[") and head[16:].isdigit():
        return f"line {numbers[int(head[16:])]}{sep[1:]}{rest}"
    return reason
