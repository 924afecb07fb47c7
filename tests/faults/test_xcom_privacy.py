"""XCom holds no whole number: every user who can see the DAG reads it (the REST API too). The send
and consent operators run against vendors on loopback that quote the number in their refusals."""

from __future__ import annotations

import itertools
import json
import re

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator
from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from tests.helpers import StandInTaskInstance, run_operator

NUMBERS = [f"9198{i:08d}" for i in range(10)]
WHOLE_NUMBER = re.compile(r"(?<!\d)\d{10,15}(?!\d)")


# Message ids hold no run of digits a number could be mistaken for (a uuid4 sometimes does).
_IDS = (f"msg-{letter}{n}" for n in itertools.count() for letter in "abcdefgh")


def quoting_vendor(request: Request) -> Response:
    """Accepts even numbers, refuses odd ones with a text that quotes the number."""
    body = request.get_json()
    number = body["message"][0]["recipient_whatsapp"] if "message" in body else body["recipients"][0]["recipient"]
    if int(number[-1]) % 2:
        failure = {"status": "failure", "error": {"code": "8003", "message": f"{number} is not on WhatsApp"}}
        return Response(json.dumps(failure), 400, content_type="application/json")
    if "message" not in body:
        return Response(json.dumps({"status": "success", "message": "Optin successfully added."}), 200)
    answer = {"status": "success", "message": "Request received successfully.", "data": {"id": next(_IDS)}}
    return Response(json.dumps(answer), 200, content_type="application/json")


def whole_numbers_in(values) -> list[str]:
    return WHOLE_NUMBER.findall(json.dumps(values))


def test_the_send_operators_xcom_holds_masked_numbers_only(httpserver: HTTPServer, sqlite_url, pepipost_conn):
    httpserver.expect_request("/api/v2/message/").respond_with_handler(quoting_vendor)
    pepipost_conn(httpserver.url_for(""), sqlite_url)
    rows = [{"recipient_whatsapp": n, "x-apiheader": f"invoice for {n}"} for n in NUMBERS]
    for operator, extra in ((None, {}), (SendWhatsAppTemplateOperator, {"template_name": "t", "attributes": ["a"]})):
        ti = StandInTaskInstance(task_id=f"send{len(extra)}")
        value, ti = run_operator(rows, ti, operator, max_rejected_ratio=1.0, **extra)
        assert not isinstance(value, Exception), value
        assert ti.xcom["messages"][1]["error_message"] == "9198******01 is not on WhatsApp"
        assert whole_numbers_in([value, ti.xcom]) == [], (value, ti.xcom)
    _, whole = run_operator(rows[:1], StandInTaskInstance(run_id="whole"), xcom_full_numbers=True)
    assert NUMBERS[0] in json.dumps(whole.xcom["messages"])  # ...unless a DAG asks for them


def test_the_consent_operators_xcom_holds_masked_numbers_only(httpserver: HTTPServer, sqlite_url, pepipost_conn):
    httpserver.expect_request("/api/v2/consent/manage/").respond_with_handler(quoting_vendor)
    pepipost_conn(httpserver.url_for(""), sqlite_url)
    operator = WhatsAppConsentOperator(
        task_id="opt_in", recipients=NUMBERS, source="WEB", batch_size=1, max_rejected_ratio=1.0
    )
    result = operator.execute({"ti": StandInTaskInstance(task_id="opt_in")})
    assert result["refused"] == 5 and {r["recipient"] for r in result["failed_rows"]} == {
        f"9198******{n[-2:]}" for n in NUMBERS[1::2]
    }
    assert whole_numbers_in(result) == [], result
