"""A tap on an approval request answers the task: the receiver's responder on a real store (SQLite
and PostgreSQL) and a stand-in of Airflow's REST API on 127.0.0.1. Only an approver's tap on one
of the request's buttons, for the try that asked, answers, and only once, however many receivers
share the store; anything else changes nothing; a tap Airflow cannot take yet stays pending."""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from airflow_provider_pepipost.approvals import Confirmation
from airflow_provider_pepipost.status.inbound import ButtonReply, TextReply
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook import approvals as responder_module
from airflow_provider_pepipost.webhook.app import create_app
from airflow_provider_pepipost.webhook.approvals import ApprovalResponder
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import ServedApp

APPROVER, SECOND, STRANGER = "919900000001", "919900000002", "919800000077"
TASK = ("campaigns", "run-1", "approve", -1, 1)
TASK_PATH = "/api/v2/dags/campaigns/dagRuns/run-1/taskInstances/approve/-1"
OPTIONS = {"Approve": "Approve", "Reject": "Reject"}


class StandInAirflow:
    """The api-server's token, task-instance and HITL routes; 409 once the task is answered."""

    def __init__(self, httpserver: HTTPServer) -> None:
        self.answers: list[list[str]] = []
        self.state, self.try_number, self.status = "awaiting_input", 1, 200
        self.patching = threading.Event()  # set while a PATCH is in the stand-in
        self.hold = threading.Event()  # a PATCH waits for it
        self.hold.set()
        httpserver.expect_request("/auth/token", method="POST").respond_with_json({"access_token": "t"}, status=201)
        httpserver.expect_request(TASK_PATH, method="GET").respond_with_handler(self.task)
        httpserver.expect_request(TASK_PATH + "/hitlDetails", method="PATCH").respond_with_handler(self.patch)

    def task(self, request: Request) -> Response:
        if self.status != 200:
            return Response(json.dumps({"detail": "no"}), self.status, content_type="application/json")
        body = {"state": self.state, "try_number": self.try_number}
        return Response(json.dumps(body), 200, content_type="application/json")

    def patch(self, request: Request) -> Response:
        self.patching.set()
        self.hold.wait(10)
        if request.headers.get("Authorization") != "Bearer t":
            return Response('{"detail": "no token"}', 401, content_type="application/json")
        if self.answers:
            return Response('{"detail": "already answered"}', 409, content_type="application/json")
        self.answers.append(json.loads(request.data)["chosen_options"])
        return Response("{}", 200, content_type="application/json")


@pytest.fixture
def airflow_api(httpserver: HTTPServer, monkeypatch) -> StandInAirflow:
    connection = {"conn_type": "http", "host": "127.0.0.1", "port": httpserver.port, "login": "svc", "password": "pw"}
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_AIRFLOW_API", json.dumps(connection))
    monkeypatch.setattr(responder_module, "SETTLE", 0.0)
    return StandInAirflow(httpserver)


@pytest.fixture
def store(store_url: str) -> StatusStore:
    opened = StatusStore(store_url)
    opened.record_approval_request("req-1", TASK, OPTIONS, {APPROVER, SECOND})
    return opened


def tap(store: StatusStore, number: str, payload: str, request_message: str = "req-1", n: int = 0) -> None:
    """A button reply, filed as the receiver files one."""
    raw = json.dumps({"from": number, "payload": payload, "n": n})
    store.ingest([], inbound=[ButtonReply("button", number, request_message, raw, payload=payload, text=payload)])


def ended(store: StatusStore) -> list[tuple]:
    return [(a.verdict, a.option, a.outcome, a.answered_by) for a in store.approval_answers(*TASK[:4])]


def test_only_an_approvers_tap_on_a_button_of_the_request_answers(store, airflow_api):
    responder = ApprovalResponder(lambda: store)
    tap(store, STRANGER, "Approve")  # not an approver
    tap(store, APPROVER, "Maybe")  # a button the request never had
    tap(store, APPROVER, "Approve")
    assert responder.handle_pending() == (3, 0)
    assert ended(store) == [("not_an_approver", None, None, "9198******77"), ("unknown_payload", None, None,
                            "9199******01"), ("answer", "Approve", "answered", "9199******01")]  # fmt: skip
    assert airflow_api.answers == [["Approve"]]
    assert responder.handle_pending() == (0, 0)  # handled once


def test_two_taps_at_once_the_second_meets_409_and_changes_nothing(store, airflow_api):
    responder = ApprovalResponder(lambda: store)
    tap(store, APPROVER, "Approve")
    tap(store, SECOND, "Reject")  # both while the task still waits
    responder.handle_pending()
    assert [row[1:3] for row in ended(store)] == [("Approve", "answered"), ("Reject", "already_answered")]
    assert airflow_api.answers == [["Approve"]]


def test_a_tap_is_answered_once_when_two_receivers_share_the_store(store, airflow_api):
    first, second = ApprovalResponder(lambda: store), ApprovalResponder(lambda: store)
    tap(store, APPROVER, "Approve")
    airflow_api.hold.clear()
    running = threading.Thread(target=first.handle_pending)
    running.start()
    assert airflow_api.patching.wait(10), "the first receiver never asked Airflow"
    assert second.handle_pending() == (0, 0)  # the first one holds the tap: nothing to do
    airflow_api.hold.set()
    running.join(10)
    assert airflow_api.answers == [["Approve"]] and [row[2] for row in ended(store)] == ["answered"]


def test_a_tap_stays_pending_while_airflow_cannot_take_it(store, airflow_api, monkeypatch):
    responder = ApprovalResponder(lambda: store)
    tap(store, APPROVER, "Approve")
    for status in (503, 403):  # the api-server down; the service user's permissions not yet given
        airflow_api.status = status
        assert responder.handle_pending() == (0, 0)
        assert ended(store) == [] and len(store.pending_approval_taps()) == 1
    airflow_api.status = 200
    airflow_api.state = "running"  # the notifier has sent the request; the task is not parked yet
    assert responder.handle_pending() == (0, 1)  # looked at again soon
    airflow_api.state = "awaiting_input"
    assert responder.handle_pending() == (1, 0) and airflow_api.answers == [["Approve"]]
    monkeypatch.setattr(responder_module, "MAX_PENDING", 0.0)
    tap(store, SECOND, "Approve", n=1)
    airflow_api.status = 503
    responder.handle_pending()  # never taken: given up
    assert ended(store)[-1][1:3] == ("Approve", "expired")


@pytest.mark.parametrize(("state", "try_number"), [("success", 1), ("awaiting_input", 2), ("failed", 1)])
def test_a_tap_for_a_task_that_no_longer_waits_or_on_an_earlier_try_is_closed(store, airflow_api, state, try_number):
    airflow_api.state, airflow_api.try_number = state, try_number
    tap(store, APPROVER, "Approve")
    ApprovalResponder(lambda: store).handle_pending()
    assert ended(store) == [("answer", "Approve", "closed", "9199******01")] and airflow_api.answers == []


def test_a_task_is_answered_only_once_it_has_been_seen_waiting_for_a_while(store, airflow_api, monkeypatch):
    """Airflow 3.3.2 fails a task resumed before its scheduler took in that it parked."""
    monkeypatch.setattr(responder_module, "SETTLE", 0.5)
    responder = ApprovalResponder(lambda: store)
    tap(store, APPROVER, "Approve")
    assert responder.handle_pending() == (0, 1)
    time.sleep(0.5)
    assert responder.handle_pending() == (1, 0) and airflow_api.answers == [["Approve"]]


def test_a_plain_text_answer_the_vendor_sent_before_buttons_counts_as_the_tap(store, airflow_api):
    """Before 2024-09-10 a quick-reply tap came as a text message holding the button's text."""
    store.ingest([], inbound=[TextReply("text", APPROVER, "req-1", json.dumps({"legacy": 1}), text="Reject")])
    ApprovalResponder(lambda: store).handle_pending()
    assert airflow_api.answers == [["Reject"]]


def test_the_approver_is_told_the_answer_was_taken(store_url, airflow_api, sandbox, pepipost_conn):
    pepipost_conn(sandbox.url)
    store = StatusStore(store_url)
    confirmation = Confirmation("airflow_approval_recorded", "en", "pepipost_default")
    store.record_approval_request("req-9", TASK, OPTIONS, {APPROVER}, confirmation)
    tap(store, APPROVER, "Approve", request_message="req-9")
    ApprovalResponder(lambda: store).handle_pending()
    (sent,) = [accepted["body"]["message"][0] for accepted in sandbox.state.accepted]
    assert sent["recipient_whatsapp"] == APPROVER
    assert sent["type_template"][0] == {"name": "airflow_approval_recorded", "attributes": ["Approve"],
                                        "language": {"locale": "en"}}  # fmt: skip


def test_the_receiver_answers_a_tap_when_it_stores_it_and_one_left_by_a_restart_when_it_starts(
    store_url, airflow_api, monkeypatch
):
    monkeypatch.setattr(responder_module, "INTERVAL", 30.0)  # no periodic look within the test
    store = StatusStore(store_url)
    store.record_approval_request("req-1", TASK, OPTIONS, {APPROVER, SECOND})
    tap(store, SECOND, "Reject")  # stored while no receiver ran
    with ServedApp(create_app(store_url, WEBHOOK_TOKEN)) as receiver:  # starts: answers the pending tap
        assert [row[1:3] for row in settled(store, 1)] == [("Reject", "answered")]
        item = {"message_id": "in-a", "from": f"+{APPROVER}", "received_at": "1796550000", "message_type": "button",
                "text_type": {"payload": "Approve", "text": "Approve"},
                "context": {"ncmessage_id": "req-1"}}  # fmt: skip
        answer = requests.post(f"{receiver.url}/pepipost/webhook", json={"incoming_message": [item]},
                               headers={"X-Pepipost-Token": WEBHOOK_TOKEN}, timeout=10)  # fmt: skip
        assert answer.status_code == 200, answer.text
        handled = settled(store, 2)
    assert [row[1:3] for row in handled] == [("Reject", "answered"), ("Approve", "already_answered")]


def settled(store: StatusStore, count: int, timeout: float = 10.0) -> list[tuple]:
    """Until ``count`` taps have their end (not a claim in flight)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [row for row in ended(store) if row[2] != "submitting"]
        if len(found) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"{count} taps not handled in {timeout:g}s: {ended(store)}")
