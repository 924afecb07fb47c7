"""Approvals on WhatsApp: which button stands for which option, whose tap counts, and what Airflow's
REST API says to an answer (a real HTTP server on 127.0.0.1 stands in for the api-server)."""

from __future__ import annotations

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Response

from airflow_provider_pepipost.approvals import ApprovalRequest, Verdict, approver_numbers, option_payloads
from airflow_provider_pepipost.webhook.airflow_api import AirflowApi, Outcome

APPROVER = "919900000001"
REQUEST = ApprovalRequest("m1", "campaigns", "run-1", "approve", -1, 1, {"APPROVE": "Approve", "REJECT": "Reject"},
                          frozenset({APPROVER}))  # fmt: skip


def test_each_option_gets_its_own_text_as_payload_unless_told_otherwise():
    assert option_payloads(["Approve", "Reject"]) == {"Approve": "Approve", "Reject": "Reject"}
    assert option_payloads(["Approve", "Reject"], {"Approve": " YES "}) == {"Approve": "YES", "Reject": "Reject"}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"Maybe": "M"}, r"\['Maybe'\] are not options"),
        ({"Approve": "Reject"}, "another option's payload"),
        ({"Approve": " "}, r"option_payloads\['Approve'\]"),
        ({"Approve": "x" * 257}, "longer than 256"),
    ],
)
def test_a_mapping_that_cannot_work_is_refused_naming_the_option(given, message):
    with pytest.raises(ValueError, match=message):
        option_payloads(["Approve", "Reject"], given)


def test_approvers_are_canonical_numbers_and_a_bad_one_is_named():
    assert approver_numbers(["+91 99000-00001", "0091 (990) 0000002"]) == {APPROVER, "919900000002"}
    with pytest.raises(ValueError, match=r"recipients\[1\]"):
        approver_numbers([APPROVER, "not a number"])
    with pytest.raises(ValueError, match="empty"):
        approver_numbers([])


@pytest.mark.parametrize(
    ("sender", "payload", "verdict", "option"),
    [
        (APPROVER, "APPROVE", Verdict.ANSWER, "Approve"),
        (APPROVER, " REJECT ", Verdict.ANSWER, "Reject"),
        ("919900000009", "APPROVE", Verdict.NOT_AN_APPROVER, None),  # anyone else
        (None, "APPROVE", Verdict.NOT_AN_APPROVER, None),
        (APPROVER, "Approve", Verdict.UNKNOWN_PAYLOAD, None),  # the option's text, not its payload
        (APPROVER, None, Verdict.UNKNOWN_PAYLOAD, None),
    ],
)
def test_only_an_approvers_tap_on_one_of_the_requests_buttons_answers(sender, payload, verdict, option):
    assert REQUEST.decide(sender, payload) == (verdict, option)


TASK_PATH = "/api/v2/dags/campaigns/dagRuns/run-1/taskInstances/approve/-1"
PATH = TASK_PATH + "/hitlDetails"


def token(httpserver: HTTPServer, value: str = "t1", state: str = "awaiting_input") -> None:
    """The token route, and the task instance in ``state``."""
    httpserver.expect_request("/auth/token", method="POST",
                              json={"username": "svc", "password": "pw"}).respond_with_json(
        {"access_token": value}, status=201)  # fmt: skip
    httpserver.expect_request(TASK_PATH, method="GET").respond_with_json({"state": state})


def test_an_answer_is_a_patch_with_the_option_as_the_service_identity(httpserver: HTTPServer):
    token(httpserver)
    httpserver.expect_request(PATH, method="PATCH", json={"chosen_options": ["Approve"], "params_input": {}},
                                      headers={"Authorization": "Bearer t1"}).respond_with_json({})  # fmt: skip
    api = AirflowApi(httpserver.url_for("/"), "svc", "pw")
    assert api.answer("campaigns", "run-1", "approve", -1, "Approve").outcome is Outcome.ANSWERED
    httpserver.check_assertions()


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(409, Outcome.ALREADY_ANSWERED), (400, Outcome.REFUSED), (403, Outcome.UNREACHABLE), (404, Outcome.REFUSED),
     (503, Outcome.UNREACHABLE), (500, Outcome.UNREACHABLE)],
)  # fmt: skip
def test_what_airflow_says_is_one_word(httpserver: HTTPServer, status, outcome):
    token(httpserver)
    httpserver.expect_request(PATH, method="PATCH").respond_with_json({"detail": "no"}, status=status)
    said = AirflowApi(httpserver.url_for("/"), "svc", "pw").answer("campaigns", "run-1", "approve", -1, "Approve")
    assert said.outcome is outcome
    assert "no" in said.detail or status < 300


def test_an_expired_token_is_fetched_again_once(httpserver: HTTPServer):
    tokens = iter(["old", "new"])
    httpserver.expect_request("/auth/token", method="POST").respond_with_handler(
        lambda request: Response(f'{{"access_token": "{next(tokens)}"}}', 201, content_type="application/json")
    )

    def patch(request):
        if request.headers.get("Authorization") == "Bearer new":
            return Response("{}", 200, content_type="application/json")
        return Response('{"detail": "expired"}', 401, content_type="application/json")

    httpserver.expect_request(TASK_PATH, method="GET").respond_with_json({"state": "awaiting_input"})
    httpserver.expect_request(PATH, method="PATCH").respond_with_handler(patch)
    api = AirflowApi(httpserver.url_for("/"), "svc", "pw")
    assert api.answer("campaigns", "run-1", "approve", -1, "Approve").outcome is Outcome.ANSWERED


def test_a_login_airflow_refuses_or_an_api_server_that_is_down_is_unreachable(httpserver: HTTPServer):
    httpserver.expect_request("/auth/token", method="POST").respond_with_json({"detail": "bad login"}, status=401)
    said = AirflowApi(httpserver.url_for("/"), "svc", "pw").answer("campaigns", "run-1", "approve", -1, "Approve")
    assert said.outcome is Outcome.UNREACHABLE and "401" in said.detail
    from tests.helpers import free_port

    down = AirflowApi(f"http://127.0.0.1:{free_port()}", "svc", "pw").answer("d", "r", "t", -1, "Approve")
    assert down.outcome is Outcome.UNREACHABLE and "ConnectError" in down.detail


@pytest.mark.parametrize(
    ("state", "outcome"),
    [("running", Outcome.NOT_YET), ("queued", Outcome.NOT_YET), (None, Outcome.NOT_YET),
     ("deferred", Outcome.ANSWERED), ("success", Outcome.CLOSED), ("failed", Outcome.CLOSED),
     ("skipped", Outcome.CLOSED)],
)  # fmt: skip
def test_a_task_is_answered_only_while_it_waits_for_its_answer(httpserver: HTTPServer, state, outcome):
    """Before it waits (Airflow 3.3.2 can fail a task answered while still running) the answer is
    held back; once it no longer waits, the answer is closed."""
    token(httpserver, state=state)
    httpserver.expect_request(PATH, method="PATCH").respond_with_json({})
    said = AirflowApi(httpserver.url_for("/"), "svc", "pw").answer("campaigns", "run-1", "approve", -1, "Approve")
    assert said.outcome is outcome
    patched = [request for request, _ in httpserver.log if request.method == "PATCH"]
    assert len(patched) == (1 if outcome is Outcome.ANSWERED else 0)


@pytest.mark.parametrize(
    ("host", "port", "conn_type", "schema", "url"),
    [
        ("airflow-api", 8080, "http", None, "http://airflow-api:8080"),
        ("airflow.example.com", None, "https", None, "https://airflow.example.com"),  # https never becomes http
        ("airflow.example.com", 443, "http", "https", "https://airflow.example.com:443"),
        ("https://svc:pw@airflow.example.com/", None, "http", None, "https://airflow.example.com"),  # no user:pass
        ("http://airflow.example.com/airflow", 8080, "http", None, "http://airflow.example.com:8080/airflow"),
        ("::1", 8080, "http", None, "http://[::1]:8080"),
        ("http://127.0.0.1:9000", 8080, "http", None, "http://127.0.0.1:9000"),  # the URL's own port wins
    ],
)
def test_the_api_servers_url_is_built_from_the_connection(host, port, conn_type, schema, url):
    from airflow_provider_pepipost.webhook.airflow_api import api_base_url

    assert api_base_url("pepipost_airflow_api", host, port, conn_type, schema) == url


@pytest.mark.parametrize("host", [None, "", "ftp://airflow"])
def test_a_connection_without_an_http_host_is_named(host):
    from airflow_provider_pepipost.webhook.airflow_api import api_base_url

    with pytest.raises(ValueError, match="pepipost_airflow_api"):
        api_base_url("pepipost_airflow_api", host, None, "http", None)
