"""The example DAGs under Airflow's own components, triggered by hand as a person would.

`dag.test()` is not Airflow: it always sets a logical date, runs triggers inline and skips the
scheduler. Here the api-server, scheduler, dag-processor and triggerer run as separate processes
(LocalExecutor, PostgreSQL as the metadata database), with the sandbox and the receiver beside
them. Every example DAG is triggered with `airflow dags trigger` (no logical date) and must
succeed, its deferrable sensor waiting in the real triggerer; the report DAG, scheduled on the
template campaign's assets, runs on them and is also triggered by hand, before any campaign
(nothing to report: it says so and skips) and after one (the latest campaign's figures). Delivery
reports go first to the standalone `pepipost-webhook`, then to the receiver the plugin mounts in
the api-server.

Metrics, end to end: Airflow sends its StatsD metrics to a listener here, and the send task's and
the sensor's counters must match the campaign's own summary; each receiver's `/metrics` scrape
must count what the store holds from it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy

from airflow_provider_pepipost.status.store import StatusStore
from tests.conftest import connection_json, store_env
from tests.helpers import StatsdListener, free_port, scrape_metrics, wait_until
from tests.system.stack import EXAMPLES_SCENARIO, AirflowStack, Sandbox, start_receiver

pytestmark = pytest.mark.system

EXAMPLES = [
    "whatsapp_media_campaign",
    "whatsapp_media_campaign_mapped",
    "whatsapp_media_by_url",
    "whatsapp_template_campaign",
    "whatsapp_opt_in_then_campaign",
    "pepipost_store_maintenance",
]
# Scheduled on the assets of the template campaign; also triggered by hand, before and after one.
DOWNSTREAM = "whatsapp_campaign_delivered_report"
TOKEN = "system-test-webhook-token"


def test_every_example_succeeds_when_triggered_by_hand_under_the_real_scheduler(tmp_path, fresh_database):
    store_url = fresh_database()
    sandbox = Sandbox()
    statsd = StatsdListener()
    env = {"AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url), "PEPIPOST_WEBHOOK_TOKEN": TOKEN}
    stack = AirflowStack(tmp_path, fresh_database(), {**env, **store_env(store_url), **statsd.env()})
    try:
        receiver_url = start_receiver(stack.procs, "receiver", free_port())
        sandbox.start(stack.procs, receiver_url, EXAMPLES_SCENARIO)
        stack.start([*EXAMPLES, DOWNSTREAM])

        # Round 0: the report DAG by hand before any campaign: it says there is nothing to report, and skips.
        stack.trigger(DOWNSTREAM, "manual-0-report")
        stack.wait_for_runs([DOWNSTREAM], 1)
        assert task_state(stack, DOWNSTREAM, "manual-0-report", "delivery_figures") == "skipped"
        assert "Nothing to report: no campaign of whatsapp_template_campaign" in task_log(
            stack, DOWNSTREAM, "manual-0-report", "delivery_figures"
        )

        # Round 1: by hand, no logical date; reports to the standalone receiver.
        audiences = tmp_path / "audiences"
        confs = {"whatsapp_media_by_url": {"audience_root": f"file://{audiences}"}}
        for dag_id in EXAMPLES:
            stack.trigger(dag_id, f"manual-1-{dag_id}", confs.get(dag_id))
        stack.wait_for_runs(EXAMPLES, 1)
        runs = stack.run_states(EXAMPLES)
        # Triggered by hand: no logical date (the nightly maintenance DAG also makes its scheduled run).
        manual = [date for runs_ in runs.values() for run_id, _, date in runs_ if run_id.startswith("manual-")]
        assert len(manual) >= len(EXAMPLES) and all(logical_date is None for logical_date in manual)
        assert [p for p in audiences.rglob("*") if p.is_file()] == []  # the audience file was removed
        sent_by_url = xcom(
            stack, "whatsapp_media_by_url", "manual-1-whatsapp_media_by_url", "send_video", "send_summary"
        )
        assert sent_by_url["total"] == 15
        # The campaign's two assets (sent, delivered) ran the downstream DAG, which read the figures.
        stack.wait_for_runs([DOWNSTREAM], 2)
        first_run = "manual-1-whatsapp_template_campaign"
        waited = xcom(stack, "whatsapp_template_campaign", first_run, "wait_for_delivery")
        runs = stack.run_states([DOWNSTREAM])[DOWNSTREAM]
        (downstream_run,) = [run_id for run_id, _, _ in runs if not run_id.startswith("manual-")]
        figures = xcom(stack, DOWNSTREAM, downstream_run, "delivery_figures")
        summary = xcom(stack, "whatsapp_template_campaign", first_run, "send_invoices", "send_summary")
        expected = {"run_id": first_run, "accepted": summary["accepted"], "fallback": summary["fallback"]}
        assert figures == {**expected, "total": waited["total"], "counts": waited["counts"]}
        # Airflow's StatsD metrics from the send task and the sensor say what their XComs say.
        send = {"dag_id": "whatsapp_template_campaign", "task_id": "send_invoices"}
        for state in ("accepted", "fallback", "rejected", "unknown", "suppressed"):
            name = f"airflow.pepipost.send.{state}"
            counted = wait_until(lambda name=name, state=state: statsd.total(name, **send) == summary[state], 10)
            assert counted, (state, summary, statsd.metric(name, **send))
        assert [kind for _, kind in statsd.metric("airflow.pepipost.send.duration", **send)] == ["ms"]
        sensor = {"dag_id": "whatsapp_template_campaign", "task_id": "wait_for_delivery"}
        assert statsd.total("airflow.pepipost.delivery.reached", **sensor) == 1
        ((waited_ms, kind),) = statsd.metric("airflow.pepipost.delivery.time_to_delivered", **sensor)
        assert kind == "ms" and waited_ms > 0
        # By hand now: it reports on the latest delivered campaign, the same figures.
        stack.trigger(DOWNSTREAM, "manual-1-report")
        stack.wait_for_runs([DOWNSTREAM], 3)
        assert xcom(stack, DOWNSTREAM, "manual-1-report", "delivery_figures") == figures
        assert xcom(stack, "whatsapp_opt_in_then_campaign", "manual-1-whatsapp_opt_in_then_campaign",
                    "simulate_stop_reply") is True  # fmt: skip

        # Round 2: a cold audience (the 24-hour window closed for 40 %): the template campaign
        # falls back to its template; reports to the receiver the plugin mounts in the api-server.
        sandbox.drain()  # the STOP reply of round 1 reaches the store before its sandbox stops
        sandbox.stop()
        # The standalone receiver's scrape counts every report event the store holds, and the STOP.
        store = StatusStore(store_url)
        round_1_events = store.count_rows("pepipost_events")
        standalone = scrape_metrics(receiver_url.removesuffix("/webhook") + "/metrics", TOKEN)
        assert standalone["pepipost_receiver_reports_total", (("result", "accepted"),)] == round_1_events > 0
        assert standalone["pepipost_receiver_opt_outs_total", ()] == 1
        assert standalone["pepipost_receiver_store_errors_total", ()] == 0
        cold = {**EXAMPLES_SCENARIO, "closed_window_ratio": 0.4}
        sandbox.start(stack.procs, f"{stack.api_url}/pepipost/webhook", cold)
        stack.trigger("whatsapp_template_campaign", "manual-2-whatsapp_template_campaign")
        # The subscriber who replied STOP in round 1 is neither opted in again nor messaged.
        conf = {"simulate_stop_reply": False}
        stack.trigger("whatsapp_opt_in_then_campaign", "manual-2-whatsapp_opt_in_then_campaign", conf)
        stack.wait_for_runs(["whatsapp_template_campaign", "whatsapp_opt_in_then_campaign"], 2)
        second = "manual-2-whatsapp_opt_in_then_campaign"
        assert xcom(stack, "whatsapp_opt_in_then_campaign", second, "report")["suppressed"] == 1
        opt_in = xcom(stack, "whatsapp_opt_in_then_campaign", second, "opt_in_signups")
        assert (opt_in["skipped_opted_out"], opt_in["reply_opt_outs_synced"]) == (1, 1)

        stats = sandbox.drain()
        assert stats["reports"]["events_lost"] == 0, stats
        # The receiver the plugin mounts in the api-server counts round 2's events: the rest of the store.
        mounted = scrape_metrics(f"{stack.api_url}/pepipost/metrics", TOKEN)
        round_2_events = store.count_rows("pepipost_events") - round_1_events
        assert mounted["pepipost_receiver_reports_total", (("result", "accepted"),)] == round_2_events > 0
        assert stats["accepted_by_type"]["template"] > 0 and stats["responses"]["8007"] > 0, stats
        # The deferrable sensor waited in the triggerer: its trigger's log sits beside the task log.
        trigger_logs = list((stack.home / "logs").rglob("task_id=wait_for_delivery/*.trigger.*.log"))
        assert any("trigger completed" in log.read_text(errors="replace") for log in trigger_logs), stack.procs.tails()
        stack.procs.alive()
    finally:
        stack.stop()
        statsd.close()


def task_state(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str:
    (state,) = [ti["state"] for ti in stack.task_instances(dag_id, run_id) if ti["task_id"] == task_id]
    return state


def task_log(stack: AirflowStack, dag_id: str, run_id: str, task_id: str) -> str:
    """The task's log files (every try) as Airflow wrote them under its home."""
    folder = stack.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}"
    return "".join(log.read_text(errors="replace") for log in sorted(folder.glob("*.log")))


def xcom(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
    """A task's XCom as Airflow's database holds it (JSON)."""
    query = sqlalchemy.text(
        "SELECT value FROM xcom WHERE dag_id = :dag AND run_id = :run AND task_id = :task AND key = :key"
    )
    with stack.metadata.connect() as conn:
        value = conn.execute(query, {"dag": dag_id, "run": run_id, "task": task_id, "key": key}).scalar_one()
    return json.loads(value) if isinstance(value, str) else value
