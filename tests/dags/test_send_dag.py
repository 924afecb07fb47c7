"""SendWhatsAppMediaOperator in real dag.test() runs against the sandbox on 127.0.0.1."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.operators.xcom import task_from_ref
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from tests.helpers import run_dag

pytestmark = pytest.mark.dag


@pytest.fixture
def campaign(airflow_db, sqlite_url, pepipost_conn):
    """Start a sandbox with a scenario and point the connection (and the store) at it."""
    servers = []

    def start(scenario: Scenario | None = None, **extra) -> SandboxServer:
        server = SandboxServer(scenario or Scenario()).start()
        servers.append(server)
        pepipost_conn(server.url, sqlite_url, **extra)
        return server

    yield start
    for server in servers:
        server.stop()


def expected_payload(index: int, ds: str, header: str) -> dict:
    return {
        "recipient_whatsapp": f"91983{index:07d}",
        "message_type": "media",
        "recipient_type": "individual",
        "source": "sandbox-source",
        "x-apiheader": header,
        "type_media": [
            {
                "attachments": [
                    {"attachment_id": "media-invoice", "caption": f"Hi Customer {index}, your invoice of {ds}"}
                ]
            }
        ],
    }


def test_upstream_audience_is_sent_and_ids_reach_xcom_in_input_order(campaign, sqlite_url):
    sandbox = campaign()
    result = run_dag("pepipost_send_basic")
    assert result.state == "success", result.tasks
    ids = result.value("send")
    messages = result.value("send", "messages")
    assert len(ids) == 12 and ids == [m["message_id"] for m in messages]
    assert [m["row"] for m in messages] == list(range(12))
    assert result.value("send", "send_summary")["accepted"] == 12
    # Bodies identical in shape to the vendor page, captions filled per row and by Jinja.
    by_id = {a["message_id"]: a["body"] for a in sandbox.state.accepted}
    ds = result.run_id.split("__")[1][:10]
    for index, (message_id, row) in enumerate(zip(ids, messages, strict=True)):
        assert by_id[message_id] == {"message": [expected_payload(index, ds, row["x-apiheader"])]}
    # Every accepted message is in the ledger.
    assert StatusStore(sqlite_url).ledger_message_ids(TaskKey("pepipost_send_basic", result.run_id, "send")) == ids


@pytest.mark.parametrize("dag_id", ["pepipost_send_native_template", "pepipost_send_text_template"])
def test_recipients_from_a_templated_xcom_pull(campaign, dag_id):
    sandbox = campaign()
    result = run_dag(dag_id)
    assert result.state == "success", result.tasks
    assert len(result.value("send")) == 12 == sandbox.state.accepted_count


def test_a_bad_row_fails_the_task_before_anything_is_sent(campaign):
    sandbox = campaign()
    result = run_dag("pepipost_send_basic", bad_row=True)
    assert result.task_state("send") == "failed"
    assert sandbox.state.requests == 0


def test_mapped_sends(campaign):
    sandbox = campaign()
    result = run_dag("pepipost_send_mapped")
    assert result.state == "success", result.tasks
    per_index = [result.value("send", map_index=i) for i in range(3)]
    assert [len(ids) for ids in per_index] == [4, 4, 4]
    assert sandbox.state.accepted_count == 12
    headers = [m["x-apiheader"] for i in range(3) for m in result.value("send", "messages", map_index=i)]
    assert len(set(headers)) == 12  # the map index is part of each derived header


def test_rejections_within_the_allowed_ratio_are_reported_not_fatal(campaign):
    sandbox = campaign(Scenario(reject_ratio={"8003": 0.25, "8007": 0.1}))
    result = run_dag("pepipost_send_tolerant")
    assert result.state == "success", result.tasks
    messages = result.value("send", "messages")
    rejected = [m for m in messages if m["state"] == "rejected"]
    assert rejected and {m["error_code"] for m in rejected} <= {"8003", "8007"}
    assert all(m["message_id"] is None for m in rejected)
    assert len(result.value("send")) == 12 - len(rejected) == sandbox.state.accepted_count


def test_rejections_over_the_ratio_fail_the_task(campaign):
    campaign(Scenario(reject_ratio={"8003": 0.25}))
    result = run_dag("pepipost_send_basic")
    assert result.task_state("send") == "failed"


def test_a_bad_key_stops_the_job_at_once(campaign, pepipost_conn, sqlite_url):
    sandbox = campaign()
    import json

    from tests.conftest import connection_json

    conn = json.loads(connection_json(sandbox.url))
    conn["password"] = "wrong-key"
    import os

    os.environ["AIRFLOW_CONN_PEPIPOST_DEFAULT"] = json.dumps(conn)
    result = run_dag("pepipost_send_basic", audience_size=200)
    assert result.task_state("send") == "failed"
    assert sandbox.state.requests <= 4 * 2  # what was in flight when the first refusal came back
    assert sandbox.state.accepted_count == 0


def test_a_retried_task_sends_only_what_the_first_try_did_not(campaign):
    # The vendor goes down after 20 requests for long enough that the first try gives up.
    sandbox = campaign(Scenario(outage_after=20, outage_requests=12), max_retries=1, backoff_max=0.05)
    result = run_dag("pepipost_send_with_retries", audience_size=60)
    assert result.state == "success", result.tasks
    assert result.tries("send") >= 2
    assert sandbox.state.accepted_count == 60
    assert max(sandbox.state.accepted_by_header.values()) == 1  # nobody got the message twice
    ids = result.value("send")
    assert len(ids) == 60 == len(set(ids))
    assert result.value("send", "send_summary")["reused_from_earlier_try"] >= 20


def test_over_the_xcom_limit_the_return_value_is_a_ledger_reference(campaign, sqlite_url):
    campaign()
    result = run_dag("pepipost_send_ledger_ref")
    assert result.state == "success", result.tasks
    ref = result.value("send")
    task = task_from_ref(ref)
    sent_by = TaskKey("pepipost_send_ledger_ref", result.run_id, "send", -1)
    assert task == sent_by.of_campaign(f"pepipost_send_ledger_ref/{result.run_id}/send")  # the default campaign
    assert len(StatusStore(sqlite_url).ledger_message_ids(task)) == 12
    assert StatusStore(sqlite_url).summarize([task]).total == 12
    assert result.value("send", "messages") is None
