"""The campaign page's figures against the store they come from, on SQLite and PostgreSQL (the real
browser test is in tests/system/test_campaign_page.py; the counts against the task's own XCom
and the sensor in tests/faults/test_campaign_truth.py)."""

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
from airflow_provider_pepipost.status.ledger import Claim, Outcome, RowRecord, TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.reports import CampaignReport
from airflow_provider_pepipost.status.store import StatusStore

SEND = TaskKey("campaign", "run-1", "send")
T0 = 1_800_000_000.0
RATE_CARD = {"currency": "INR", "marketing": 0.8, "utility": 0.1}


def number(i: int) -> str:
    return f"9198000000{i:02d}"


def fill(store: StatusStore) -> None:
    """25 rows: 12 read, 3 delivered, 2 failed, 1 unknown, 1 refused (8003, its text naming the
    number), 1 pending, 1 'enqueued' (a status the provider does not know), 1 duplicate,
    2 suppressed, 1 not sent."""
    claims = [Claim(f"k{i}", f"k{i}", number(i), i) for i in range(21)]
    store.write_ledger(SEND, claims, attempt="a1")
    outcomes = [Outcome(f"k{i}", "accepted", message_id=f"m{i}") for i in range(17)]
    outcomes += [Outcome("k17", "unknown")]
    outcomes += [Outcome("k18", "rejected", error_code="8003", error_message=f"{number(18)} is not on WhatsApp")]
    outcomes += [Outcome("k19", "accepted", message_id="m19"), Outcome("k20", "accepted", message_id="m20")]
    store.write_ledger(None, outcomes=outcomes)
    rows = [RowRecord(i, number(i), "accepted", f"k{i}", f"m{i}") for i in (*range(17), 19, 20)]
    rows += [RowRecord(17, number(17), "unknown", "k17")]
    rows += [RowRecord(18, number(18), "rejected", "k18", None, "8003", f"{number(18)} is not on WhatsApp")]
    rows += [RowRecord(21, number(3), "duplicate", "k3", None, None, "the same recipient and content")]
    rows += [RowRecord(22 + i, number(50 + i), "suppressed", None, None, None, "opted out") for i in range(2)]
    rows += [RowRecord(24, number(60), "not_sent", None, None, None, "the campaign stopped")]
    store.write_ledger(SEND, rows=rows, attempt="a1", campaign="campaign/run-1/send")
    with store.engine.begin() as conn:  # a known send time, so the latencies are known
        conn.execute(update(schema.ledger).values(sent_at=T0))
    events = []
    for i in range(12):
        marketing = {"billable": True, "category": "marketing"}
        events += [ev(f"m{i}", "delivered", T0 + 10 + i, **marketing), ev(f"m{i}", "read", T0 + 100 + i)]
    events += [ev(f"m{i}", "delivered", T0 + 40, billable=True, category="utility") for i in range(12, 15)]
    events += [ev(f"m{i}", "failed", T0 + 5, remark=f"Phone {number(i)} unreachable") for i in (15, 16)]
    events += [ev("m20", "enqueued", T0 + 5)]
    store.ingest(events)


def ev(message_id: str, status: str, at: float, remark: str = "", **pricing) -> DeliveryEvent:
    return DeliveryEvent(
        message_id=message_id, status=status, raw_status=status, remark=remark, reported_at=at, raw="{}", **pricing
    )


def allow(request: Request) -> None:
    if request.headers.get("x-user") != "ana":
        raise HTTPException(status_code=401 if "x-user" not in request.headers else 403)


@pytest.fixture
def client(store_url):
    fill(StatusStore(store_url))
    app = create_campaign_app(
        store_url,
        auth=(allow, lambda request, dag_id: request.headers.get("x-edit") == "yes"),
        rate_card=lambda: RATE_CARD,
    )
    return TestClient(app)


def test_the_page_counts_rows_by_state_and_messages_by_status(client):
    report = client.get("/dags/campaign/runs/run-1/report.json", headers={"x-user": "ana"}).json()
    assert report["rows"] == 25 and report["messages"] == 20
    assert report["states"] == {"accepted": 19, "fallback": 0, "rejected": 1, "unknown": 1, "duplicate": 1,
                                "not_sent": 1, "suppressed": 2}  # fmt: skip
    assert report["statuses"] == {"pending": 1, "sent": 0, "delivered": 3, "read": 12, "failed": 2, "unknown": 1,
                                  "enqueued": 1}  # fmt: skip
    page = client.get("/dags/campaign/runs/run-1/tasks/send", headers={"x-user": "ana"}).text
    assert "data-status='delivered'>3<" in page and "data-state='suppressed'>2<" in page
    assert "data-state='not_sent'>1<" in page and "data-status='enqueued'>1<" in page
    # Delivered: 12 after 10..21 s and 3 after 40 s -> median 17 s, p90 40 s; read 100..111 s (shown in minutes).
    assert "<td>to delivered</td><td class='n'>15</td><td class='n'>17 s</td><td class='n'>40 s</td>" in page
    assert "<td>to read</td><td class='n'>12</td><td class='n'>1.8 min</td><td class='n'>1.8 min</td>" in page
    assert "8003" in page and "id='legend'" in page


def test_the_page_shows_what_it_cost_by_category(client):
    page = client.get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "data-category='marketing'><td>marketing</td><td class='n'>12<" in page
    assert "data-category='utility'><td>utility</td><td class='n'>3<" in page
    assert "data-category='not reported'><td>not reported</td><td class='n'>5<" in page
    assert "Estimated cost: <b>9.90 INR</b> (billable messages by the rate card; 5 message(s) not reported)" in page


def test_with_a_rate_card_a_campaign_whose_reports_carry_no_pricing_costs_not_reported(store_url):
    store = StatusStore(store_url)
    store.write_ledger(SEND, [Claim("k1", "k1", number(1), 0)], attempt="a")
    store.write_ledger(None, outcomes=[Outcome("k1", "accepted", message_id="m1")])
    store.write_ledger(SEND, rows=[RowRecord(0, number(1), "accepted", "k1", "m1")], attempt="a")
    store.ingest([ev("m1", "delivered", T0)])  # webhook v1: no pricing
    app = create_campaign_app(store_url, auth=(allow, lambda *_: False), rate_card=lambda: RATE_CARD)
    page = TestClient(app).get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "Estimated cost: <b>not reported</b>" in page and "0.00 INR" not in page


def test_a_viewer_sees_no_whole_number_not_even_in_the_vendors_text(client):
    page = client.get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    masked = client.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana"}).text
    for text in (page, masked):
        assert not any(number(i) in text for i in range(61)), text
    assert "9198******18 is not on WhatsApp" in page and "Phone 9198******15 unreachable" in masked


def test_the_csv_is_one_row_per_input_row_with_the_tasks_state(client):
    masked = client.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana"})
    rows = list(csv.DictReader(io.StringIO(masked.text)))
    assert [int(r["row"]) for r in rows] == list(range(25))
    by_row = {int(r["row"]): r for r in rows}
    assert by_row[0]["recipient"] == "9198******00" and by_row[0]["last_status"] == "read"
    assert by_row[0]["category"] == "marketing" and by_row[0]["billable"] == "yes"
    assert by_row[0]["delivered_at"] == "2027-01-15T08:00:10Z"
    assert by_row[21]["state"] == "duplicate" and by_row[21]["message_id"] == "" and by_row[21]["sent_at"] == ""
    assert by_row[17]["state"] == "unknown" and by_row[17]["last_status"] == "unknown"
    assert by_row[24]["state"] == "not_sent" and by_row[22]["state"] == "suppressed"
    whole = client.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana", "x-edit": "yes"})
    first = next(csv.DictReader(io.StringIO(whole.text)))
    assert first["recipient"] == "919800000000"


def test_the_csv_is_data_not_formulas_and_its_name_carries_nothing_else(store_url):
    store = StatusStore(store_url)
    run = "r\"; filename*=UTF-8''evil.exe; x=\""
    task = TaskKey("campaign", run, "send")
    texts = ['=HYPERLINK("http://x")', "@SUM(A1)", "+1", "-2", "\tx", "\rx"]
    # One message per text, each failed with that remark, and one whose only status is '=1+2'.
    store.write_ledger(task, [Claim(f"f{i}", f"f{i}", number(i), i) for i in range(7)], attempt="a")
    store.write_ledger(None, outcomes=[Outcome(f"f{i}", "accepted", message_id=f"mf{i}") for i in range(7)])
    store.write_ledger(
        task, rows=[RowRecord(i, number(i), "accepted", f"f{i}", f"mf{i}") for i in range(7)], attempt="a"
    )
    store.ingest([ev(f"mf{i}", "failed", T0, remark=text) for i, text in enumerate(texts)] + [ev("mf6", "=1+2", T0)])
    client = TestClient(create_campaign_app(store_url, auth=(allow, lambda *_: True), rate_card=lambda: None))
    answer = client.get(f"/dags/campaign/runs/{run}/export.csv", headers={"x-user": "ana"})
    assert answer.status_code == 200
    disposition = answer.headers["content-disposition"]
    assert disposition.count('"') == 2 and "filename*" not in disposition and ";" not in disposition.split("=", 1)[1]
    rows = list(csv.DictReader(io.StringIO(answer.text, newline="")))
    assert [row["error"] for row in rows[:6]] == ["'" + text for text in texts]
    assert rows[6]["last_status"] == "'=1+2", rows[6]
    for row in rows:
        for name, cell in row.items():  # a number (map_index -1) is a number, not a formula
            assert name == "map_index" or not cell.startswith(("=", "+", "-", "@", "\t", "\r")), row


@pytest.mark.parametrize("path", ["/dags/campaign/runs/run%00-1", "/dags/campaign/runs/run-1/tasks/se%00nd/export.csv",
                                  "/dags/" + "d" * 300 + "/runs/r"])  # fmt: skip
def test_an_id_no_airflow_id_can_be_is_refused_before_anything_runs(client, path):
    answer = client.get(path, headers={"x-user": "ana"})
    assert answer.status_code == 400 and "campaign" not in answer.text


@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"x-user": "bob"}, 403)])
def test_nobody_without_access_sees_anything(client, headers, status):
    for path in ("/dags/campaign/runs/run-1", "/dags/campaign/runs/run-1/tasks/send/export.csv"):
        answer = client.get(path, headers=headers)
        assert answer.status_code == status and "campaign" not in answer.text.replace("/dags/campaign", "")


def test_a_run_that_sent_nothing_says_so(client):
    page = client.get("/dags/campaign/runs/other-run", headers={"x-user": "ana"}).text
    assert "No WhatsApp messages were sent" in page


def test_a_failing_query_is_never_a_200(store_url):
    client = TestClient(create_campaign_app(store_url, auth=(allow, lambda *_: True), rate_card=lambda: None))
    with StatusStore(store_url).engine.begin() as conn:
        conn.execute(schema.campaign_rows.delete())
        conn.exec_driver_sql("DROP TABLE pepipost_campaign_rows")
    with TestClient(client.app, raise_server_exceptions=False) as failing:
        answer = failing.get("/dags/campaign/runs/run-1/export.csv", headers={"x-user": "ana"})
    assert answer.status_code == 500


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
    report = CampaignReport(tasks=1, rows=30, timeline=[(start + i * step, 1) for i in range(30)], timeline_step=step)
    labels = timeline_labels(render_page(report, title="t", scope="s", csv_url="/x.csv"))
    assert labels[:2] == first_two and len(set(labels)) == 30, labels


def test_a_campaign_without_failures_says_so(store_url):
    store = StatusStore(store_url)
    store.write_ledger(SEND, [Claim(f"k{i}", f"k{i}", f"9198000000{i:02d}", i) for i in range(3)], attempt="a1")
    store.write_ledger(None, outcomes=[Outcome(f"k{i}", "accepted", message_id=f"m{i}") for i in range(3)])
    rows = [RowRecord(i, f"9198000000{i:02d}", "accepted", f"k{i}", f"m{i}") for i in range(3)]
    store.write_ledger(SEND, rows=rows, attempt="a1")
    store.ingest([ev(f"m{i}", "delivered", T0 + i) for i in range(3)])
    app = create_campaign_app(store_url, auth=(allow, lambda *_: False), rate_card=lambda: None)
    page = TestClient(app).get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "<h2>Failed recipients</h2><p class='sub' id='failed-recipients'>No recipient was refused" in page
    assert "first 0" not in page


def test_failed_recipients_are_counted_when_there_are_some(client):
    page = client.get("/dags/campaign/runs/run-1", headers={"x-user": "ana"}).text
    assert "<h2>Failed recipients</h2><div class='sub'>3, refused rows first</div>" in page  # 8003, 2 failed


def test_a_run_of_more_than_a_thousand_send_task_instances_has_its_page_and_csv(sqlite_url):
    """SQLite refuses a query with one OR term per task instance past about 1,000 ('Expression
    tree is too large'): the page and the CSV select by run, however many instances it has."""
    store, instances = StatusStore(sqlite_url), 1200
    with store.engine.begin() as conn:  # the rows as 1,200 mapped send tasks write them, in one go
        conn.execute(schema.ledger.insert(), [_ledger_row(i) for i in range(instances)])
        conn.execute(schema.campaign_rows.insert(), [_page_row(i) for i in range(instances)])
    store.ingest([ev(f"m{i}", "delivered", T0 + i) for i in range(instances)])
    client = TestClient(create_campaign_app(sqlite_url, auth=(allow, lambda *_: False), rate_card=lambda: None))
    for scope in ("", "/tasks/send"):
        page = client.get(f"/dags/big/runs/r1{scope}", headers={"x-user": "ana"})
        assert page.status_code == 200, page.text[:300]
        assert f"data-state='accepted'>{instances:,}<" in page.text
        exported = client.get(f"/dags/big/runs/r1{scope}/export.csv", headers={"x-user": "ana"})
        rows = list(csv.DictReader(io.StringIO(exported.text)))
        assert exported.status_code == 200 and len(rows) == instances
        assert {row["last_status"] for row in rows} == {"delivered"}


def _ledger_row(map_index: int) -> dict[str, object]:
    return {
        "idempotency_key": f"k{map_index}", "api_header": f"k{map_index}", "message_id": f"m{map_index}",
        "recipient": f"9198{map_index:08d}", "dag_id": "big", "run_id": "r1", "task_id": "send",
        "map_index": map_index, "row_index": 0, "state": "accepted", "sent_at": T0, "updated_at": T0,
    }  # fmt: skip


def _page_row(map_index: int) -> dict[str, object]:
    return {
        "dag_id": "big", "run_id": "r1", "task_id": "send", "map_index": map_index, "row_index": 0,
        "state": "accepted", "recipient": f"9198{map_index:08d}", "ledger_key": f"k{map_index}",
        "message_id": f"m{map_index}", "updated_at": T0,
    }  # fmt: skip
