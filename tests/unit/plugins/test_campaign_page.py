"""The campaign page's figures against the store they come from (the real browser test is in
tests/system/test_campaign_page.py)."""

from __future__ import annotations

import csv
import io
import re

import pytest
from fastapi import HTTPException, Request
from fastapi.testclient import TestClient
from sqlalchemy import update

from airflow_provider_pepipost.plugins.campaign_html import render_page
from airflow_provider_pepipost.plugins.campaign_page import create_campaign_app
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.reports import CampaignReport
from airflow_provider_pepipost.status.store import StatusStore

SEND = TaskKey("campaign", "run-1", "send")
T0 = 1_800_000_000.0


def fill(store: StatusStore) -> None:
    """20 rows: 12 read, 3 delivered, 2 failed, 1 unknown, 1 refused (8003), 1 pending."""
    claims = [Claim(f"k{i}", f"k{i}", f"9198000000{i:02d}", i) for i in range(20)]
    store.write_ledger(SEND, claims, attempt="a1")
    outcomes = [Outcome(f"k{i}", "accepted", message_id=f"m{i}") for i in range(17)]
    outcomes += [Outcome("k17", "unknown"), Outcome("k18", "rejected", error_code="8003", error_message="no WhatsApp")]
    outcomes += [Outcome("k19", "accepted", message_id="m19")]
    store.write_ledger(None, outcomes=outcomes)
    with store.engine.begin() as conn:  # a known send time, so the latencies are known
        conn.execute(update(schema.ledger).values(sent_at=T0))
    events = []
    for i in range(12):
        events += [ev(f"m{i}", "delivered", T0 + 10 + i), ev(f"m{i}", "read", T0 + 100 + i)]
    events += [ev(f"m{i}", "delivered", T0 + 40) for i in range(12, 15)]
    events += [ev(f"m{i}", "failed", T0 + 5, remark="Recipient phone unreachable") for i in (15, 16)]
    store.ingest(events)


def ev(message_id: str, status: str, at: float, remark: str = "") -> DeliveryEvent:
    return DeliveryEvent(
        message_id=message_id, status=status, raw_status=status, remark=remark, reported_at=at, raw="{}"
    )


def allow(request: Request) -> None:
    if request.headers.get("x-user") != "ana":
        raise HTTPException(status_code=401 if "x-user" not in request.headers else 403)


@pytest.fixture
def client(store_url):
    store = StatusStore(store_url)
    fill(store)
    app = create_campaign_app(
        store_url,
        auth=(allow, lambda request, dag_id: request.headers.get("x-edit") == "yes"),
        send_summaries=lambda *_: [{"suppressed": 3}],
    )
    return TestClient(app)


def test_the_funnel_latencies_and_failures_match_the_store(client):
    report = client.get("/dags/campaign/runs/run-1/report.json", headers={"x-user": "ana"}).json()
    assert report["funnel"] == {"sent": 18, "delivered": 15, "read": 12, "failed": 2, "pending": 1, "unknown": 1,
                                "rejected": 1, "fallback": 0}  # fmt: skip
    page = client.get("/dags/campaign/runs/run-1/tasks/send", headers={"x-user": "ana"}).text
    assert "data-stage='delivered'>15<" in page and "data-stage='suppressed'>3<" in page
    # Delivered: 12 after 10..21 s and 3 after 40 s -> median 17 s, p90 40 s; read 100..111 s (shown in minutes).
    assert "<td>to delivered</td><td class='n'>15</td><td class='n'>17 s</td><td class='n'>40 s</td>" in page
    assert "<td>to read</td><td class='n'>12</td><td class='n'>1.8 min</td><td class='n'>1.8 min</td>" in page
    assert "Recipient phone unreachable" in page and "8003" in page
    assert "919800000015" not in page and "9198******15" in page  # numbers masked on the page


def test_the_csv_has_every_row_masked_unless_the_viewer_may_edit(client):
    masked = client.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana"})
    rows = list(csv.DictReader(io.StringIO(masked.text)))
    assert len(rows) == 20 and rows[0]["recipient"] == "9198******00" and rows[0]["last_status"] == "read"
    assert rows[0]["delivered_at"] == "2027-01-15T08:00:10Z"
    assert {r["state"] for r in rows} == {"accepted", "unknown", "rejected"}
    whole = client.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana", "x-edit": "yes"})
    assert next(csv.DictReader(io.StringIO(whole.text)))["recipient"] == "919800000000"


@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"x-user": "bob"}, 403)])
def test_nobody_without_access_sees_anything(client, headers, status):
    for path in ("/dags/campaign/runs/run-1", "/dags/campaign/runs/run-1/tasks/send/export.csv"):
        answer = client.get(path, headers=headers)
        assert answer.status_code == status and "campaign" not in answer.text.replace("/dags/campaign", "")


def test_a_run_that_sent_nothing_says_so(client):
    page = client.get("/dags/campaign/runs/other-run", headers={"x-user": "ana"}).text
    assert "No WhatsApp messages were sent" in page


def timeline_labels(page: str) -> list[str]:
    """Each bar's label (its tooltip) in the page's "Delivered over time" chart."""
    chart = re.search(r"<svg id='timeline'.*?</svg>", page).group(0)
    return re.findall(r"<title>([^<]*): [\d,]+</title>", chart)


def test_every_bar_of_the_timeline_has_a_label_of_its_own(client):
    page = client.get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    labels = timeline_labels(page)  # deliveries over 30 s: a bar a second, labelled to the second
    assert len(labels) == 30 and len(set(labels)) == 30, labels
    assert labels[:2] == ["08:00:10", "08:00:11"]


@pytest.mark.parametrize(("step", "first_two"), [
    (1.5, ["08:00:00", "08:00:01"]),  # under a minute a bar: seconds
    (240.0, ["08:00", "08:04"]),  # 2 hours: minutes
    (3000.0, ["01-15 08:00", "01-15 08:50"]),  # over a day: the date too, so 24 h apart is not the same label
    (2 * 86400.0, ["2027-01-15", "2027-01-17"]),
])  # fmt: skip
def test_timeline_labels_are_fine_enough_for_the_step(step, first_two):
    start = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC
    report = CampaignReport(tasks=1, total=30, funnel={"sent": 30, "delivered": 30, "read": 0, "failed": 0},
                            timeline=[(start + i * step, 1) for i in range(30)], timeline_step=step)  # fmt: skip
    labels = timeline_labels(render_page(report, title="t", scope="s", csv_url="/x.csv", summary_counts={}))
    assert labels[:2] == first_two and len(set(labels)) == 30, labels


def test_a_campaign_without_failures_says_so(store_url):
    store = StatusStore(store_url)
    store.write_ledger(SEND, [Claim(f"k{i}", f"k{i}", f"9198000000{i:02d}", i) for i in range(3)], attempt="a1")
    store.write_ledger(None, outcomes=[Outcome(f"k{i}", "accepted", message_id=f"m{i}") for i in range(3)])
    store.ingest([ev(f"m{i}", "delivered", T0 + i) for i in range(3)])
    app = create_campaign_app(store_url, auth=(allow, lambda *_: False), send_summaries=lambda *_: [])
    page = TestClient(app).get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "<h2>Failed recipients</h2><p class='sub' id='failed-recipients'>No recipient was refused" in page
    assert "first 0" not in page


def test_failed_recipients_are_counted_when_there_are_some(client):
    page = client.get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "<h2>Failed recipients</h2><div class='sub'>3, refused rows first</div>" in page  # 8003, 2 failed
