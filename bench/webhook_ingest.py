"""Bench 3: delivery events per second the receiver durably records, by batch size and store.

The receiver runs as `pepipost-webhook` in its own process; a load client posts from threads here.
Every run ends by counting the events in the store: only what is there counts as recorded.
With ``--junk``, the same single-event load beside 2 MiB bodies of junk posted back to back: what
valid posts wait while the receiver sets junk aside.
Run alone, from the repository: python -m bench.webhook_ingest [--postgres URL] [--junk]
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
from contextlib import contextmanager
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


@contextmanager
def receiver_process(store_url: str, workers: int):
    """``pepipost-webhook`` on a free port; yields its webhook URL."""
    with receiver(store_url, workers) as (url, _):
        yield url


@contextmanager
def receiver(store_url: str, workers: int = 1, *args: str):
    """``pepipost-webhook`` on a free port, with more of its options in ``args``; yields its webhook
    URL and its process."""
    port = free_port()
    env = dict(os.environ, PEPIPOST_WEBHOOK_TOKEN=TOKEN)
    command = [str(BIN / "pepipost-webhook"), "--port", str(port), "--store-url", store_url, "--workers", str(workers)]
    process = subprocess.Popen([*command, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/pepipost/healthz")
        yield f"http://127.0.0.1:{port}/pepipost/webhook", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # still writing what it was sent: not this bench's business
            process.kill()
            process.wait(timeout=10)


def run_store(store_url: str, label: str, batches=(1, 50, 500), clients: int = 16, workers: int = 1) -> list[dict]:
    rows = []
    with receiver_process(store_url, workers) as url:
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
    return rows


def run_junk(store_url: str, label: str, clients: int = 4, seconds: float = 10, workers: int = 1) -> dict:
    """Single-event posts from ``clients`` threads beside 2 MiB junk bodies back to back, for ``seconds``."""
    junk = b'{"delivery_status": [' + b"1," * (1024 * 1024 - 20) + b"1]}"
    stop = threading.Event()
    junk_posted = [0]

    with receiver_process(store_url, workers) as url:
        parts = urlsplit(url)

        def poster() -> None:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            headers = {"X-Pepipost-Token": TOKEN, "Content-Type": "application/json"}
            while not stop.is_set():
                connection.request("POST", parts.path, body=junk, headers=headers)
                connection.getresponse().read()
                junk_posted[0] += 1

        thread = threading.Thread(target=poster, daemon=True)
        thread.start()
        try:
            accepted, elapsed, latencies = load(url, bodies(1, 100_000), clients, seconds)
        finally:
            stop.set()
            thread.join(timeout=120)
    return {
        "store": label,
        "valid_events_per_s": round(accepted / elapsed),
        "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies, default=0.0), 1),
        "junk_bodies_answered": junk_posted[0],
        "clients": clients,
    }


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


def run_junk_all(postgres_url: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        rows = [run_junk(f"sqlite:///{Path(tmp) / 'junk.db'}", "sqlite")]
    if postgres_url:
        from bench.pg import scratch_database

        with scratch_database(postgres_url) as url:
            rows.append(run_junk(url, "postgresql"))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--postgres")
    parser.add_argument("--junk", action="store_true", help="single-event posts beside 2 MiB junk bodies")
    args = parser.parse_args()
    print(json.dumps(run_junk_all(args.postgres) if args.junk else run(args.postgres), indent=2))
