"""Example: a DAG that runs once a campaign was sent and delivered, and reads its figures.

Each send task updates the asset `pepipost://campaign/<dag_id>/<task_id>` with its `send_summary`
as the event's extra, and `WhatsAppMessageStatusSensor` updates `pepipost://delivery/<dag_id>/<task_id>`
with the delivery counts. Scheduled on both, this DAG runs after every campaign of
`whatsapp_template_campaign` that was sent and whose wait succeeded, without knowing its schedule.

Triggered by hand, no asset event triggered the run: it reports on the latest campaign that was
delivered (read through the task's inlets), or, when there has been none yet, says so in its log
and skips.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, task

from airflow_provider_pepipost.version_compat import AIRFLOW_V_3_2_PLUS, AirflowSkipException

CAMPAIGN_SENT = Asset("pepipost://campaign/whatsapp_template_campaign/send_invoices")
CAMPAIGN_DELIVERED = Asset("pepipost://delivery/whatsapp_template_campaign/wait_for_delivery")
# How many of the latest send events a run triggered by hand looks through for its campaign's.
SENT_EVENTS_LOOKED_AT = 20


def latest(events, count: int) -> list:
    """The latest ``count`` events of an inlet, oldest first. Airflow 3.2+ reads only those; 3.1's
    ``inlet_events[asset]`` is every event of the asset, oldest first (no ``ascending``/``limit``)."""
    if AIRFLOW_V_3_2_PLUS:
        return list(events.ascending(False).limit(count))[::-1]
    return list(events)[-count:]


@dag(
    schedule=[CAMPAIGN_SENT, CAMPAIGN_DELIVERED],  # both updated since this DAG last ran
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "assets"],
)
def whatsapp_campaign_delivered_report():
    # [START howto_asset_latest_delivered_campaign]
    @task(inlets=[CAMPAIGN_SENT, CAMPAIGN_DELIVERED])
    def delivery_figures(triggering_asset_events=None, inlet_events=None) -> dict:
        """The send and delivery counts of the campaign, e.g. for a dashboard or a CRM."""
        delivered_events = list(triggering_asset_events[CAMPAIGN_DELIVERED]) if triggering_asset_events else []
        sent_events = list(triggering_asset_events[CAMPAIGN_SENT]) if triggering_asset_events else []
        if not delivered_events:  # triggered by hand: the latest campaign that was delivered
            delivered_events = latest(inlet_events[CAMPAIGN_DELIVERED], 1)
            sent_events = latest(inlet_events[CAMPAIGN_SENT], SENT_EVENTS_LOOKED_AT)
            if not delivered_events:
                raise AirflowSkipException(
                    "Nothing to report: no campaign of whatsapp_template_campaign has been delivered yet "
                    f"(no event on {CAMPAIGN_DELIVERED.uri}). Run that DAG first; this one then runs on its own."
                )
            print(f"Triggered by hand: the latest delivered campaign is run {delivered_events[-1].extra['run_id']}")
        delivered = delivered_events[-1].extra
        # The send event of the same campaign run (a mapped send task has one per map index).
        sent = [event.extra for event in sent_events if event.extra.get("run_id") == delivered["run_id"]]
        totals = {key: sum(s.get(key, 0) for s in sent) for key in ("accepted", "fallback", "rejected")}
        print(
            f"Campaign run {delivered['run_id']}: {totals['accepted']} session messages and {totals['fallback']} "
            f"templates sent, {totals['rejected']} refused; {delivered['total']} waited on, counts "
            f"{delivered['counts']}, {delivered['pending']} pending, {delivered['failed_total']} failed"
        )
        return {
            "run_id": delivered["run_id"],
            "accepted": totals["accepted"],
            "fallback": totals["fallback"],
            "total": delivered["total"],
            "counts": delivered["counts"],
        }
        # [END howto_asset_latest_delivered_campaign]

    delivery_figures()


whatsapp_campaign_delivered_report()
