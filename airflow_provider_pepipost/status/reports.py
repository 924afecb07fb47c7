"""The campaign report: what the campaign page and its CSV show of a run's send task instances.

Read from ``campaign_rows`` (one row per input row, with the task's own state for it, as XCom
``messages`` says) joined to the ledger row of the message standing for it and that message's
current status. Two counts come out, and each equals its source by construction:

- the task states of the rows: ``send_summary``'s counts;
- the delivery statuses of the messages the sensor waits on (rows accepted, fallback or unknown):
  the sensor's summary of the same task.

Functions of an open connection. Whole numbers leave this module only where the caller asks
for them; every free text (vendor errors, remarks) has its numbers masked unless asked too.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, and_, case, func, or_, select

from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.ledger import IN_FLIGHT_STATES

FAILED_LISTED = 100
# Upper bounds (seconds) of the latency histogram's bars; the last bar holds the rest.
LATENCY_BUCKETS = (10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600)
TIMELINE_BARS = 30

# What the task did with an input row (XCom ``messages`` ``state``; ``send_summary`` counts them).
TASK_STATES = ("accepted", "fallback", "rejected", "unknown", "duplicate", "not_sent", "suppressed")
# Rows whose message the vendor took, or may have (unknown): what the sensor waits on.
WENT_OUT = ("accepted", "fallback", "unknown")
# What the phones reported of a message (the sensor's summary): its last status, ``pending``
# before any report, ``unknown`` while the send's own outcome is unknown. A status the provider
# does not know (``enqueued``) is kept and shown under its own name.
DELIVERY_STATUSES = ("pending", "sent", "delivered", "read", "failed", "unknown")
PRICING_CATEGORIES = ("marketing", "utility", "authentication", "service")


@dataclass
class Latency:
    """Seconds from the send to a status: median, 90th percentile, histogram."""

    count: int = 0
    median: float | None = None
    p90: float | None = None
    histogram: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class Cost:
    """What the messages cost, as webhook v2 reports said (v1 reports say nothing)."""

    billable: dict[str, int] = field(default_factory=dict)  # category -> billable messages
    not_billable: int = 0
    not_reported: int = 0  # no report with pricing (yet, or v1)
    currency: str | None = None  # of the rate card, when one was given
    # Billable messages priced by the rate card; None with a rate card when no report of these
    # messages carried pricing at all: "not reported", never 0.
    estimated: float | None = None
    unpriced: dict[str, int] = field(default_factory=dict)  # billable categories the rate card lacks


@dataclass
class CampaignReport:
    tasks: int = 0
    rows: int = 0  # input rows: send_summary's total
    states: dict[str, int] = field(default_factory=dict)  # task state -> rows: send_summary's counts
    messages: int = 0  # rows accepted, fallback or unknown: the sensor's total
    statuses: dict[str, int] = field(default_factory=dict)  # delivery status -> messages: the sensor's
    refusals: list[tuple[str, str, int]] = field(default_factory=list)  # (code, message, rows)
    failures: list[tuple[str, int]] = field(default_factory=list)  # (remark, messages)
    to_delivered: Latency = field(default_factory=Latency)
    to_read: Latency = field(default_factory=Latency)
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (bar start, delivered in it)
    timeline_step: float = 0.0
    failed_recipients: list[dict[str, Any]] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)

    def reached(self, status: str) -> int:
        """Messages at this status or beyond: delivered counts read too."""
        beyond = {"sent": ("sent", "delivered", "read"), "delivered": ("delivered", "read"), "read": ("read",)}
        return sum(self.statuses.get(s, 0) for s in beyond[status])


def _scope(dag_id: str, run_id: str, task_id: str | None) -> Any:
    """The rows of a run, or of one task of it: by the table's key prefix, never one term per instance."""
    rows = schema.campaign_rows
    where = and_(rows.c.dag_id == dag_id, rows.c.run_id == run_id)
    return and_(where, rows.c.task_id == task_id) if task_id is not None else where


def _joined(whole_ledger: bool = False) -> Any:
    """Each row with its message's status. The ledger is looked up for rows whose outcome was
    unknown only (a report may have reconciled it since), the others carry their message id;
    ``whole_ledger`` looks it up for every row (the CSV's send times)."""
    rows, led, st = schema.campaign_rows, schema.ledger, schema.message_status
    ledger_row = led.c.idempotency_key == rows.c.ledger_key if whole_ledger else _ledger_row_if_unknown()
    return rows.outerjoin(led, ledger_row).outerjoin(st, st.c.message_id == _message_id())


def _ledger_row_if_unknown() -> Any:
    """The join of a row to its ledger row, for rows whose outcome was unknown only.

    A NULL key for the other rows, rather than "state = 'unknown' AND key = ...": the database
    then skips the index look-up for them (the page over 100,000 rows: bench/campaign_page.py).
    """
    rows, led = schema.campaign_rows, schema.ledger
    return led.c.idempotency_key == case((rows.c.state == "unknown", rows.c.ledger_key), else_=None)


def _message_id() -> Any:
    """The row's message id: its own, else the one a report reconciled into its ledger row."""
    rows, led = schema.campaign_rows, schema.ledger
    return func.coalesce(rows.c.message_id, led.c.message_id)


def _unreconciled() -> Any:
    """A row whose outcome was unknown and still is: no report has given its message id."""
    rows, led = schema.campaign_rows, schema.ledger
    return and_(rows.c.state == "unknown", or_(led.c.state.in_(IN_FLIGHT_STATES), led.c.message_id.is_(None)))


def _delivery_status() -> Any:
    """A went-out row's delivery status, as the sensor counts it."""
    st = schema.message_status
    return case(
        (_unreconciled(), "unknown"),
        (_message_id().is_(None), "unknown"),
        else_=func.coalesce(st.c.status, "pending"),
    )


def _ledger_scope(dag_id: str, run_id: str, task_id: str | None) -> Any:
    led = schema.ledger
    where = and_(led.c.dag_id == dag_id, led.c.run_id == run_id)
    return and_(where, led.c.task_id == task_id) if task_id is not None else where


def campaign_report(
    conn: Connection,
    dag_id: str,
    run_id: str,
    task_id: str | None = None,
    *,
    rate_card: Mapping[str, Any] | None = None,
    full_text: bool = False,
) -> CampaignReport:
    """The report of a run's send tasks (or of one, every map index), counted in the database.

    ``full_text``: free texts as the vendor wrote them; by default the numbers in them are masked.
    """
    rows = schema.campaign_rows
    report = CampaignReport()
    where = _scope(dag_id, run_id, task_id)
    instances = select(rows.c.task_id, rows.c.map_index).where(where).distinct().subquery()
    report.tasks = conn.execute(select(func.count()).select_from(instances)).scalar() or 0
    if not report.tasks:
        return report
    text = (lambda value: value) if full_text else mask_numbers_in
    states: Counter = Counter()
    refusals: Counter = Counter()
    for state, code, message, count in conn.execute(
        select(rows.c.state, rows.c.error_code, rows.c.error_message, func.count())
        .where(where)
        .group_by(rows.c.state, rows.c.error_code, rows.c.error_message)
    ):
        states[state] += count
        if state == "rejected":
            refusals[(code or "", text(message or ""))] += count
    report.states = {state: states.get(state, 0) for state in TASK_STATES} | dict(states)
    report.rows = sum(states.values())
    report.refusals = sorted(((c, m, n) for (c, m), n in refusals.items()), key=lambda x: (-x[2], x[0], x[1]))
    _add_delivery_and_cost(conn, where, report, text, rate_card)
    _add_times(conn, _ledger_scope(dag_id, run_id, task_id), report)
    _add_failed_recipients(conn, where, report, text)
    return report


def _add_delivery_and_cost(
    conn: Connection, where: Any, report: CampaignReport, text: Any, rate_card: Mapping[str, Any] | None
) -> None:
    """The messages by delivery status, the failures by remark, and the pricing: one grouped read."""
    rows, st = schema.campaign_rows, schema.message_status
    status = _delivery_status()
    remark = case((status == "failed", st.c.remark), else_=None)
    statuses: Counter = Counter()
    failures: Counter = Counter()
    cost = Cost()
    for value, why, billable, category, count in conn.execute(
        select(status, remark, st.c.billable, st.c.category, func.count())
        .select_from(_joined())
        .where(where, rows.c.state.in_(WENT_OUT))
        .group_by(status, remark, st.c.billable, st.c.category)
    ):
        statuses[value] += count
        if value == "failed":
            failures[text(why or "")] += count
        _add_pricing(cost, billable, category, count)
    report.statuses = {s: statuses.get(s, 0) for s in DELIVERY_STATUSES} | dict(statuses)
    report.messages = sum(statuses.values())
    report.failures = sorted(failures.items(), key=lambda x: (-x[1], x[0]))
    if rate_card:
        estimate = price(cost.billable, rate_card, not_billable=cost.not_billable, not_reported=cost.not_reported)
        cost.currency, cost.estimated, cost.unpriced = estimate["currency"], estimate["amount"], estimate["unpriced"]
    report.cost = cost


def _add_pricing(cost: Cost, billable: bool | None, category: str | None, count: int) -> None:
    if billable is None:
        cost.not_reported += count
    elif billable:
        name = category or "uncategorized"
        cost.billable[name] = cost.billable.get(name, 0) + count
    else:
        cost.not_billable += count


def _add_times(conn: Connection, where: Any, report: CampaignReport) -> None:
    """Send to delivered and to read, per accepted message of the run's ledger, from the first
    time each was reported.

    The report's time (the vendor's clock, else the receiver's) minus the send time (the
    worker's): two clocks, so these are figures to look at, never a decision.
    """
    led, st = schema.ledger, schema.message_status
    query = (
        select(st.c.delivered_at - led.c.sent_at, st.c.read_at - led.c.sent_at, st.c.delivered_at)
        .select_from(led.join(st, st.c.message_id == led.c.message_id))
        .where(where, led.c.state == "accepted", st.c.delivered_at.is_not(None))
    )
    with conn.execute(query) as result:
        # The driver's own tuples, in one fetch: for a 100,000-message campaign, building
        # SQLAlchemy rows of them took three times as long as the query and the fetch together.
        # (A streaming connection has rows buffered ahead of the driver's cursor: its own rows there.)
        streaming = conn.get_execution_options().get("stream_results")
        found = result.fetchall() if streaming else result.cursor.fetchall()
    if not found:
        report.to_delivered, report.to_read = _latency([]), _latency([])
        report.timeline, report.timeline_step = _timeline([])
        return
    # Column by column with itemgetter: for 100,000 rows zip(*found) and a max() per value took a
    # third of the report (bench/campaign_page.py).
    report.to_delivered = _latency(list(map(itemgetter(0), found)))
    report.to_read = _latency([seconds for seconds in map(itemgetter(1), found) if seconds is not None])
    report.timeline, report.timeline_step = _timeline(list(map(itemgetter(2), found)))


def _add_failed_recipients(conn: Connection, where: Any, report: CampaignReport, text: Any) -> None:
    """The first rows the vendor refused, then the first messages that failed on the phone's side."""
    rows, led, st = schema.campaign_rows, schema.ledger, schema.message_status
    order = (rows.c.task_id, rows.c.map_index, rows.c.row_index)
    columns = (rows.c.task_id, rows.c.map_index, rows.c.row_index, rows.c.recipient)
    # The counts read already bound both lists: a campaign without refusals or failures scans for none.
    refused_rows = report.states.get("rejected", 0)
    if refused_rows:
        refused = select(*columns, rows.c.error_code, rows.c.error_message).where(where, rows.c.state == "rejected")
        for row in conn.execute(refused.order_by(*order).limit(min(FAILED_LISTED, refused_rows))):
            _list_failed(report, row, "refused", text(f"{row.error_code}: {row.error_message}"))
    room = min(FAILED_LISTED - len(report.failed_recipients), report.statuses.get("failed", 0))
    if room <= 0:
        return
    # The failed statuses first (an inner join on them), rather than every row's status then a
    # filter: the same rows as _delivery_status() == "failed", since a reported status implies a
    # message id, and an unknown row counts only once reconciled.
    failed_status = and_(st.c.message_id == _message_id(), st.c.status == "failed")
    failed = (
        select(*columns, st.c.remark)
        .select_from(rows.outerjoin(led, _ledger_row_if_unknown()).join(st, failed_status))
        .where(where, rows.c.state.in_(WENT_OUT), ~_unreconciled())
        .order_by(*order)
        .limit(room)
    )
    for failed_row in conn.execute(failed):
        _list_failed(report, failed_row, "failed", text(failed_row.remark or ""))


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


def price(
    billable: Mapping[str, int], rate_card: Mapping[str, Any], *, not_billable: int = 0, not_reported: int = 0
) -> dict[str, Any]:
    """Billable messages by category, priced by a rate card (see ``check_rate_card``): the amount,
    its currency, the billable messages of categories the card has no price for, and the messages
    whose reports carried no pricing. The amount is None, "not reported", when no message's reports
    carried pricing (webhook v1, or no report yet): an estimate of 0 would say they were free."""
    prices = {k: float(v) for k, v in rate_card.items() if k != "currency"}
    reported = sum(billable.values()) + not_billable
    amount = round(sum(n * prices[c] for c, n in billable.items() if c in prices), 6)
    return {
        "currency": str(rate_card.get("currency") or ""),
        "amount": amount if reported or not not_reported else None,
        "unpriced": {c: n for c, n in billable.items() if c not in prices},
        "not_reported": not_reported,
    }


def check_rate_card(value: Any) -> dict[str, Any]:
    """A rate card as ``{"currency": "INR", "marketing": 0.78, ...}``: a price per billable message
    by category. Raises ValueError naming the entry that is wrong."""
    if not isinstance(value, Mapping):
        raise ValueError(f"rate_card must be a mapping of category to price, not {type(value).__name__}")
    card: dict[str, Any] = {}
    for key, price in value.items():
        if key == "currency":
            if not isinstance(price, str) or not price.strip() or len(price) > 8:
                raise ValueError(f"rate_card['currency'] must be a currency code such as 'INR', not {price!r}")
            card[key] = price.strip()
            continue
        if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
            raise ValueError(f"rate_card[{key!r}] must be a price of 0 or more, not {price!r}")
        card[str(key).lower()] = float(price)
    if "currency" not in card:
        raise ValueError("rate_card needs a 'currency' (e.g. 'INR') beside the prices")
    return card


def _percentile(sorted_values: list[float], share: float) -> float:
    index = max(math.ceil(share * len(sorted_values)) - 1, 0)
    return sorted_values[index]


def _latency(values: list[float]) -> Latency:
    """Seconds from send to a report (sorted in place); a negative one, two clocks disagreeing, counts as 0."""
    if not values:
        return Latency()
    values.sort()
    negative = bisect.bisect_left(values, 0.0)  # they sort first: clamped there, the order holds
    values[:negative] = [0.0] * negative
    # Sorted: each bar's end is one bisection, not one comparison per value.
    ends = [bisect.bisect_left(values, bound) for bound in LATENCY_BUCKETS]
    counts = _sizes([*ends, len(values)])
    labels = [f"< {_duration(b)}" for b in LATENCY_BUCKETS] + [f"≥ {_duration(LATENCY_BUCKETS[-1])}"]
    histogram = list(zip(labels, counts, strict=True))
    return Latency(len(values), _percentile(values, 0.5), _percentile(values, 0.9), histogram)


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
    times.sort()
    start, end = times[0], times[-1]
    step = max((end - start) / TIMELINE_BARS, 1.0)

    def bar(t: float) -> int:  # a time's bar, past the last one for the end itself
        return int((t - start) // step)

    # Sorted, each bar's end is one bisection by the same rule, not a division per time.
    ends = [bisect.bisect_left(times, i, key=bar) for i in range(1, TIMELINE_BARS)]
    counts = _sizes([*ends, len(times)])
    return [(start + i * step, counts[i]) for i in range(TIMELINE_BARS)], step


def _sizes(ends: list[int]) -> list[int]:
    """The sizes of consecutive slices of a sorted list, from 0 to each end in turn."""
    return [end - begin for begin, end in zip([0, *ends[:-1]], ends, strict=True)]


EXPORT_COLUMNS = (
    "task", "map_index", "row", "recipient", "state", "message_id", "last_status", "category", "billable",
    "sent_at", "delivered_at", "read_at", "error",
)  # fmt: skip


def export_rows(
    conn: Connection, dag_id: str, run_id: str, task_id: str | None = None, *, full_numbers: bool
) -> Iterator[tuple[Any, ...]]:
    """One row per input row (XCom ``messages``' rows and states, plus the delivery columns),
    streamed from the database; numbers masked unless ``full_numbers``, in free text too."""
    rows, led, st = schema.campaign_rows, schema.ledger, schema.message_status
    went_out = rows.c.state.in_(WENT_OUT)

    def delivery(column: Any) -> Any:  # only for the messages that went out: a duplicate has none
        return case((went_out, column), else_=None)

    columns = (
        rows.c.task_id, rows.c.map_index, rows.c.row_index, rows.c.recipient, rows.c.state,
        delivery(func.coalesce(led.c.message_id, rows.c.message_id)).label("message_id"),
        case((went_out, _delivery_status()), else_="").label("status"),
        delivery(st.c.category).label("category"), delivery(st.c.billable).label("billable"),
        case((rows.c.state.in_((*WENT_OUT, "rejected")), led.c.sent_at), else_=None).label("sent_at"),
        delivery(st.c.delivered_at).label("delivered_at"), delivery(st.c.read_at).label("read_at"),
        rows.c.error_code, rows.c.error_message, st.c.remark,
    )  # fmt: skip
    query = (
        select(*columns)
        .select_from(_joined(whole_ledger=True))
        .where(_scope(dag_id, run_id, task_id))
        .order_by(rows.c.task_id, rows.c.map_index, rows.c.row_index)
    )
    text = (lambda value: value) if full_numbers else mask_numbers_in
    for row in conn.execution_options(yield_per=5000).execute(query):
        if row.state == "rejected":
            error = f"{row.error_code}: {row.error_message}" if row.error_code else (row.error_message or "")
        elif row.status == "failed":
            error = row.remark or ""
        else:
            error = row.error_message or ""
        yield (
            row.task_id, row.map_index, row.row_index,
            row.recipient if full_numbers else mask_number(row.recipient),
            row.state, row.message_id or "", row.status, row.category or "",
            "" if row.billable is None else ("yes" if row.billable else "no"),
            _iso(row.sent_at), _iso(row.delivered_at), _iso(row.read_at),
            text(error),
        )  # fmt: skip


def _iso(epoch: float | None) -> str:
    if epoch is None:
        return ""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


__all__ = [
    "DELIVERY_STATUSES",
    "EXPORT_COLUMNS",
    "TASK_STATES",
    "CampaignReport",
    "Cost",
    "campaign_report",
    "check_rate_card",
    "export_rows",
]
