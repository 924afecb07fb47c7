"""Approvals answered from a phone, under the real api-server, scheduler, dag-processor and triggerer.

`whatsapp_campaign_approval` is triggered by hand. Its `ApprovalOperator` asks the approver on
WhatsApp (the sandbox receives the request template); a tap by another number changes nothing; the
approver's tap on "Approve" reaches `pepipost-webhook`, which answers the task through Airflow's
REST API as the service user `svc`, and the campaign is sent; a second tap after the answer changes
nothing (Airflow's 409 for two taps at once is in the unit tests). A second run is rejected from
the phone: the campaign is skipped. A third DAG with a 20-second window gets no answer: the
operator's default ("Reject") skips the campaign.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest
import requests
import sqlalchemy

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.store import StatusStore
from tests.conftest import connection_json, store_env
from tests.helpers import free_port
from tests.system.stack import EXAMPLES_FOLDER, AirflowStack, Sandbox, StackFailure, start_receiver

pytestmark = pytest.mark.system

DAG, TIMEOUT_DAG = "whatsapp_campaign_approval", "pepipost_approval_timeout"
TOKEN = "system-test-webhook-token"
APPROVER, STRANGER = "919900000001", "919800000077"
SVC_PASSWORD = "service-password-for-the-test"


def test_a_tap_on_the_phone_answers_the_approval_and_nothing_else_does(tmp_path, fresh_database):
    dags = tmp_path / "dags"
    dags.mkdir()
    shutil.copy(EXAMPLES_FOLDER / f"{DAG}.py", dags)
    shutil.copy(EXAMPLES_FOLDER.parent / "tests" / "system" / "dag_files" / f"{TIMEOUT_DAG}.py", dags)
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"svc": SVC_PASSWORD}))
    store_url = fresh_database()
    sandbox = Sandbox()
    env = {
        "AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url),
        "PEPIPOST_WEBHOOK_TOKEN": TOKEN,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "svc:op",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        **store_env(store_url),
    }
    stack = AirflowStack(tmp_path, fresh_database(), env, dags_folder=dags)
    # The receiver's service identity: the api-server, as the user svc (an "op": it may answer).
    identity = {"conn_type": "http", "host": "127.0.0.1", "port": stack.api_port, "login": "svc",
                "password": SVC_PASSWORD}  # fmt: skip
    stack.env["AIRFLOW_CONN_PEPIPOST_AIRFLOW_API"] = json.dumps(identity)
    store = StatusStore(store_url)
    try:
        receiver = start_receiver(stack.procs, "receiver", free_port())
        sandbox.start(stack.procs, receiver, {"latency": 0.01, "status_delay": 0.2, "final_mix": {"read": 1.0}})
        stack.start([DAG, TIMEOUT_DAG])

        # Run 1: approved from the phone.
        stack.trigger(DAG, "manual-approve")
        request_id = wait_for_request(stack, store, "manual-approve")
        reply(sandbox, STRANGER, "Approve", request_id)  # not an approver: nothing changes
        wait_for_answers(stack, store, "manual-approve", 1)
        waiting = lambda: task_state(stack, DAG, "manual-approve", "approve_campaign") == "awaiting_input"  # noqa: E731
        stack.wait(waiting, 60, "the approval task never waited for its answer")
        tap(sandbox, APPROVER, "Approve")
        stack.wait_for_runs([DAG], 1)
        assert task_state(stack, DAG, "manual-approve", "send_campaign") == "success"
        assert campaign_messages(sandbox) == 20
        tap(sandbox, APPROVER, "Reject")  # after the answer (the task no longer waits): nothing changes
        answered = wait_for_answers(stack, store, "manual-approve", 3)
        assert [(a.verdict, a.option, a.outcome) for a in answered] == [
            ("not_an_approver", None, None), ("answer", "Approve", "answered"), ("answer", "Reject", "closed")
        ]  # fmt: skip
        assert answered[1].answered_by == "9199******01"
        assert hitl_detail(stack, "manual-approve")["chosen_options"] == ["Approve"]

        # Run 2: rejected from the phone: the campaign is skipped.
        stack.trigger(DAG, "manual-reject")
        wait_for_request(stack, store, "manual-reject")
        tap(sandbox, APPROVER, "Reject")
        stack.wait_for_runs([DAG], 2)
        assert task_state(stack, DAG, "manual-reject", "send_campaign") == "skipped"
        # The approver got each run's request and, once each answer was taken, its confirmation.
        stack.wait(
            lambda: messages_to(sandbox, APPROVER) == 4, 30, "the approver did not get 2 requests and 2 confirmations"
        )

        # Run 3: nobody answers within 20 s: the default, Reject, skips the campaign.
        stack.trigger(TIMEOUT_DAG, "manual-timeout")
        stack.wait_for_runs([TIMEOUT_DAG], 1, timeout=240)
        assert task_state(stack, TIMEOUT_DAG, "manual-timeout", "send_campaign") == "skipped"
        assert campaign_messages(sandbox) == 20  # runs 2 and 3 sent no campaign
        stack.procs.alive()
    finally:
        stack.stop()
        store.engine.dispose()


def wait_for_request(stack: AirflowStack, store: StatusStore, run_id: str, timeout: float = 120) -> str:
    """The request message the approver got for this run (once the notifier recorded it)."""
    requests_ = schema.approval_requests
    query = sqlalchemy.select(requests_.c.message_id).where(requests_.c.run_id == run_id)
    found: list[str] = []

    def recorded() -> bool:
        with store.engine.connect() as conn:
            found[:] = conn.execute(query).scalars().all()
        return bool(found)

    stack.wait(recorded, timeout, f"no approval request was sent for {run_id}")
    return found[0]


def wait_for_answers(stack: AirflowStack, store: StatusStore, run_id: str, count: int, timeout: float = 60) -> list:
    found: list[Any] = []

    def handled() -> bool:
        found[:] = store.approval_answers(DAG, run_id, "approve_campaign")
        return len(found) >= count

    stack.wait(handled, timeout, f"{count} taps on {run_id}'s request were not handled")
    return found


def tap(sandbox: Sandbox, number: str, payload: str) -> None:
    answer = requests.post(f"{sandbox.url}/_sandbox/tap", json={"from": number, "payload": payload}, timeout=10)
    if answer.status_code != 200:
        raise StackFailure(f"the sandbox refused the tap: {answer.status_code} {answer.text}")


def reply(sandbox: Sandbox, number: str, payload: str, context_message_id: str) -> None:
    body = {"from": number, "button": {"payload": payload, "text": payload}, "context_message_id": context_message_id}
    answer = requests.post(f"{sandbox.url}/_sandbox/reply", json=body, timeout=10)
    if answer.status_code != 200:
        raise StackFailure(f"the sandbox refused the reply: {answer.status_code} {answer.text}")


def messages_to(sandbox: Sandbox, number: str) -> int:
    return requests.get(f"{sandbox.url}/_sandbox/recipients/{number}", timeout=5).json()["accepted"]


def campaign_messages(sandbox: Sandbox) -> int:
    """Messages the sandbox accepted for the campaign's audience (the example's 20 numbers)."""
    audience = [f"9195{index:08d}" for index in range(20)]
    return sum(messages_to(sandbox, number) for number in audience)


def task_state(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str | None:
    states = [ti["state"] for ti in stack.task_instances(dag_id, run_id) if ti["task_id"] == task_id]
    return states[0] if states else None


def hitl_detail(stack: AirflowStack, run_id: str) -> dict[str, Any]:
    query = sqlalchemy.text(
        "SELECT h.chosen_options FROM hitl_detail h JOIN task_instance t ON t.id = h.ti_id "
        "WHERE t.dag_id = :dag AND t.run_id = :run AND t.task_id = 'approve_campaign'"
    )
    with stack.metadata.connect() as conn:
        chosen = conn.execute(query, {"dag": DAG, "run": run_id}).scalar_one()
    return {"chosen_options": json.loads(chosen) if isinstance(chosen, str) else chosen}
