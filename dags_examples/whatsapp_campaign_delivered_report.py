"""Example: a DAG that runs when a campaign's delivery wait succeeds, and reads its figures.

`WhatsAppMessageStatusSensor` updates the asset `pepipost://delivery/<dag_id>/<task_id>` with
the delivery counts as the event's extra (and each send task updates
`pepipost://campaign/<dag_id>/<task_id>` with its `send_summary`). Scheduling on the asset runs
this DAG after every successful wait of `whatsapp_template_campaign`, without knowing its schedule.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

CAMPAIGN_DELIVERED = Asset("pepipost://delivery/whatsapp_template_campaign/wait_for_delivery")


@dag(
    schedule=[CAMPAIGN_DELIVERED],
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "assets"],
)
def whatsapp_campaign_delivered_report():
    @task
    def delivery_figures(triggering_asset_events=None) -> dict:
        """The counts of the wait(s) that triggered this run, e.g. for a dashboard or a CRM."""
        events = triggering_asset_events[CAMPAIGN_DELIVERED]
        latest = events[-1].extra
        print(
            f"Campaign run {latest['run_id']}: {latest['total']} messages, counts {latest['counts']}, "
            f"{latest['pending']} pending, {latest['failed_total']} failed ({len(events)} event(s) in this run)"
        )
        return {"run_id": latest["run_id"], "total": latest["total"], "counts": latest["counts"]}

    delivery_figures()


whatsapp_campaign_delivered_report()
