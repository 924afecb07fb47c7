"""What a campaign cost: webhook v2's pricing through the real receiver into the store, the
sensor's summary and its rate card; v1 reports carry none, which is "not reported", never 0."""

from __future__ import annotations

import pytest

from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from tests.unit.webhook.test_app import post, report

PRICED = {"billable": True, "category": "Marketing", "pricing_model": "CBP", "type": "regular"}


def test_v2_pricing_is_kept_and_v1_reports_say_nothing(receiver, store_url):
    body = {"delivery_status": [
        report("m1", "sent", 1, pricing=PRICED),
        report("m1", "delivered", 2),  # no pricing on the later report: the first one's stays
        report("m2", "read", 3),  # v1: none at all
        report("m3", "delivered", 4, pricing={"billable": "false", "category": "service"}),
        report("m4", "delivered", 4, pricing={"billable": "maybe"}),  # unreadable pricing: the status still counts
        report("m5", "read", 5),
    ]}  # fmt: skip
    assert post(receiver.webhook_url, body).status_code == 200
    # The pricing came after a higher status: it is recorded all the same.
    assert post(receiver.webhook_url, {"delivery_status": [report("m5", "sent", 1, pricing=PRICED)]}).ok
    # A later report priced otherwise changes nothing: the first pricing stays.
    later = report("m1", "read", 3, pricing={"billable": True, "category": "utility"})
    assert post(receiver.webhook_url, {"delivery_status": [later]}).ok
    summary = StatusStore(store_url).summarize(["m1", "m2", "m3", "m4", "m5", "m6"])
    assert summary.billable == {"marketing": 2} and summary.not_billable == 1
    assert summary.pricing_not_reported == 3  # m2 (v1), m4 (unreadable), m6 (no report yet)
    assert summary.counts == {"delivered": 2, "read": 3}


def test_the_sensor_prices_billable_messages_by_its_rate_card(store_url, use_store):
    store = StatusStore(store_url)
    task = TaskKey("d", "r", "t")
    store.write_ledger(task, [Claim("k1", "k1", "919800000001", 0)], [Outcome("k1", "accepted", "m1")], attempt="a")
    from airflow_provider_pepipost.status.model import DeliveryEvent

    store.ingest([DeliveryEvent("m1", "delivered", "delivered", 1.0e9, raw="{}", billable=True, category="utility")])
    sensor = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m1"], status_store_conn_id=use_store(store_url),
        rate_card={"currency": "INR", "utility": 0.115},
    )  # fmt: skip
    done = sensor.poke({})
    assert done.is_done and done.xcom_value["billable"] == {"utility": 1}
    assert done.xcom_value["estimated_cost"] == {"currency": "INR", "amount": 0.115, "unpriced": {}, "not_reported": 0}


def test_a_campaign_whose_reports_carry_no_pricing_costs_not_reported_never_zero(store_url, use_store):
    store = StatusStore(store_url)
    task = TaskKey("d", "r", "t")
    claims = [Claim(f"k{i}", f"k{i}", f"91980000000{i}", i) for i in range(2)]
    store.write_ledger(task, claims, [Outcome(f"k{i}", "accepted", f"m{i}") for i in range(2)], attempt="a")
    from airflow_provider_pepipost.status.model import DeliveryEvent

    store.ingest([DeliveryEvent(f"m{i}", "delivered", "delivered", 1.0e9, raw="{}") for i in range(2)])  # webhook v1
    sensor = WhatsAppMessageStatusSensor(
        task_id="wait", message_ids=["m0", "m1"], status_store_conn_id=use_store(store_url),
        rate_card={"currency": "INR", "utility": 0.115},
    )  # fmt: skip
    estimate = sensor.poke({}).xcom_value["estimated_cost"]
    assert estimate == {"currency": "INR", "amount": None, "unpriced": {}, "not_reported": 2}


@pytest.mark.parametrize(
    ("card", "reason"),
    [({"marketing": 1.0}, "currency"), ({"currency": "INR", "marketing": -1}, "marketing"), ([1], "mapping")],
)
def test_a_rate_card_that_cannot_work_names_the_entry_when_the_dag_is_parsed(card, reason):
    with pytest.raises(ValueError, match=reason):  # not hours later, once the wait is done
        WhatsAppMessageStatusSensor(task_id="wait", message_ids=["m1"], rate_card=card)
