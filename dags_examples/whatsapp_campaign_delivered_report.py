"""Example: a DAG that runs once a campaign was sent and delivered, and reads its figures.

Each send task updates the asset `pepipost://campaign/<dag_id>/<task_id>` with its `send_summary`
as the event's extra, and `WhatsAppMessageStatusSensor` updates `pepipost://delivery/<dag_id>/<task_id>`
with the delivery counts. Scheduled on both, this DAG runs after every campaign of
`whatsapp_template_campaign` that was sent and whose wait succeeded, without knowing its schedule.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

CAMPAIGN_SENT = Asset("pepipost://campaign/whatsapp_template_campaign/send_invoices")
CAMPAIGN_DELIVERED = Asset("pepipost://delivery/whatsapp_template_campaign/wait_for_delivery")


@dag(
    schedule=[CAMPAIGN_SENT, CAMPAIGN_DELIVERED],  # both updated since this DAG last ran
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "assets"],
)
def whatsapp_campaign_delivered_report():
    @task
    def delivery_figures(triggering_asset_events=None) -> dict:
        """The send and delivery counts that triggered this run, e.g. for a dashboard or a CRM."""
        sent = triggering_asset_events[CAMPAIGN_SENT][-1].extra
        delivered = triggering_asset_events[CAMPAIGN_DELIVERED][-1].extra
        print(
            f"Campaign run {delivered['run_id']}: {sent['accepted']} session messages and {sent['fallback']} "
            f"templates sent, {sent['rejected']} refused; {delivered['total']} waited on, counts "
            f"{delivered['counts']}, {delivered['pending']} pending, {delivered['failed_total']} failed"
        )
        return {
            "run_id": delivered["run_id"],
            "accepted": sent["accepted"],
            "fallback": sent["fallback"],
            "total": delivered["total"],
            "counts": delivered["counts"],
        }

    delivery_figures()


whatsapp_campaign_delivered_report()
