"""WhatsAppTemplateNotifier never stalls anything: a total deadline however the vendor throttles,
threads of its own in the triggerer, masked numbers in its error line, and no crash on a missing
connection unless asked. Against vendors on loopback."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from airflow_provider_pepipost.errors import PepipostError
from airflow_provider_pepipost.notifications.whatsapp import WhatsAppTemplateNotifier
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.triggers.status import WhatsAppMessageStatusTrigger

NUMBERS = ["919800000001", "919800000002"]


def throttled(retry_after: int):
    def answer(_request: Request) -> Response:
        return Response("", status=429, headers={"Retry-After": str(retry_after)})

    return answer


def notifier(**kwargs) -> WhatsAppTemplateNotifier:
    kwargs.setdefault("recipients", NUMBERS)
    return WhatsAppTemplateNotifier(template_name="airflow_task_alert", attributes=["a", "b", "c", "d", "e"], **kwargs)


@pytest.mark.parametrize("retry_after", [2, 120])
def test_a_whole_notification_ends_by_its_deadline_however_the_vendor_throttles(
    httpserver: HTTPServer, pepipost_conn, retry_after, capfd
):
    httpserver.expect_request("/api/v2/message/").respond_with_handler(throttled(retry_after))
    pepipost_conn(httpserver.url_for(""), max_retries=5, backoff_max=60)
    started = time.monotonic()
    notifier(timeout=1.5).notify({})
    took = time.monotonic() - started
    assert took < 1.5 + 1.0, took  # 2 numbers x 5 retries x Retry-After would be 20 s to 20 minutes
    logged = "".join(capfd.readouterr())
    assert "was NOT sent" in logged and "9198******02" in logged


def test_the_error_line_masks_numbers_the_vendors_text_quotes(httpserver: HTTPServer, pepipost_conn, capfd):
    failure = {"status": "failure", "error": {"code": "8006", "message": f"No template for {NUMBERS[0]}."}}
    httpserver.expect_request("/api/v2/message/").respond_with_data(json.dumps(failure), status=400)
    pepipost_conn(httpserver.url_for(""))
    notifier(recipients=NUMBERS[0]).notify({})
    logged = "".join(capfd.readouterr())
    assert "No template for 9198******01." in logged and NUMBERS[0] not in logged


def test_a_missing_connection_is_reported_not_raised_unless_asked(monkeypatch, capfd):
    monkeypatch.delenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", raising=False)
    notifier(pepipost_conn_id="no_such_connection").notify({})  # a callback must not crash on it
    assert "was NOT sent" in "".join(capfd.readouterr())
    with pytest.raises(PepipostError, match="no_such_connection"):
        notifier(pepipost_conn_id="no_such_connection", raise_on_failure=True).notify({})


def test_a_bad_number_is_named_as_the_notifiers_own(httpserver: HTTPServer, pepipost_conn, capfd):
    pepipost_conn(httpserver.url_for(""))
    notifier(recipients=[NUMBERS[0], "12345"]).notify({})
    logged = "".join(capfd.readouterr())
    assert "recipients[1] = '12345': has 5 digits" in logged and "recipient_whatsapp" not in logged


def test_waiting_alerts_never_delay_a_delivered_sensor(httpserver: HTTPServer, pepipost_conn, sqlite_url, use_store):
    """Six alerts held by a throttling vendor, and a status trigger whose messages are delivered,
    on one event loop: the trigger fires at once (before, it waited for the alerts' threads)."""
    httpserver.expect_request("/api/v2/message/").respond_with_handler(throttled(4))
    pepipost_conn(httpserver.url_for(""), max_retries=3, backoff_max=10)
    store = StatusStore(sqlite_url)
    task = TaskKey("d", "r", "t")
    store.write_ledger(task, [Claim("k1", "k1", NUMBERS[0], 0)], [Outcome("k1", "accepted", "m1")], attempt="a")
    store.ingest([DeliveryEvent("m1", "delivered", "delivered", 1_700_000_000.0, raw="{}")])
    trigger = WhatsAppMessageStatusTrigger(
        message_ids=["m1"], status_store_conn_id=use_store(sqlite_url), target_status="delivered",
        min_success_ratio=1.0, poll_interval=0.05, deadline=time.time() + 60,
    )  # fmt: skip

    async def both() -> float:
        alerts = [asyncio.ensure_future(notifier(timeout=10).async_notify({})) for _ in range(6)]
        await asyncio.sleep(0.2)  # the alerts hold their threads, waiting on the vendor
        started = time.monotonic()
        event = await anext(trigger.run())
        fired_after = time.monotonic() - started
        assert event.payload["status"] == "success", event.payload
        for alert in alerts:
            alert.cancel()
        return fired_after

    fired_after = asyncio.run(both())
    assert fired_after < 3.0, f"the trigger waited {fired_after:.1f}s behind the alerts"


def test_a_number_that_said_stop_gets_no_alert(httpserver: HTTPServer, store_url, pepipost_conn, capfd):
    accepted = {"status": "success", "message": "Request received successfully.", "data": {"id": "alert-1"}}
    httpserver.expect_request("/api/v2/message/").respond_with_json(accepted)
    pepipost_conn(httpserver.url_for(""), store_url)
    StatusStore(store_url).record_opt_outs(["+91 98000-00001"], via="reply", detail="replied 'STOP'")
    notifier(raise_on_failure=True).notify({})
    sent_to = [json.loads(request.data)["message"][0]["recipient_whatsapp"] for request, _ in httpserver.log]
    assert sent_to == [NUMBERS[1]]
    assert "not sent to '9198******01': the number opted out" in "".join(capfd.readouterr())


def test_a_suppression_list_that_cannot_be_read_sends_nothing(httpserver: HTTPServer, pepipost_conn, capfd):
    httpserver.expect_request("/api/v2/message/").respond_with_json({"status": "success", "data": {"id": "x"}})
    pepipost_conn(httpserver.url_for(""), "postgresql+psycopg2://nobody@127.0.0.1:1/none")
    notifier().notify({})
    assert httpserver.log == [] and "was NOT sent" in "".join(capfd.readouterr())
