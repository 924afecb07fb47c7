"""Sending under injected faults: nothing sent twice, nothing lost, whole-job errors stop at once.

Each test sends 2,000 messages through the real operator to the sandbox on 127.0.0.1; the run id
is fixed, so the sandbox's seeded faults fall on the same messages every run.
"""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.errors import CampaignError
from airflow_provider_pepipost.operators.xcom import parse_message_targets, task_from_ref
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.model import evaluate
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import StandInTaskInstance, run_operator

COUNT = 2000
AUDIENCE = [f"9198{index:08d}" for index in range(COUNT)]
TASK = TaskKey("faults", "faults-run", "send")


@pytest.fixture
def faulty(sqlite_url, pepipost_conn):
    servers = []

    def start(scenario: Scenario, webhook=None, media_ids=None, **extra) -> SandboxServer:
        headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
        server = SandboxServer(scenario, webhook_url=webhook, webhook_headers=headers, media_ids=media_ids).start()
        servers.append(server)
        pepipost_conn(server.url, sqlite_url, **{"max_retries": 8, "backoff_max": 0.05, **extra})
        return server

    yield start
    for server in servers:
        server.stop()


def assert_each_accepted_once(sandbox: SandboxServer, ids: list[str], store_url: str) -> None:
    assert sandbox.state.accepted_count == COUNT
    assert max(sandbox.state.accepted_by_header.values()) == 1  # nobody got a message twice
    assert len(ids) == COUNT == len(set(ids))
    assert set(ids) == set(sandbox.state.final_by_id)  # every id the vendor gave is in XCom...
    assert StatusStore(store_url).ledger_message_ids(TASK) == ids  # ...and in the ledger, in order


@pytest.mark.parametrize(
    ("scenario", "fault"),
    [
        (Scenario(rate_429=0.3, retry_after=0.02), "429"),
        (Scenario(rate_429=0.3, retry_after=None), "429"),
        (Scenario(rate_5xx=0.25), "500"),
        (Scenario(rate_8005=0.25), "8005"),
    ],
    ids=["429-retry-after", "429-no-retry-after", "5xx", "8005"],
)
def test_transient_faults_are_retried_and_nothing_is_sent_twice(faulty, sqlite_url, scenario, fault):
    sandbox = faulty(scenario)
    ids, ti = run_operator(AUDIENCE, max_workers=16)
    assert not isinstance(ids, Exception), ids
    assert sandbox.state.responses[fault] > 100  # the fault really happened, many times
    assert_each_accepted_once(sandbox, ids, sqlite_url)
    assert ti.xcom["send_summary"]["accepted"] == COUNT


def test_a_vendor_outage_mid_campaign_is_outlasted(faulty, sqlite_url):
    sandbox = faulty(Scenario(outage_after=500, outage_seconds=1.0), max_retries=12, backoff_max=0.3)
    ids, _ = run_operator(AUDIENCE, max_workers=16)
    assert not isinstance(ids, Exception), ids
    assert sandbox.state.responses["503"] > 0
    assert_each_accepted_once(sandbox, ids, sqlite_url)


def test_dropped_connections_are_unknown_and_never_resent(faulty):
    sandbox = faulty(Scenario(rate_drop=0.05))
    ids, ti = run_operator(AUDIENCE, max_workers=16)
    unknown = [m for m in ti.xcom["messages"] if m["state"] == "unknown"]
    drops = sandbox.state.responses["drop"]
    assert drops > 50 and len(unknown) == drops
    for row in unknown:
        assert sandbox.state.attempts[row["x-apiheader"]] == 1  # one try, never a second
        assert row["x-apiheader"] not in sandbox.state.accepted_by_header
    # The accepted ids, then a reference that lets the sensor see the unknown rows too.
    *accepted, unknown_ref = ids
    assert len(accepted) == COUNT - drops == sandbox.state.accepted_count
    assert task_from_ref(unknown_ref).only_unknown and task_from_ref(unknown_ref).campaign
    assert max(sandbox.state.accepted_by_header.values()) == 1


def test_read_timeouts_are_unknown_then_reconciled_from_v2_reports(faulty, sqlite_receiver):
    scenario = Scenario(rate_slow=0.03, slow_seconds=1.5, status_delay=0.2, final_mix={"delivered": 1.0})
    sandbox = faulty(scenario, webhook=sqlite_receiver.webhook_url, timeout=0.5)
    ids, ti = run_operator(AUDIENCE, max_workers=32)
    unknown = [m for m in ti.xcom["messages"] if m["state"] == "unknown"]
    *accepted, unknown_ref = ids
    assert len(unknown) > 20 and len(accepted) == COUNT - len(unknown)
    assert task_from_ref(unknown_ref).only_unknown
    assert sandbox.state.accepted_count == COUNT  # the vendor did take the slow ones
    assert max(sandbox.state.attempts[m["x-apiheader"]] for m in unknown) == 1  # and we never resent them
    assert sandbox.wait_for_reports(60)
    store = StatusStore(sqlite_receiver.store_url)
    summary = store.summarize_task(TASK)
    assert summary.unknown == 0 and summary.total == COUNT  # every unknown row found its message id
    assert set(store.ledger_message_ids(TASK)) == set(sandbox.state.final_by_id)
    # What the sensor reads from the XCom covers every row, each once, whatever became of it.
    seen = store.summarize(parse_message_targets(ids))
    assert seen.total == COUNT and seen.unknown == 0 and seen.pending + sum(seen.counts.values()) == COUNT


@pytest.mark.parametrize("policy", ["wait", "fail"])
def test_the_sensor_sees_unknown_rows_of_a_listed_send(faulty, sqlite_url, policy):
    """Below xcom_ids_limit the ids are listed; the rows without an id must still reach the sensor."""
    faulty(Scenario(rate_drop=0.05))
    ids, ti = run_operator(AUDIENCE, max_workers=16, max_unknown_ratio=0.2)
    unknown = sum(m["state"] == "unknown" for m in ti.xcom["messages"])
    assert unknown > 50
    summary = StatusStore(sqlite_url).summarize(parse_message_targets(ids))
    assert summary.total == COUNT and summary.unknown == unknown
    verdict = evaluate(summary, "sent", 0.5, "unreachable", policy)
    if policy == "fail":
        assert verdict.failed and "unknown" in verdict.reason
    else:
        assert not verdict.done  # it waits for them to be reconciled


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"media_ids": {"some-other-media"}}, "8008"),
        ({"scenario": Scenario(failures_with_http_200=True), "media_ids": {"x"}}, "8008"),
        ({"password": "wrong-key"}, "8004"),
    ],
    ids=["bad-media", "bad-media-http-200", "bad-key"],
)
def test_whole_job_failures_stop_at_once(faulty, sqlite_url, pepipost_conn, setup, code):
    sandbox = faulty(setup.get("scenario", Scenario()), media_ids=setup.get("media_ids"))
    if "password" in setup:
        import json
        import os

        conn = json.loads(os.environ["AIRFLOW_CONN_PEPIPOST_DEFAULT"])
        conn["password"] = setup["password"]
        os.environ["AIRFLOW_CONN_PEPIPOST_DEFAULT"] = json.dumps(conn)
    error, ti = run_operator(AUDIENCE, max_workers=16)
    assert isinstance(error, AirflowFailException)  # no Airflow retry can mend it
    assert f"Pepipost error {code}" in str(error)
    assert sandbox.state.requests <= 2 * 16  # what was already in flight, nothing after
    assert sandbox.state.accepted_count == 0
    assert ti.xcom["send_summary"]["not_sent"] >= COUNT - 2 * 16


def test_a_retry_after_a_job_failure_sends_only_the_rest(faulty, sqlite_url, pepipost_conn):
    sandbox = faulty(Scenario(outage_after=700, outage_requests=40), max_retries=1)
    first, _ = run_operator(AUDIENCE, max_workers=16)
    assert isinstance(first, CampaignError)
    accepted_first = sandbox.state.accepted_count
    assert 0 < accepted_first < COUNT
    pepipost_conn(sandbox.url, sqlite_url, max_retries=8, backoff_max=0.05)  # ride out the rest of it
    ids, ti = run_operator(AUDIENCE, StandInTaskInstance(), max_workers=16)  # the task's next try
    assert not isinstance(ids, Exception), ids
    assert ti.xcom["send_summary"]["reused_from_earlier_try"] == accepted_first
    assert_each_accepted_once(sandbox, ids, sqlite_url)
