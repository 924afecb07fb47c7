"""Bench 4: one sensor poke (a delivery summary) over 100k message ids with 300k stored events.

Run alone, from the repository: python -m bench.sensor_poke [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import time

from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from bench.common import on_each_store, spread

STATUSES = ("sent", "delivered", "read")


def fill(store: StatusStore, count: int) -> tuple[list[str], TaskKey]:
    """count ledger rows, and sent/delivered/read for each: 3 x count events."""
    task = TaskKey("bench_poke", "run-1", "send")
    ids = [f"msg-{index:08d}" for index in range(count)]
    rows = [
        {
            "idempotency_key": f"k{index}",
            "api_header": f"k{index}",
            "message_id": mid,
            "recipient": "919800000000",
            "dag_id": task.dag_id,
            "run_id": task.run_id,
            "task_id": task.task_id,
            "map_index": -1,
            "row_index": index,
            "state": "accepted",
            "sent_at": 0.0,
            "updated_at": 0.0,
        }
        for index, mid in enumerate(ids)
    ]
    from airflow_provider_pepipost.status import schema

    with store.engine.begin() as conn:
        conn.execute(schema.ledger.insert(), rows)
        # What the send task recorded of each input row: the campaign page reads these.
        page_rows = [
            {**{k: row[k] for k in ("dag_id", "run_id", "task_id", "map_index", "row_index", "recipient")},
             "state": "accepted", "ledger_key": row["idempotency_key"], "message_id": row["message_id"],
             "updated_at": 0.0}
            for row in rows
        ]  # fmt: skip
        conn.execute(schema.campaign_rows.insert(), page_rows)
    batch: list[DeliveryEvent] = []
    for index, mid in enumerate(ids):
        # Most messages reach read; every tenth stops at delivered, every fiftieth fails.
        path = STATUSES if index % 10 else STATUSES[:2]
        for step, status in enumerate(path):
            batch.append(DeliveryEvent(mid, status, status, 1_700_000_000.0 + step, "", None, None, "{}"))
        if index % 50 == 0:
            batch.append(DeliveryEvent(mid, "failed", "failed", 1_700_000_009.0, "unreachable", None, None, "{}"))
        if len(batch) >= 5000:
            store.ingest(batch)
            batch = []
    if batch:
        store.ingest(batch)
    return ids, task


def timed(fn, repeat: int = 5) -> float:
    """Median milliseconds of ``repeat`` calls, after one warm-up."""
    return timings(fn, repeat)["median"]


def timings(fn, repeat: int = 3) -> dict[str, float]:
    """Milliseconds of ``repeat`` calls after one warm-up: their median and spread (min, max)."""
    fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return spread(times, 1)


def run_one(url: str, count: int) -> dict:
    store = StatusStore(url)
    started = time.perf_counter()
    ids, task = fill(store, count)
    # A store in service has statistics (autovacuum, or SQLite's ANALYZE); a table filled a
    # second ago has none, and the planner would pick plans no deployment runs with.
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    fill_seconds = time.perf_counter() - started
    expected = store.summarize_ids(ids)
    assert store.summarize_ids(ids, chunked=True).to_dict() == expected.to_dict()
    return {
        "message_ids": count,
        "events": store.count_rows("pepipost_events"),
        "fill_seconds": round(fill_seconds, 1),
        "poke_ms_ids_one_parameter": timings(lambda: store.summarize_ids(ids)),
        "poke_ms_ids_chunked_before": timed(lambda: store.summarize_ids(ids, chunked=True)),
        "poke_ms_ledger_reference": timings(lambda: store.summarize_task(task)),
        "counts": expected.counts,
    }


def run(count: int = 100_000, postgres_url: str | None = None) -> dict:
    return on_each_store(run_one, postgres_url, count)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.postgres), indent=2))
