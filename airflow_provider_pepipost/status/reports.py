"""The campaign report: what the campaign page shows of some task instances' messages.

The funnel, refusals and failures by code and remark, the time from send to delivered and to read,
delivery over time, the failed recipients, and a per-recipient export. Functions of an open
connection, read through the same tables as the summaries; numbers are masked here unless the
caller asks for them whole.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Connection, and_, case, func, or_, select

from airflow_provider_pepipost.messages import mask_number
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.ledger import IN_FLIGHT_STATES, TaskKey, task_filter
from airflow_provider_pepipost.status.model import LedgerState

FAILED_LISTED = 100
# Upper bounds (seconds) of the latency histogram's bars; the last bar holds the rest.
LATENCY_BUCKETS = (10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600)
TIMELINE_BARS = 30
_CLOSED_WINDOW = "8007"


@dataclass
class Latency:
    """Seconds from the send to a status: median, 90th percentile, histogram."""

    count: int = 0
    median: float | None = None
    p90: float | None = None
    histogram: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class CampaignReport:
    tasks: int = 0
    total: int = 0  # ledger rows that went out (accepted, unknown) plus refused ones
    funnel: dict[str, int] = field(default_factory=dict)
    refusals: list[tuple[str, str, int]] = field(default_factory=list)  # (code, message, rows)
    failures: list[tuple[str, int]] = field(default_factory=list)  # (remark, messages)
    to_delivered: Latency = field(default_factory=Latency)
    to_read: Latency = field(default_factory=Latency)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (bar start, delivered in it)
    timeline_step: float = 0.0
    failed_recipients: list[dict[str, Any]] = field(default_factory=list)


def _tasks_filter(tasks: Sequence[TaskKey]) -> Any:
    return or_(*(and_(*task_filter(t)) for t in tasks))


def _per_message(tasks: Sequence[TaskKey]) -> Any:
    """One row per ledger row: its state, current status and when it was first delivered and read."""
    led, st = schema.ledger, schema.message_status
    return (
        select(
            led.c.task_id,
            led.c.map_index,
            led.c.row_index,
            led.c.recipient,
            led.c.message_id,
            led.c.state,
            led.c.error_code,
            led.c.error_message,
            led.c.sent_at,
            st.c.status,
            st.c.remark,
            st.c.delivered_at,
            st.c.read_at,
        )
        .select_from(led.outerjoin(st, st.c.message_id == led.c.message_id))
        .where(_tasks_filter(tasks))
        .order_by(led.c.dag_id, led.c.task_id, led.c.map_index, led.c.row_index)
    )


def campaign_report(conn: Connection, tasks: Sequence[TaskKey]) -> CampaignReport:
    """The report over these task instances (one send task's map indexes, or a whole run's).

    Counted in the database (grouped), so that 100,000 messages cost a few aggregate queries and
    one list of times, not 100,000 rows through Python.
    """
    report = CampaignReport(tasks=len(tasks))
    if not tasks:
        return report
    led, st = schema.ledger, schema.message_status
    where = _tasks_filter(tasks)
    funnel: Counter = Counter()
    refusals: Counter = Counter()
    failures: Counter = Counter()
    grouped = (
        select(led.c.state, led.c.error_code, led.c.error_message, st.c.status, st.c.remark, func.count())
        .select_from(led.outerjoin(st, st.c.message_id == led.c.message_id))
        .where(where)
        .group_by(led.c.state, led.c.error_code, led.c.error_message, st.c.status, st.c.remark)
    )
    for state, code, message, status, remark, count in conn.execute(grouped):
        if state == LedgerState.REJECTED.value:
            refusals[(code or "", message or "")] += count
        elif state in IN_FLIGHT_STATES:
            funnel["unknown"] += count
        elif state == LedgerState.ACCEPTED.value:
            funnel[status or "pending"] += count
            if status == "failed":
                failures[remark or ""] += count
    closed_windows = any(code == _CLOSED_WINDOW for code, _ in refusals)
    served = _served_by_template(conn, where) if closed_windows else set()
    if served:  # a closed window the template served is not a refusal of the row: it is a fallback
        refusals[(_CLOSED_WINDOW, _closed_message(refusals))] -= len(served)
    accepted = sum(funnel[s] for s in ("pending", "sent", "delivered", "read", "failed"))
    report.funnel = {
        "sent": accepted,
        "delivered": funnel["delivered"] + funnel["read"],
        "read": funnel["read"],
        "failed": funnel["failed"],
        "pending": funnel["pending"] + funnel["sent"],
        "unknown": funnel["unknown"],
        "rejected": sum(n for n in refusals.values() if n > 0),
        "fallback": len(served),
    }
    report.total = accepted + funnel["unknown"] + report.funnel["rejected"]
    report.refusals = sorted(((c, m, n) for (c, m), n in refusals.items() if n > 0), key=lambda x: -x[2])
    report.failures = sorted(failures.items(), key=lambda x: -x[1])
    _add_times(conn, where, report)
    _add_failed_recipients(conn, where, served, report)
    return report


def _served_by_template(conn: Connection, where: Any) -> set[tuple[Any, ...]]:
    """The rows whose session message met a closed window (8007) and whose template was accepted."""
    led = schema.ledger
    place = (led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index, led.c.row_index)
    closed = func.sum(case((and_(led.c.state == "rejected", led.c.error_code == _CLOSED_WINDOW), 1), else_=0))
    accepted = func.sum(case((led.c.state == LedgerState.ACCEPTED.value, 1), else_=0))
    query = select(*place).where(where, or_(led.c.error_code == _CLOSED_WINDOW, led.c.state == "accepted"))
    query = query.group_by(*place).having(and_(closed > 0, accepted > 0))
    return {tuple(row) for row in conn.execute(query)}


def _add_times(conn: Connection, where: Any, report: CampaignReport) -> None:
    """Send to delivered and to read, per accepted message, from the first time each was reported.

    The report's time (the vendor's clock, else the receiver's) minus the send time (the
    worker's): two clocks, so these are figures to look at, never a decision.
    """
    led, st = schema.ledger, schema.message_status
    query = (
        select(st.c.delivered_at - led.c.sent_at, st.c.read_at - led.c.sent_at, st.c.delivered_at)
        .select_from(led.join(st, st.c.message_id == led.c.message_id))
        .where(where, led.c.state == LedgerState.ACCEPTED.value, st.c.delivered_at.is_not(None))
    )
    delivered_after: list[float] = []
    read_after: list[float] = []
    delivered_times: list[float] = []
    for to_delivered, to_read, delivered_at in conn.execute(query).tuples():
        delivered_after.append(max(to_delivered, 0.0))
        delivered_times.append(delivered_at)
        if to_read is not None:
            read_after.append(max(to_read, 0.0))
    report.to_delivered = _latency(delivered_after)
    report.to_read = _latency(read_after)
    report.timeline, report.timeline_step = _timeline(delivered_times)


def _add_failed_recipients(conn: Connection, where: Any, served: set[tuple[Any, ...]], report: CampaignReport) -> None:
    """The first refused rows (but those the template served), then the messages that failed."""
    led, st = schema.ledger, schema.message_status
    columns = (led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index, led.c.row_index, led.c.recipient)
    refused = (
        select(*columns, led.c.error_code, led.c.error_message)
        .where(where, led.c.state == "rejected")
        .order_by(led.c.dag_id, led.c.task_id, led.c.map_index, led.c.row_index)
    )
    for row in conn.execute(refused):
        if len(report.failed_recipients) >= FAILED_LISTED:
            break
        if tuple(row[:5]) not in served:
            _list_failed(report, row, "refused", f"{row.error_code}: {row.error_message}")
    failed = (
        select(*columns, st.c.remark)
        .select_from(led.join(st, st.c.message_id == led.c.message_id))
        .where(where, led.c.state == LedgerState.ACCEPTED.value, st.c.status == "failed")
        .order_by(led.c.dag_id, led.c.task_id, led.c.map_index, led.c.row_index)
        .limit(FAILED_LISTED)
    )
    for row in conn.execute(failed):
        if len(report.failed_recipients) >= FAILED_LISTED:
            break
        _list_failed(report, row, "failed", row.remark or "")


def _closed_message(refusals: Counter) -> str:
    return next((m for (c, m) in refusals if c == _CLOSED_WINDOW), "")


def _list_failed(report: CampaignReport, row: Any, kind: str, reason: str) -> None:
    report.failed_recipients.append(
        {
            "task": row.task_id if row.map_index < 0 else f"{row.task_id}[{row.map_index}]",
            "row": row.row_index,
            "recipient": mask_number(row.recipient),
            "kind": kind,
            "reason": reason,
        }
    )


def _percentile(sorted_values: list[float], share: float) -> float:
    index = max(math.ceil(share * len(sorted_values)) - 1, 0)
    return sorted_values[index]


def _latency(values: list[float]) -> Latency:
    if not values:
        return Latency()
    values.sort()
    bars = Counter()
    for value in values:
        bars[next((b for b in LATENCY_BUCKETS if value < b), None)] += 1
    labels = [(f"< {_duration(b)}", bars[b]) for b in LATENCY_BUCKETS] + [
        (f"≥ {_duration(LATENCY_BUCKETS[-1])}", bars[None])
    ]
    return Latency(len(values), _percentile(values, 0.5), _percentile(values, 0.9), labels)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g} s"
    if seconds < 3600:
        return f"{seconds / 60:g} min"
    return f"{seconds / 3600:g} h"


def _timeline(times: list[float]) -> tuple[list[tuple[float, int]], float]:
    """Deliveries per bar, ``TIMELINE_BARS`` bars from the first delivery to the last."""
    if not times:
        return [], 0.0
    start, end = min(times), max(times)
    step = max((end - start) / TIMELINE_BARS, 1.0)
    bars = Counter(min(int((t - start) // step), TIMELINE_BARS - 1) for t in times)
    return [(start + i * step, bars[i]) for i in range(TIMELINE_BARS)], step


EXPORT_COLUMNS = (
    "task", "map_index", "row", "recipient", "message_id", "state", "last_status",
    "sent_at", "delivered_at", "read_at", "error",
)  # fmt: skip


def export_rows(conn: Connection, tasks: Sequence[TaskKey], *, full_numbers: bool) -> Iterator[tuple[Any, ...]]:
    """Every ledger row of these task instances, for a CSV, streamed from the database."""
    if not tasks:
        return
    result = conn.execution_options(yield_per=5000).execute(_per_message(tasks))
    for row in result:
        error = f"{row.error_code}: {row.error_message}" if row.error_code else (row.error_message or row.remark or "")
        yield (
            row.task_id, row.map_index, row.row_index,
            row.recipient if full_numbers else mask_number(row.recipient),
            row.message_id or "", row.state, row.status or "",
            _iso(row.sent_at), _iso(row.delivered_at), _iso(row.read_at), error,
        )  # fmt: skip


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_tasks(conn: Connection, dag_id: str, run_id: str, task_id: str | None = None) -> list[TaskKey]:
    """The task instances of a run (or of one task of it, every map index) that sent messages."""
    led = schema.ledger
    query = (
        select(led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index)
        .distinct()
        .where(led.c.dag_id == dag_id, led.c.run_id == run_id)
    )
    if task_id is not None:
        query = query.where(led.c.task_id == task_id)
    return [TaskKey(*row) for row in conn.execute(query.order_by(led.c.task_id, led.c.map_index))]


__all__ = ["EXPORT_COLUMNS", "CampaignReport", "campaign_report", "export_rows", "run_tasks"]
