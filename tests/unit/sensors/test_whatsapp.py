"""WhatsAppMessageStatusSensor on a real store: what it says when it cannot decide, and bad input."""

from __future__ import annotations

import time

import pytest

from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException


def sensor(conn_id: str, message_ids) -> WhatsAppMessageStatusSensor:
    return WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=message_ids, status_store_conn_id=conn_id, timeout=60
    )


def report(message_id: str, status: str = "sent") -> DeliveryEvent:
    return DeliveryEvent(message_id, status, status, time.time(), "", None, None, "{}")


def test_an_empty_id_list_fails_instead_of_passing_on_nothing(use_store, sqlite_url):
    with pytest.raises(AirflowFailException, match="nothing to wait for"):
        sensor(use_store(sqlite_url), []).poke({})


def test_a_timeout_with_no_report_ever_points_at_the_receiver_and_its_token(use_store, sqlite_url):
    message = sensor(use_store(sqlite_url), ["m1", "m2"]).timeout_message()
    assert "2 pending" in message
    assert "never received a delivery report" in message
    assert "PEPIPOST_WEBHOOK_TOKEN" in message and "/pepipost/status" in message


def test_a_timeout_says_when_reports_last_came(use_store, sqlite_url):
    store = StatusStore(sqlite_url)
    store.ingest([report("other")])
    message = sensor(use_store(sqlite_url), ["m1"]).timeout_message()
    assert "No report for these messages has arrived" in message and "UTC" in message

    store.ingest([report("m1")])
    message = sensor(use_store(sqlite_url), ["m1", "m2"]).timeout_message()
    assert "The last delivery report for these messages arrived at" in message
