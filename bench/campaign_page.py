"""Bench 6: the campaign page over a 100,000-message campaign (300k events), SQLite and PostgreSQL.

The page's figures (``StatusStore.campaign_report``), the whole page as the API server renders it,
and the CSV of every recipient. Target: the page under half a second; three timed renders after a
warm-up give its median and spread.

Run alone, from the repository: python -m bench.campaign_page [--count N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import time

from fastapi.testclient import TestClient

from airflow_provider_pepipost.plugins.campaign_page import create_campaign_app
from airflow_provider_pepipost.status.store import StatusStore
from bench.common import on_each_store
from bench.sensor_poke import fill, timed, timings


def run(count: int = 100_000, postgres_url: str | None = None) -> dict:
    return on_each_store(run_one, postgres_url, count)


def run_one(url: str, count: int) -> dict:
    store = StatusStore(url)
    _, task = fill(store, count)
    with store.engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("ANALYZE")
    report = store.campaign_report(task.dag_id, task.run_id, task.task_id)
    assert report.rows == report.messages == count, (report.rows, report.messages)
    client = TestClient(create_campaign_app(url, auth=(lambda: None, lambda *_: False), rate_card=lambda: None))
    page = f"/dags/{task.dag_id}/runs/{task.run_id}/tasks/{task.task_id}"
    assert client.get(page).status_code == 200
    started = time.perf_counter()
    lines = sum(1 for _ in client.get(page + "/export.csv").iter_lines())
    csv_seconds = time.perf_counter() - started
    assert lines == count + 1, lines
    return {
        "messages": count,
        "report_ms": timed(lambda: store.campaign_report(task.dag_id, task.run_id, task.task_id), repeat=3),
        "page_ms": timings(lambda: client.get(page)),
        "csv_seconds": round(csv_seconds, 2),
        "statuses": report.statuses,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.postgres), indent=2))
