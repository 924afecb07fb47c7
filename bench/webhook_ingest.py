"""Bench 3: delivery events per second the receiver durably records, by batch size and store.

The receiver runs as `pepipost-webhook` in its own process; a load client posts from threads here.
Every run ends by counting the events in the store: only what is there counts as recorded.
Run alone: python bench/webhook_ingest.py [--postgres URL]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_pepipost.status.store import StatusStore
from bench.common import BIN, free_port, percentile, wait_http

TOKEN = "bench-token"


def bodies(batch: int, events: int) -> list[bytes]:
    run = uuid.uuid4().hex[:8]
    out = []
    for start in range(0, events, batch):
        items = [
            {
                "ncmessage_id": f"{run}-{index}",
                "recipient": "919800000000",
                "status": "delivered",
                "status_remark": "",
                "received_at": "1700000000",
                "x-apiheader": f"h-{run}-{index}",
            }
            for index in range(start, min(start + batch, events))
        ]
        out.append(json.dumps({"delivery_status": items}).encode())
    return out


def load(url: str, payloads: list[bytes], clients: int, seconds: float) -> tuple[int, float, list[float]]:
    """Post the payloads from ``clients`` threads; bounded by count and by ``seconds``."""
    latencies: list[float] = []
    accepted = [0]
    lock = threading.Lock()
    cursor = iter(payloads)
    deadline = time.monotonic() + seconds

    parts = urlsplit(url)

    def client() -> None:
        # http.client with keep-alive: a load client light enough not to be what is measured.
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        headers = {"X-Pepipost-Token": TOKEN, "Content-Type": "application/json"}
        while time.monotonic() < deadline:
            with lock:
                body = next(cursor, None)
            if body is None:
                break
            started = time.perf_counter()
            connection.request("POST", parts.path, body=body, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            elapsed = time.perf_counter() - started
            assert answer.status == 200, data
            with lock:
                latencies.append(elapsed * 1000)
                accepted[0] += json.loads(data)["accepted"]
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return accepted[0], time.perf_counter() - started, latencies


def run_store(store_url: str, label: str, batches=(1, 50, 500), clients: int = 16, workers: int = 1) -> list[dict]:
    port = free_port()
    env = dict(os.environ, PEPIPOST_WEBHOOK_TOKEN=TOKEN)
    receiver = subprocess.Popen(
        [str(BIN / "pepipost-webhook"), "--port", str(port), "--store-url", store_url, "--workers", str(workers)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    rows = []
    try:
        wait_http(f"http://127.0.0.1:{port}/pepipost/healthz")
        url = f"http://127.0.0.1:{port}/pepipost/webhook"
        load(url, bodies(50, 2000), clients, 30)  # warm-up: schema, pools, page cache
        store = StatusStore(store_url)
        for batch in batches:
            events = 6000 if batch == 1 else 50_000
            before = store.count_rows("pepipost_events")
            accepted, seconds, latencies = load(url, bodies(batch, events), clients, 60)
            stored = store.count_rows("pepipost_events") - before
            assert stored == accepted, (stored, accepted)
            rows.append(
                {
                    "store": label,
                    "batch": batch,
                    "events": stored,
                    "seconds": round(seconds, 2),
                    "events_per_s": round(stored / seconds),
                    "p50_ms": round(percentile(latencies, 0.5), 1),
                    "p99_ms": round(percentile(latencies, 0.99), 1),
                    "receiver_workers": workers,
                    "clients": clients,
                }
            )
    finally:
        receiver.terminate()
        receiver.wait(timeout=15)
    return rows


def run(postgres_url: str | None = None) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        # SQLite has one writer: one receiver process group-commits best. PostgreSQL takes two.
        rows += run_store(f"sqlite:///{Path(tmp) / 'ingest.db'}", "sqlite", workers=1)
    if postgres_url:
        from bench.pg import scratch_database

        with scratch_database(postgres_url) as url:
            rows += run_store(url, "postgresql", workers=2)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres")
    args = parser.parse_args()
    print(json.dumps(run(args.postgres), indent=2))
