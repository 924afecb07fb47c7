"""The consent API end to end on loopback: the hook's request bodies against the vendor's page,
the sandbox's validation of every 8006 case the page lists, and the answers mapped back."""

from __future__ import annotations

import json

import pytest
import requests
from pytest_httpserver import HTTPServer

from airflow_provider_pepipost.consent import ConsentDefaults, ConsentRow, build_consent_row, consent_body
from airflow_provider_pepipost.errors import MessageValidationError, PepipostApiError
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.sandbox import DEFAULT_API_KEY, SandboxServer, Scenario

GOOD = {"recipient": "919869566055", "source": "WEB", "user_agent": "Mozilla/5.0", "ip": "203.0.113.7"}


def manage(sandbox: SandboxServer, body: object, key: str = DEFAULT_API_KEY) -> requests.Response:
    return requests.post(
        f"{sandbox.url}/api/v2/consent/manage/", data=json.dumps(body), headers={"Authorization": f"Bearer {key}"},
        timeout=5,
    )  # fmt: skip


def test_the_manage_body_is_the_vendors_example_exactly(httpserver: HTTPServer, pepipost_conn):
    expected = {"type": "optin", "recipients": [GOOD]}
    httpserver.expect_oneshot_request("/api/v2/consent/manage/", method="POST", json=expected).respond_with_json(
        {"status": "success", "message": "Optin successfully added."}
    )
    pepipost_conn(httpserver.url_for(""))
    answer = PepipostHook().manage_consent("optin", [GOOD])
    assert answer == {"status": "success", "message": "Optin successfully added."}
    request, _ = httpserver.log[0]
    assert request.headers["Authorization"] == f"Bearer {DEFAULT_API_KEY}"
    assert json.loads(request.data) == expected  # no extra key, nothing left out


def test_optional_fields_are_left_out_not_sent_empty():
    row, problems = build_consent_row("+91 98695-66055", ConsentDefaults(source="WEB"), 0)
    assert problems == [] and row == ConsentRow("919869566055", "WEB")
    assert consent_body("optout", [row]) == {
        "type": "optout",
        "recipients": [{"recipient": "919869566055", "source": "WEB"}],
    }


def recipient(**change: str) -> dict[str, object]:
    return {"type": "optin", "recipients": [{**GOOD, **change}]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"recipients": [GOOD]}, "type is required."),
        ({"type": "subscribe", "recipients": [GOOD]}, "type is invalid. type must be optin/optout."),
        ({"type": "optin"}, "recipients is required."),
        (recipient(source=""), "source cannot be empty."),
        (recipient(source="S" * 26), "source value cannot be greater than 25 characters."),
        (recipient(recipient="91986956605a"), "Invalid recipient. Only numeric values allowed."),
        (recipient(recipient="986956605"), "recipient value cannot be less than 10 digits."),
        (recipient(recipient="9" * 16), "recipient value cannot be greater than 15 digits."),
    ],
)
def test_the_sandbox_refuses_every_8006_case_of_the_page(sandbox, body, message):
    answer = manage(sandbox, body)
    assert answer.json() == {"status": "failure", "error": {"code": "8006", "message": message}}
    assert sandbox.state.consent_calls == []


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({**GOOD, "source": ""}, "source", "is required by the vendor"),
        ({**GOOD, "source": "S" * 26}, "source", "at most 25"),
        ({**GOOD, "recipient": "91986956605a"}, "recipient", "only digits"),
        ({**GOOD, "recipient": "986956605"}, "recipient", "has 9 digits"),
        ({**GOOD, "recipient": "9" * 16}, "recipient", "has 16 digits"),
        ({**GOOD, "ip": "300.1.1.1"}, "ip", "not a valid IPv4 or IPv6 address"),
        ({**GOOD, "user_agent": "bad\x00agent"}, "user_agent", "NUL"),
    ],
)
def test_the_hook_names_the_row_and_field_and_calls_nobody(sandbox, pepipost_conn, row, field, reason):
    pepipost_conn(sandbox.url)
    with pytest.raises(MessageValidationError) as caught:
        PepipostHook().manage_consent("optin", [GOOD, row])
    assert f"row 1, field '{field}'" in str(caught.value) and reason in str(caught.value)
    assert "919869566055" not in str(caught.value)  # numbers are masked in errors
    assert sandbox.state.requests == 0


def test_a_refusal_comes_back_as_the_vendors_error_with_its_message(httpserver: HTTPServer, pepipost_conn):
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_json(
        {"status": "failure", "error": {"code": "8006", "message": "source cannot be empty."}}, status=400
    )
    pepipost_conn(httpserver.url_for(""))
    with pytest.raises(PepipostApiError) as caught:
        PepipostHook().manage_consent("optin", [GOOD])
    assert (caught.value.code, caught.value.message) == ("8006", "source cannot be empty.")
    assert len(httpserver.log) == 1  # a refusal is not retried


def test_busy_answers_are_retried_through_the_same_request_path(httpserver: HTTPServer, pepipost_conn):
    httpserver.expect_ordered_request("/api/v2/consent/manage/").respond_with_data("slow down", status=429)
    httpserver.expect_ordered_request("/api/v2/consent/manage/").respond_with_json(
        {"status": "success", "message": "Optout successfully added."}
    )
    pepipost_conn(httpserver.url_for(""))
    assert PepipostHook().manage_consent("optout", [GOOD])["status"] == "success"
    assert len(httpserver.log) == 2


def test_an_opt_in_through_the_api_lifts_the_8002_and_check_consent_reads_it(pepipost_conn):
    from airflow_provider_pepipost.messages import MediaMessage

    with SandboxServer(Scenario(optin_required_ratio=1.0)) as vendor:
        pepipost_conn(vendor.url)
        hook = PepipostHook()
        message = MediaMessage(recipient_whatsapp="919869566055", source="sandbox-source", attachment_id="m1")
        with pytest.raises(PepipostApiError) as caught:
            hook.send_message(message)
        assert caught.value.code == "8002"
        assert hook.check_consent("+91 98695 66055") is None
        hook.manage_consent("optin", [GOOD])
        assert hook.send_message(message)
        found = hook.check_consent("919869566055")
        assert found is not None and found["optin_source"] == "WEB" and found["ip"] == "203.0.113.7"
        hook.manage_consent("optout", [GOOD])
        with pytest.raises(PepipostApiError):
            hook.send_message(message)
        assert vendor.state.consent_calls == [
            {"type": "optin", "recipients": ["919869566055"]},
            {"type": "optout", "recipients": ["919869566055"]},
        ]


def test_a_refused_key_never_appears_in_the_error(sandbox, monkeypatch):
    from tests.conftest import connection_json

    conn = json.loads(connection_json(sandbox.url))
    conn["password"] = "wrong-secret-key-123"
    monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", json.dumps(conn))
    with pytest.raises(PepipostApiError) as caught:
        PepipostHook().manage_consent("optin", [GOOD])
    assert caught.value.code == "8004" and "wrong-secret-key-123" not in str(caught.value)
