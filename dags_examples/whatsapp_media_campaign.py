"""Example campaign: build the audience, send each customer their invoice on WhatsApp, wait for delivery, report.

Runs as-is against the local sandbox (`pepipost-sandbox` with its default scenario, the connection
pointing at it, then `airflow dags test whatsapp_media_campaign`); point the `pepipost_default`
connection at https://waapi.pepipost.com with a real key to run it for real. It sends session
(media) messages only, so it is not what `make demo` runs: the demo's audience has not written in
24 hours for 30 % of its numbers, which a session message cannot reach (8007, over this DAG's
`max_rejected_ratio`); `whatsapp_template_campaign` sends those the approved template instead.
"""

from __future__ import annotations

import time

import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example"],
    params={"audience_size": 40, "attachment_id": "demo-invoice-pdf", "settle_seconds": 5},
)
def whatsapp_media_campaign():
    @task(show_return_value_in_logs=False)  # phone numbers stay out of the task log
    def build_audience(params=None) -> list[dict]:
        """In production: a query against the CRM. Here: synthetic customers."""
        return [
            {
                "recipient_whatsapp": f"+91 98{index:08d}",
                "name": f"Customer {index}",
                "attachment_id": params["attachment_id"],
            }
            for index in range(int(params["audience_size"]))
        ]

    # [START howto_operator_whatsapp_media]
    send = SendWhatsAppMediaOperator(
        task_id="send_invoices",
        recipients=build_audience(),
        # A run triggered by hand has no logical date ({{ ds }} is undefined there); run_after always exists.
        caption="Hi {name}, here is your invoice of {{ dag_run.run_after | ds }}.",
        max_workers=8,
        max_rejected_ratio=0.05,
        retries=2,
    )
    # [END howto_operator_whatsapp_media]

    # [START howto_sensor_whatsapp_status_deferrable]
    wait = WhatsAppMessageStatusSensor(
        task_id="wait_for_delivery",
        message_ids=send.output,
        target_status="delivered",
        min_success_ratio=0.75,
        deferrable=True,
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (docs/guarantees.md, "Limits")
        timeout=15 * 60,
    )
    # [END howto_sensor_whatsapp_status_deferrable]

    # [START howto_xcom_parse_message_targets]
    @task
    def report(message_ids: list, sensor_summary: dict, params=None) -> dict:
        """Print the delivery funnel, once late reports have settled."""
        from airflow_provider_pepipost.operators.xcom import parse_message_targets
        from airflow_provider_pepipost.status.store import StatusStore

        store = StatusStore()  # the store every part resolves: [pepipost] status_store_conn_id, or the default
        targets = parse_message_targets(message_ids)
        deadline = time.monotonic() + float(params["settle_seconds"])
        funnel = store.summarize(targets).funnel()
        while time.monotonic() < deadline:
            time.sleep(1)
            latest = store.summarize(targets).funnel()
            if latest == funnel:
                break
            funnel = latest
        summary = store.summarize(targets)
        print(f"Delivery funnel for {funnel['total']} messages (sensor saw {sensor_summary['counts']}):")
        for stage in ("sent", "delivered", "read", "failed", "pending", "unknown"):
            print(f"  {stage:<10}{funnel[stage]:>6}")
        for failed in summary.failed[:10]:
            print(f"  failed {failed['message_id']}: {failed['remark']}")
        return funnel
        # [END howto_xcom_parse_message_targets]

    report(send.output, wait.output)


whatsapp_media_campaign()
