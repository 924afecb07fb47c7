"""Two receiver processes writing to one PostgreSQL store under load: no lost or doubled events."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import requests
from sqlalchemy import select
from sqlalchemy.engine import make_url

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore
from tests.helpers import free_port, http_ok, wait_until

TOKEN = "concurrent-token"
STATUSES = ("sent", "delivered", "read")


def start_receiver(store_url: str) -> tuple[subprocess.Popen, str]:
    """A receiver that takes its store from an Airflow connection: no URL in its command line."""
    port = free_port()
    url = make_url(store_url)
    connection = {"conn_type": "postgres", "host": url.host, "port": url.port, "login": url.username,
                  "password": url.password, "schema": url.database}  # fmt: skip
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "pepipost-webhook"), "--port", str(port), "--store-conn-id", "status_db"],
        env=dict(os.environ, PEPIPOST_WEBHOOK_TOKEN=TOKEN, AIRFLOW_CONN_STATUS_DB=json.dumps(connection)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert url.database not in " ".join(proc.args)
    base = f"http://127.0.0.1:{port}/pepipost"
    assert wait_until(lambda: http_ok(f"{base}/healthz"), timeout=60, interval=0.2)
    return proc, f"{base}/webhook"


def test_two_receivers_one_postgres_store(postgres_url):
    StatusStore(postgres_url)  # schema first, so that the receivers do not race to create it
    receivers = [start_receiver(postgres_url) for _ in range(2)]
    try:
        messages = [f"m{i}" for i in range(600)]
        # Every (message, status) is sent twice, to both receivers, in batches that overlap.
        events = [(mid, status, step) for mid in messages for step, status in enumerate(STATUSES)]
        batches = [events[i : i + 50] for i in range(0, len(events), 50)]
        errors: list[str] = []

        def client(url: str, order: list) -> None:
            session = requests.Session()
            for batch in order:
                body = {"delivery_status": [
                    {"ncmessage_id": m, "status": s, "received_at": str(1_700_000_000 + k)} for m, s, k in batch
                ]}  # fmt: skip
                answer = session.post(url, json=body, headers={"X-Pepipost-Token": TOKEN}, timeout=30)
                if answer.status_code != 200:
                    errors.append(answer.text)

        threads = [
            threading.Thread(target=client, args=(receivers[0][1], batches)),
            threading.Thread(target=client, args=(receivers[1][1], list(reversed(batches)))),
            threading.Thread(target=client, args=(receivers[1][1], batches[::2])),
            threading.Thread(target=client, args=(receivers[0][1], batches[1::2])),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors
        store = StatusStore(postgres_url)
        assert store.count_rows("pepipost_events") == len(events)  # none lost, none doubled
        with store.engine.connect() as conn:
            statuses = dict(
                conn.execute(select(schema.message_status.c.message_id, schema.message_status.c.status)).all()
            )
        assert statuses == {mid: "read" for mid in messages}  # monotonic whatever the arrival order
    finally:
        for proc, _ in receivers:
            proc.terminate()
            proc.wait(timeout=15)


@pytest.fixture(autouse=True)
def _need_postgres(postgres_server_url):
    """Skipped, with the reason, where no PostgreSQL is configured."""
