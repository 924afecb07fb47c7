"""Send, then wait on real delivery reports: sandbox -> webhook receiver -> store -> sensor, in every mode."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status.model import DeliverySummary
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import run_dag

pytestmark = pytest.mark.dag


@pytest.fixture
def loop(airflow_db, receiver, store_url, pepipost_conn):
    """The whole status loop: the sandbox posts its reports to a real receiver writing to ``store_url``."""
    servers = []

    def start(scenario: Scenario, with_reports: bool = True) -> SandboxServer:
        server = SandboxServer(
            scenario,
            webhook_url=receiver.webhook_url if with_reports else None,
            webhook_headers={"X-Pepipost-Token": WEBHOOK_TOKEN},
        ).start()
        servers.append(server)
        pepipost_conn(server.url, store_url)
        return server

    yield start
    for server in servers:
        server.stop()


# Every message gets delivered: the statuses' order, timing and duplicates vary, the outcome not.
MIXED = {"read": 0.5, "delivered": 0.5}


@pytest.mark.parametrize("dag_id", ["pepipost_status_poke", "pepipost_status_reschedule", "pepipost_status_deferrable"])
def test_the_sensor_succeeds_once_reports_reach_the_target(loop, dag_id):
    sandbox = loop(Scenario(final_mix=MIXED, status_delay=0.4, duplicate_ratio=0.2, out_of_order_ratio=0.3))
    result = run_dag(dag_id)
    assert result.state == "success", result.tasks
    summary = DeliverySummary.from_dict(result.value("wait"))
    assert summary.total == 20
    assert summary.reached("delivered") >= 16  # min_success_ratio 0.8
    # Only what the sandbox decided could have been reported: nothing was invented.
    will_deliver = sum(1 for status in sandbox.state.final_by_id.values() if status in ("delivered", "read"))
    assert summary.reached("delivered") <= will_deliver
    assert sandbox.reports.events_posted > 0


def test_every_message_read(loop):
    loop(Scenario(final_mix={"read": 1.0}, status_delay=0.1, webhook_version=1))
    result = run_dag("pepipost_status_all_read")
    assert result.state == "success", result.tasks
    assert result.value("wait")["counts"] == {"read": 20}


def test_too_many_failures_fail_the_sensor_with_the_ids_and_remarks(loop):
    sandbox = loop(Scenario(final_mix={"failed": 0.5, "read": 0.5}, status_delay=0.1))
    result = run_dag("pepipost_status_deferrable")
    assert result.task_state("wait") == "failed"
    assert result.tries("wait") == 1  # a delivery failure is not retried
    failed_ids = {mid for mid, status in sandbox.state.final_by_id.items() if status == "failed"}
    assert len(failed_ids) > 4


def test_the_sensor_reads_a_ledger_reference(loop):
    loop(Scenario(final_mix={"delivered": 1.0}, status_delay=0.1))
    result = run_dag("pepipost_status_ledger_ref")
    assert result.state == "success", result.tasks
    assert "pepipost_ledger" in result.value("send")
    assert result.value("wait")["total"] == 20


def test_the_sensor_times_out_when_no_report_comes(loop):
    loop(Scenario(), with_reports=False)
    result = run_dag("pepipost_status_short_timeout")
    assert result.task_state("wait") == "failed"
