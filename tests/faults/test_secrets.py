"""The API key and the webhook token never reach a log, an XCom, a rendered field or an exception."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import text

from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from tests.conftest import connection_json, store_env
from tests.helpers import free_port, http_ok, wait_until

pytestmark = pytest.mark.dag
BIN = Path(sys.executable).parent
API_KEY = "sk-live-LEAKCANARY-7f3a9c"
TOKEN = "whtok-LEAKCANARY-51be0d"


def airflow_tables_text(dag_id: str) -> str:
    """XCom values and rendered template fields of the DAG's runs, as text."""
    from airflow.settings import engine

    with engine.connect() as conn:
        xcom = conn.execute(text("SELECT value FROM xcom WHERE dag_id = :d"), {"d": dag_id}).scalars().all()
        rtif = (
            conn.execute(
                text("SELECT rendered_fields FROM rendered_task_instance_fields WHERE dag_id = :d"), {"d": dag_id}
            )
            .scalars()
            .all()
        )
    return " ".join(map(str, [*xcom, *rtif]))


def files_text(root: Path) -> str:
    return " ".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file() and p.suffix in {".log", ""})


@pytest.mark.parametrize("sandbox_key", [API_KEY, "the-vendor-expects-another-key"], ids=["accepted", "refused"])
def test_the_api_key_appears_nowhere(airflow_db, sqlite_url, sandbox_key):
    with SandboxServer(Scenario(), api_key=sandbox_key) as sandbox:
        conn = connection_json(sandbox.url).replace("sandbox-api-key", API_KEY)
        env = dict(os.environ, AIRFLOW_CONN_PEPIPOST_DEFAULT=conn, **store_env(sqlite_url))
        run = subprocess.run(
            [str(BIN / "airflow"), "dags", "test", "pepipost_secrets"], env=env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    output = run.stdout + run.stderr
    assert "pepipost_secrets" in output  # it ran
    if sandbox_key != API_KEY:
        assert "8004" in output  # the refusal was logged, without the key
    assert API_KEY not in output
    assert API_KEY not in files_text(airflow_db / "logs")
    assert API_KEY not in airflow_tables_text("pepipost_secrets")


def test_the_webhook_token_stays_out_of_the_receivers_log(sqlite_url):
    port = free_port()
    receiver = subprocess.Popen(
        [str(BIN / "pepipost-webhook"), "--port", str(port), "--store-url", sqlite_url],
        env=dict(os.environ, PEPIPOST_WEBHOOK_TOKEN=TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/pepipost"
    try:
        assert wait_until(lambda: http_ok(f"{base}/healthz"), timeout=60, interval=0.2)
        requests.post(f"{base}/webhook?token={TOKEN}", data=b"{not json", timeout=10)  # logged as a dead letter
        requests.post(f"{base}/webhook?token={TOKEN}x", json={"delivery_status": []}, timeout=10)
        requests.post(f"{base}/webhook", json={"delivery_status": [7]}, headers={"X-Pepipost-Token": TOKEN}, timeout=10)
    finally:
        receiver.terminate()
        output, _ = receiver.communicate(timeout=15)
    assert "dead letter" in output  # the receiver did log these requests
    assert TOKEN not in output
