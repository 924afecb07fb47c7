"""SIGKILL a real `airflow tasks test` mid-campaign, run the task again: nothing sent twice, no id lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_pepipost.operators.xcom import parse_message_targets
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore
from tests.conftest import WEBHOOK_TOKEN, connection_json, store_env
from tests.helpers import wait_until

pytestmark = pytest.mark.dag
AIRFLOW = str(Path(sys.executable).parent / "airflow")
LOGICAL_DATE = "2026-01-01T00:00:00+00:00"


def tasks_test(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [AIRFLOW, "tasks", "test", "pepipost_kill", "send", LOGICAL_DATE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the kill takes every thread and child
    )


def ledger_rows(store: StatusStore) -> list:
    led = schema.ledger
    with store.engine.connect() as conn:
        return conn.execute(led.select().where(led.c.dag_id == "pepipost_kill").order_by(led.c.row_index)).all()


def test_killed_mid_campaign_then_retried(airflow_db, sqlite_receiver):
    scenario = Scenario(latency=0.01, final_mix={"delivered": 1.0}, status_delay=0.05)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        env = dict(
            os.environ,
            AIRFLOW_CONN_PEPIPOST_DEFAULT=connection_json(sandbox.url),
            **store_env(sqlite_receiver.store_url),
        )
        first = tasks_test(env)
        try:
            assert wait_until(lambda: sandbox.state.accepted_count >= 800, timeout=120)
        finally:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
        assert first.returncode == -signal.SIGKILL
        killed_at = sandbox.state.accepted_count
        assert killed_at < 3000, "the campaign finished before the kill: nothing was tested"
        assert sandbox.wait_for_reports(60)  # reports echo x-apiheader: in-flight rows get their ids

        second = tasks_test(env)
        output, _ = second.communicate(timeout=300)
        assert second.returncode == 0, output[-3000:]
        assert sandbox.wait_for_reports(60)

        store = StatusStore(sqlite_receiver.store_url)
        rows = ledger_rows(store)
        accepted = [row for row in rows if row.state == "accepted"]
        unknown = [row for row in rows if row.state == "unknown"]
        # Nothing sent twice: every x-apiheader reached the vendor once at most.
        assert max(sandbox.state.accepted_by_header.values()) == 1
        # No id lost: every message the vendor took is in the ledger with its id.
        assert {row.message_id for row in accepted} == set(sandbox.state.final_by_id)
        assert len(rows) == 3000
        # What stays unknown is what was in flight or claimed next at the kill (at most 2 x the
        # DAG's 8 workers) and never reached the vendor.
        assert len(unknown) <= 2 * 8
        assert not {row.api_header for row in unknown} & set(sandbox.state.accepted_by_header)
        # The ledger and the XCom agree: the second try listed every id its answers gave, in input
        # order, and the reference after them stands for the rest (unknown, or reconciled since).
        value = xcom_return_value()
        assert [v for v in value if isinstance(v, str)] == [r.message_id for r in accepted if r.reconciled_at is None]
        assert store.summarize(parse_message_targets(value)).total == 3000  # the sensor sees every row


def xcom_return_value() -> list:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter(XComModel.dag_id == "pepipost_kill", XComModel.task_id == "send", XComModel.key == "return_value")
            .one()
        )
        return row.value
