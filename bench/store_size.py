"""Bench 7: the status store's size per message, and a purge of a million messages under ingest.

Fills a store with ``count`` sent messages as a campaign leaves them (a ledger row, the row's
record, the current status and three reports: sent, delivered, read), then measures the bytes per
message (``StatusStore.stats``), and times ``purge`` of all of them while ``pepipost-webhook``
keeps ingesting fresh reports from a client on loopback: every report must be answered 200.

Run alone, from the repository: python -m bench.store_size [--count N] [--postgres URL]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests
from sqlalchemy import insert

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run alone as a script, the bench package is beside it

from airflow_provider_pepipost.status import schema  # noqa: E402
from airflow_provider_pepipost.status.store import StatusStore  # noqa: E402
from bench.common import free_port, on_each_store  # noqa: E402

TOKEN = "bench-store-size-token"
AGE = 400 * 86_400.0  # the filled messages are this old: all of them are purged
CHUNK = 20_000


def fill(store: StatusStore, count: int) -> None:
    """``count`` messages of one campaign, each with its ledger row, row record, status and 3 events."""
    old = time.time() - AGE
    with store.engine.begin() as conn:
        for start in range(0, count, CHUNK):
            span = range(start, min(start + CHUNK, count))
            keys = [f"af-{i:032x}" for i in span]
            common = {"dag_id": "bench_size", "run_id": "run-1", "task_id": "send", "map_index": -1}
            conn.execute(insert(schema.ledger), [
                {**common, "idempotency_key": k, "api_header": k, "message_id": f"{i:08x}-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
                 "recipient": f"9198{i:08d}", "row_index": i, "state": "accepted", "sent_at": old, "updated_at": old,
                 "attempt": "a" * 32, "campaign": "c" * 32, "generation": 0}
                for i, k in zip(span, keys, strict=True)
            ])  # fmt: skip
            conn.execute(insert(schema.campaign_rows), [
                {**common, "row_index": i, "state": "accepted", "recipient": f"9198{i:08d}", "ledger_key": k,
                 "message_id": f"{i:08x}-4c5d-4e6f-8a9b-0c1d2e3f4a5b", "campaign": "c" * 32, "attempt": "a" * 32,
                 "updated_at": old}
                for i, k in zip(span, keys, strict=True)
            ])  # fmt: skip
            conn.execute(insert(schema.message_status), [
                {"message_id": f"{i:08x}-4c5d-4e6f-8a9b-0c1d2e3f4a5b", "status": "read", "rank": 3, "remark": "",
                 "reported_at": old, "updated_at": old, "delivered_at": old, "read_at": old, "billable": True,
                 "category": "marketing", "pricing_model": "CBP"}
                for i in span
            ])  # fmt: skip
            conn.execute(insert(schema.events), [
                {"event_key": f"{i:08x}{status}{'0' * 28}"[:40], "message_id": f"{i:08x}-4c5d-4e6f-8a9b-0c1d2e3f4a5b",
                 "status": status, "raw_status": status, "remark": "", "reported_at": old, "received_at": old,
                 "api_header": keys[i - start], "recipient": f"9198{i:08d}", "raw": _raw(i, status, keys[i - start])}
                for i in span for status in ("sent", "delivered", "read")
            ])  # fmt: skip


def _raw(i: int, status: str, header: str) -> str:
    """A v2 report item as the vendor sends it (what the receiver keeps for audits)."""
    return json.dumps({"ncmessage_id": f"{i:08x}-4c5d-4e6f-8a9b-0c1d2e3f4a5b", "recipient": f"9198{i:08d}",
                       "status": status, "status_remark": "", "received_at": "1700000000", "x-apiheader": header,
                       "phoneNumber": "919999999999", "source": "fa9d647a-c8d7-423e-bd27-7d2ca2875dc1",
                       "pricing": {"billable": True, "category": "marketing", "pricing_model": "CBP"}},
                      separators=(",", ":"))  # fmt: skip


def purge_under_ingest(url: str, store: StatusStore) -> dict:
    """Purge everything old while a receiver (its own process) ingests fresh reports."""
    port = free_port()
    env = {"PEPIPOST_STATUS_STORE_URL": url, "PEPIPOST_WEBHOOK_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
    receiver = subprocess.Popen(
        [str(Path(sys.executable).parent / "pepipost-webhook"), "--port", str(port)],
        env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    webhook = f"http://127.0.0.1:{port}/pepipost/webhook"
    answers: list[int] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        for i in range(10_000_000):  # bounded by count and by the purge's end
            if stop.is_set():
                return
            body = {"delivery_status": [{"ncmessage_id": f"fresh-{i}", "status": "delivered", "received_at": 1.7e9}]}
            answers.append(
                session.post(webhook, json=body, headers={"X-Pepipost-Token": TOKEN}, timeout=30).status_code
            )

    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/pepipost/healthz", timeout=1).ok:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        thread = threading.Thread(target=client)
        thread.start()
        started = time.perf_counter()
        deleted = store.purge(365, batch_size=5000)
        seconds = time.perf_counter() - started
        stop.set()
        thread.join(timeout=60)
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)
    refused = sum(1 for status in answers if status != 200)
    return {"purge_seconds": round(seconds, 1), "rows_deleted": sum(deleted.values()), "reports_during": len(answers),
            "reports_refused": refused}  # fmt: skip


def run(count: int = 1_000_000, postgres_url: str | None = None) -> dict:
    return {"messages": count, **on_each_store(_measure, postgres_url, count)}


def _measure(url: str, count: int) -> dict:
    store = StatusStore(url)
    started = time.perf_counter()
    fill(store, count)
    filled = time.perf_counter() - started
    if store.is_sqlite:
        with store.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    tables = {t.table: t for t in store.stats()}
    per_message = {t: round(s.bytes / count) for t, s in tables.items() if s.bytes and s.rows}
    return {
        "fill_seconds": round(filled, 1),
        "bytes_per_message": sum(per_message.values()),
        "bytes_per_message_by_table": per_message,
        **purge_under_ingest(url, store),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL server URL (a database is made on it)")
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.postgres), indent=2))
