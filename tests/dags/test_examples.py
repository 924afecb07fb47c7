"""The example DAGs: they parse, and each runs end to end against the sandbox and the receiver."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import _dag_bag, run_dag

pytestmark = pytest.mark.dag
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = {
    "whatsapp_media_campaign",
    "whatsapp_media_campaign_mapped",
    "whatsapp_media_by_url",
    "whatsapp_template_campaign",
    "whatsapp_opt_in_then_campaign",
    "whatsapp_campaign_delivered_report",
    "pepipost_store_maintenance",
    "whatsapp_offer_with_buttons",
    "whatsapp_reply_router",
    "whatsapp_campaign_approval",
}


def test_examples_parse_without_import_errors(airflow_db):
    bag = _dag_bag()
    assert not bag.import_errors
    assert set(bag.dag_ids) >= EXAMPLES


@pytest.fixture
def sandbox_with_reports(airflow_db, sqlite_receiver, pepipost_conn):
    scenario = Scenario(final_mix={"read": 0.9, "delivered": 0.1}, status_delay=0.1)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        pepipost_conn(sandbox.url, sqlite_receiver.store_url)
        yield sandbox


def test_store_maintenance_example_purges_what_is_older_than_90_days(airflow_db, sqlite_url, pepipost_conn):
    import time

    from sqlalchemy import insert

    from airflow_provider_pepipost.status import schema
    from airflow_provider_pepipost.status.store import StatusStore

    pepipost_conn("http://127.0.0.1:9", sqlite_url)  # the store is what it needs; no vendor
    store = StatusStore(sqlite_url)
    with store.engine.begin() as conn:
        conn.execute(insert(schema.events), [
            {"event_key": f"e{i}", "message_id": f"m{i}", "status": "read", "raw_status": "read", "remark": "",
             "received_at": time.time() - days * 86_400.0, "raw": "{}"}
            for i, days in enumerate([100, 100, 100, 10])
        ])  # fmt: skip
    store.record_opt_outs(["919800000001"], via="reply", detail="replied 'STOP'")
    result = run_dag("pepipost_store_maintenance")
    assert result.state == "success", result.tasks
    assert result.value("purge_older_than_90_days")["pepipost_events"] == 3
    assert store.count_rows("pepipost_events") == 1 and store.suppressed(["919800000001"])


def test_mapped_example(sandbox_with_reports):
    result = run_dag("whatsapp_media_campaign_mapped")
    assert result.state == "success", result.tasks
    assert sandbox_with_reports.state.accepted_count == 30
    assert result.value("wait_for_delivery")["total"] == 30


def test_media_by_url_example(sandbox_with_reports, tmp_path):
    root = tmp_path / "audiences"
    result = run_dag("whatsapp_media_by_url", audience_root=f"file://{root}")
    assert result.state == "success", result.tasks
    body = sandbox_with_reports.state.accepted[0]["body"]["message"][0]
    attachment = body["type_media"][0]["attachments"][0]
    assert attachment["attachment_type"] == "video" and attachment["attachment_url"].startswith("https://")
    assert attachment["caption"].endswith(", see what is new this spring")
    # The audience went through a file in the given storage, its URL (no number) in XCom, and is gone.
    assert result.value("send_video", "send_summary")["total"] == 15
    assert result.value("export_audience").startswith(f"file://{root}/whatsapp_media_by_url/")
    assert result.task_state("remove_audience") == "success"
    assert [p for p in root.rglob("*") if p.is_file()] == []


def test_template_example_sends_the_template_where_the_window_is_closed(airflow_db, sqlite_receiver, pepipost_conn):
    scenario = Scenario(final_mix={"read": 0.9, "delivered": 0.1}, status_delay=0.1, closed_window_ratio=0.4)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        pepipost_conn(sandbox.url, sqlite_receiver.store_url)
        result = run_dag("whatsapp_template_campaign")
    assert result.state == "success", result.tasks
    split = result.value("report")
    assert split["template"] == sandbox.state.accepted_by_type["template"] > 10
    assert split["session"] == sandbox.state.accepted_by_type["media"] > 10
    assert split["session"] + split["template"] == 60
    assert result.value("wait_for_delivery")["total"] == 60  # one sensor over both kinds

    # Both tasks updated their assets, with the figures as the events' extra.
    sent = asset_event_extra("pepipost://campaign/whatsapp_template_campaign/send_invoices", result.run_id)
    assert {k: sent[k] for k in ("accepted", "fallback", "total")} == {
        "accepted": split["session"],
        "fallback": split["template"],
        "total": 60,
    }
    delivered = asset_event_extra("pepipost://delivery/whatsapp_template_campaign/wait_for_delivery", result.run_id)
    assert delivered["total"] == 60 and delivered["counts"] == result.value("wait_for_delivery")["counts"]
    assert delivered["target_status"] == "delivered"

    # The report DAG triggered by hand (no asset event behind its run): the latest delivered campaign.
    report = run_dag("whatsapp_campaign_delivered_report")
    assert report.state == "success", report.tasks
    assert report.value("delivery_figures") == {
        "run_id": result.run_id,
        "accepted": split["session"],
        "fallback": split["template"],
        "total": 60,
        "counts": delivered["counts"],
    }


def test_the_offer_waits_for_taps_and_the_router_confirms_each_yes_once(airflow_db, sqlite_receiver, pepipost_conn):
    """The offer example with the sandbox tapping a button for half the recipients; then the router
    run by hand, as its half-hourly sweep: each "Yes, book it" tapper gets one confirmation, once,
    however often it runs, and nobody else gets one."""
    from airflow_provider_pepipost.status.store import StatusStore
    from airflow_provider_pepipost.triggers.replies import WhatsAppReplyTrigger

    store = StatusStore(sqlite_receiver.store_url)
    router_watcher = WhatsAppReplyTrigger(button_payloads=["YES_BOOK"], dag_id="whatsapp_offer_with_buttons")
    store.open_reply_cursor(router_watcher.feed_name())  # the router's watcher, as the triggerer starts it
    scenario = Scenario(final_mix={"read": 1.0}, status_delay=0.05, button_tap_ratio=0.5, seed=5)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        pepipost_conn(sandbox.url, sqlite_receiver.store_url)
        offer = run_dag("whatsapp_offer_with_buttons", audience_size=40)
        assert offer.state == "success", offer.tasks
        answered = offer.value("wait_for_answers")
        assert answered["recipients"] == 40 and answered["repliers"] >= 10
        sandbox.state.reports.stop(drain_seconds=10)  # every tap is in the store
        replies = store.replies_after(0, 1000)
        assert len(replies) == sandbox.state.reports.taps_queued  # every tap the sandbox made, filed
        yes = {reply.sender for reply in replies if reply.button_payload == "YES_BOOK"}
        assert 5 <= len(yes) <= 35, len(yes)

        router = run_dag("whatsapp_reply_router")
        assert router.state == "success", router.tasks
        claimed = router.value("claim_taps")
        assert {row["button_payload"] for row in claimed} == {"YES_BOOK"} and len(claimed) == len(yes)
        assert sorted(confirmed_numbers(sandbox)) == sorted(yes)

        again = run_dag("whatsapp_reply_router")  # nothing new: it skips, and sends nothing
        assert again.task_state("claim_taps") == "skipped"
        assert again.task_state("send_booking_confirmation") == "skipped"
        assert len(confirmed_numbers(sandbox)) == len(yes)


def confirmed_numbers(sandbox: SandboxServer) -> list[str]:
    """The numbers the sandbox accepted a ``slot_booked`` confirmation for, once per message."""
    messages = [accepted["body"]["message"][0] for accepted in sandbox.state.accepted]
    return [m["recipient_whatsapp"] for m in messages if m.get("type_template", [{}])[0].get("name") == "slot_booked"]


def asset_event_extra(uri: str, run_id: str) -> dict:
    """The extra of the event a run's task emitted on the asset ``uri``, from Airflow's database."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        extras = session.scalars(
            select(AssetEvent.extra).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetModel.uri == uri, AssetEvent.source_run_id == run_id)
        ).all()  # fmt: skip
    assert len(extras) == 1, (uri, extras)
    return extras[0]


@pytest.mark.timeout(700)  # above the demo's own 600 s: a hung demo fails this test, not the whole run
def test_make_demo_runs_the_campaign_end_to_end(tmp_path):
    """What `make demo` runs: sandbox and receiver processes, `airflow dags test`, the funnel; and its
    last lines are the README's, figure for figure (the sandbox's draws follow the recipients)."""
    run = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--workdir", str(tmp_path / "demo"),
         "--dags-folder", str(REPO / "dags_examples")],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    readme = (REPO / "README.md").read_text()
    shown = readme[readme.index("[demo] Delivery funnel") : readme.index("[demo] funnel matches")].splitlines()
    printed = run.stdout.splitlines()
    assert len(shown) > 8 and [line for line in shown if line not in printed] == []
    assert "funnel matches the sandbox scenario: yes" in run.stdout
    assert "as the approved template, where the 24-hour window was closed" in run.stdout
    assert "templates where the window was closed" in run.stdout + run.stderr  # the DAG's own report
    assert "then open http://localhost:8080/pepipost-campaigns/dags/whatsapp_template_campaign/runs/" in run.stdout
