"""Reading delivery back: counts by status for message ids or whole task instances, the failed ones
with their remarks, and when the last report came.

Functions of an open connection. Ids travel in one bound parameter where the dialect allows it
(a JSON array on SQLite, an array on PostgreSQL), so 100k ids cost one indexed query.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import (
    Boolean,
    Connection,
    String,
    Text,
    any_,
    bindparam,
    cast,
    func,
    literal,
    null,
    select,
    union_all,
)
from sqlalchemy.dialects import postgresql

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.engines import chunks
from airflow_provider_pepipost.status.ledger import IN_FLIGHT_STATES, TaskKey, task_filter
from airflow_provider_pepipost.status.model import DeliverySummary, LedgerState

ID_SEPARATOR = "\n"  # joins a PostgreSQL id list into one bound text (ids with it go as an array)
# What a task's summary counts: the rows that went out, whatever became of them.
_SENT_STATES = (LedgerState.ACCEPTED.value, *IN_FLIGHT_STATES)


def summarize_ids(conn: Connection, message_ids: Iterable[str], *, chunked: bool = False) -> DeliverySummary:
    """Counts by current status for these ids, and the failed ones with their remarks.

    ``chunked`` forces IN lists of ``ID_CHUNK`` ids, the portable way used for other databases.
    """
    ids = list(dict.fromkeys(message_ids))
    summary = DeliverySummary(total=len(ids))
    st = schema.message_status
    for matches in id_filters(conn, st.c.message_id, ids, chunked):
        # One statement per id set, so the ids travel once: the counts by status and pricing, then
        # (marked by a null status) the first failed ids with their remarks.
        columns = (st.c.message_id, st.c.status, st.c.remark, st.c.billable, st.c.category)
        matched = select(*columns).where(matches).cte("matched")
        counts = select(
            matched.c.status, func.count().label("n"), cast(null(), String).label("mid"),
            cast(null(), Text).label("failed_remark"), matched.c.billable, matched.c.category,
        ).group_by(matched.c.status, matched.c.billable, matched.c.category)  # fmt: skip
        room = max(DeliverySummary.MAX_FAILED_LISTED - len(summary.failed), 0)
        failed_columns = (
            cast(null(), String).label("status"), literal(0).label("n"), matched.c.message_id, matched.c.remark,
            cast(null(), Boolean).label("billable"), cast(null(), String).label("category"),
        )  # fmt: skip
        failed = (
            select(*failed_columns)
            .where(matched.c.status == "failed")
            .order_by(matched.c.message_id)
            .limit(room)
            .subquery()
        )
        for status, count, message_id, remark, billable, category in conn.execute(union_all(counts, select(failed))):
            if status is None:
                summary.failed.append({"message_id": message_id, "remark": remark})
            else:
                summary.counts[status] = summary.counts.get(status, 0) + count
                summary.add_pricing(billable, category, count)
    summary.failed_total = summary.counts.get("failed", 0)
    summary.pending = summary.total - sum(summary.counts.values())
    summary.pricing_not_reported += summary.pending  # no report at all: no pricing either
    return summary


def id_filters(conn: Connection, column: Any, ids: list[str], chunked: bool = False) -> Iterator[Any]:
    """WHERE clauses that together match ``column`` against every id."""
    if not ids:
        return
    if not chunked and conn.dialect.name == "sqlite":
        values = func.json_each(json.dumps(ids)).table_valued("value")
        yield column.in_(select(values.c.value))
    elif not chunked and conn.dialect.name == "postgresql":
        if any(ID_SEPARATOR in message_id for message_id in ids):
            yield column == any_(bindparam("ids", ids, type_=postgresql.ARRAY(String)))
        else:
            # One text the server splits: psycopg2 quotes a list element by element, 40 ms for
            # 100k ids on loopback, about as long as the whole query takes this way.
            joined = bindparam("ids", ID_SEPARATOR.join(ids), type_=Text)
            yield column == any_(func.string_to_array(joined, ID_SEPARATOR, type_=postgresql.ARRAY(Text)))
    else:
        for chunk in chunks(ids):
            yield column.in_(chunk)


def summarize_task(conn: Connection, task: TaskKey) -> DeliverySummary:
    """The summary of everything one task instance sent, unknown outcomes included."""
    led, st = schema.ledger, schema.message_status
    summary = DeliverySummary(total=0)
    joined = led.outerjoin(st, st.c.message_id == led.c.message_id)
    rows = (*task_filter(task), led.c.state.in_(_SENT_STATES))
    if task.only_unknown:
        rows += (led.c.state.in_(IN_FLIGHT_STATES) | led.c.reconciled_at.is_not(None),)
    if task.campaign is not None:
        rows += (led.c.campaign == task.campaign,)
    for state, status, billable, category, count in conn.execute(
        select(led.c.state, st.c.status, st.c.billable, st.c.category, func.count())
        .select_from(joined)
        .where(*rows)
        .group_by(led.c.state, st.c.status, st.c.billable, st.c.category)
    ):
        summary.total += count
        summary.add_pricing(billable if state not in IN_FLIGHT_STATES else None, category, count)
        if state in IN_FLIGHT_STATES:
            summary.unknown += count
        elif status is None:
            summary.pending += count
        else:
            summary.counts[status] = summary.counts.get(status, 0) + count
    summary.failed_total = summary.counts.get("failed", 0)
    if summary.failed_total:
        summary.failed = [
            {"message_id": mid, "remark": remark}
            for mid, remark in conn.execute(
                select(st.c.message_id, st.c.remark)
                .select_from(joined)
                .where(*rows, st.c.status == "failed")
                .order_by(led.c.row_index)
                .limit(DeliverySummary.MAX_FAILED_LISTED)
            )
        ]
    return summary


def merge_summaries(parts: Sequence[DeliverySummary]) -> DeliverySummary:
    total = DeliverySummary(total=0)
    for part in parts:
        total.total += part.total
        total.pending += part.pending
        total.unknown += part.unknown
        total.failed_total += part.failed_total
        for status, count in part.counts.items():
            total.counts[status] = total.counts.get(status, 0) + count
        for category, count in part.billable.items():
            total.billable[category] = total.billable.get(category, 0) + count
        total.not_billable += part.not_billable
        total.pricing_not_reported += part.pricing_not_reported
        total.failed.extend(part.failed[: DeliverySummary.MAX_FAILED_LISTED - len(total.failed)])
    return total


def last_report_at(conn: Connection, targets: Sequence[str | TaskKey] | None = None) -> float | None:
    """When the store last received a delivery report (epoch seconds), or None if never.

    With ``targets`` (message ids and task instances), the last report for any of those messages.
    """
    ev, led = schema.events, schema.ledger
    if targets is None:  # the newest row by primary key: no scan of the events
        return conn.execute(select(ev.c.received_at).order_by(ev.c.id.desc()).limit(1)).scalar()
    ids = list(dict.fromkeys(t for t in targets if isinstance(t, str)))
    queries = [select(func.max(ev.c.received_at)).where(m) for m in id_filters(conn, ev.c.message_id, ids)]
    queries += [
        select(func.max(ev.c.received_at))
        .select_from(ev.join(led, led.c.message_id == ev.c.message_id))
        .where(*task_filter(task))
        for task in targets
        if isinstance(task, TaskKey)
    ]
    found = [when for query in queries if (when := conn.execute(query).scalar()) is not None]
    return max(found, default=None)
