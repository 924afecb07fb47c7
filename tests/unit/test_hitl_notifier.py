"""WhatsAppHITLNotifier against the sandbox on 127.0.0.1: the request goes to each approver with the
task's buttons, and the store records which message asks for which task instance, of whom."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from airflow_provider_pepipost.errors import PepipostConfigError, PepipostError
from airflow_provider_pepipost.notifications.whatsapp import WhatsAppHITLNotifier
from airflow_provider_pepipost.status.store import StatusStore

APPROVERS = ["+91 99000 00001", "0091 9900000002"]


def context(options: list[str] | None = ("Approve", "Reject")) -> dict:
    task = SimpleNamespace(task_id="approve", options=list(options or []), subject="Send it?", body="20 customers")
    ti = SimpleNamespace(dag_id="campaigns", run_id="run-1", task_id="approve", map_index=None, try_number=2,
                         log_url="http://x/log")  # fmt: skip
    return {"task": task, "ti": ti}


def notifier(**kwargs) -> WhatsAppHITLNotifier:
    kwargs.setdefault("recipients", APPROVERS)
    made = WhatsAppHITLNotifier(template_name="airflow_approval_request", **kwargs)
    made.attributes = ["Send it?", "20 customers", "http://x/log"]  # as BaseNotifier renders them
    return made


def test_each_approver_is_asked_and_the_request_is_recorded(sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    notifier(option_payloads={"Approve": "Approve"}).notify(context())
    bodies = [accepted["body"]["message"][0] for accepted in sandbox.state.accepted]
    assert sorted(body["recipient_whatsapp"] for body in bodies) == ["919900000001", "919900000002"]
    assert {body["type_template"][0]["name"] for body in bodies} == {"airflow_approval_request"}
    taps = StatusStore(sqlite_url).pending_approval_taps()
    assert taps == []  # nobody tapped yet
    from airflow_provider_pepipost.status import schema

    store = StatusStore(sqlite_url)
    with store.engine.connect() as conn:
        rows = conn.execute(schema.approval_requests.select()).mappings().all()
    assert sorted(row["message_id"] for row in rows) == sorted(a["message_id"] for a in sandbox.state.accepted)
    assert {(row["dag_id"], row["run_id"], row["task_id"], row["map_index"], row["try_number"]) for row in rows} == {
        ("campaigns", "run-1", "approve", -1, 2)}  # fmt: skip
    assert rows[0]["options"] == '{"Approve": "Approve", "Reject": "Reject"}'


def test_an_approver_who_said_stop_is_not_asked_and_nobody_asked_fails_the_task(sandbox, sqlite_url, pepipost_conn):
    pepipost_conn(sandbox.url, sqlite_url)
    StatusStore(sqlite_url).record_opt_outs(["919900000001", "919900000002"], via="reply", detail="STOP")
    with pytest.raises(PepipostError, match="NOT sent"):
        notifier().notify(context())
    assert sandbox.state.accepted_count == 0


def test_a_task_without_options_or_a_bad_mapping_is_refused_before_anything_is_sent(sandbox, sqlite_url,
                                                                                     pepipost_conn):  # fmt: skip
    pepipost_conn(sandbox.url, sqlite_url)
    with pytest.raises(PepipostConfigError, match="has no options"):
        notifier().notify(context(options=None))
    with pytest.raises(ValueError, match="not options of the task"):
        notifier(option_payloads={"Maybe": "M"}).notify(context())
    with pytest.raises(ValueError, match=r"recipients\[0\]"):
        notifier(recipients=["nope"]).notify(context())
    assert sandbox.state.accepted_count == 0
