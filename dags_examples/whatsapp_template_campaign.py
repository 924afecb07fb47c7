"""Example: a cold audience. Session media first; the approved template where the 24-hour window is closed.

WhatsApp delivers a session (media) message only to people who wrote to the business in the last
24 hours; the others get 8007. `fallback_template` sends those rows the approved template instead,
in the same task, once, across retries. Runs as-is against the local sandbox (`make demo`), whose
scenario approves the template `invoice_ready` (locale en, two variables, a document header).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import XComArg, dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example"],
    params={"audience_size": 60},
)
def whatsapp_template_campaign():
    @task(show_return_value_in_logs=False)  # phone numbers stay out of the task log
    def build_audience(params=None) -> list[dict]:
        """In production: customers with an invoice due, most of whom have not written to you lately."""
        return [
            {"recipient_whatsapp": f"+91 96{index:08d}", "name": f"Customer {index}", "invoice": f"INV-{index:04d}"}
            for index in range(int(params["audience_size"]))
        ]

    # [START howto_operator_whatsapp_media_fallback_template]
    send = SendWhatsAppMediaOperator(
        task_id="send_invoices",
        recipients=build_audience(),
        attachment_id="demo-invoice-pdf",
        caption="Hi {name}, here is invoice {invoice}.",
        fallback_template={
            "template_name": "invoice_ready",
            "language": "en",
            "attributes": ["{name}", "{invoice}"],
            "media_url": "https://cdn.example.com/invoices/latest.pdf",
            "media_type": "document",
        },
        max_rejected_ratio=0.1,  # a real audience holds a few numbers that are not on WhatsApp
        retries=2,
    )
    # [END howto_operator_whatsapp_media_fallback_template]

    wait = WhatsAppMessageStatusSensor(
        task_id="wait_for_delivery",
        message_ids=send.output,  # session and template messages alike
        target_status="delivered",
        min_success_ratio=0.75,
        deferrable=True,
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (docs/guarantees.md, "Limits")
        timeout=15 * 60,
    )

    @task
    def report(summary: dict, delivery: dict) -> dict:
        """How many went each way, and how many arrived."""
        print(
            f"Session messages accepted: {summary['accepted']}; templates where the window was closed: "
            f"{summary['fallback']}; rejected: {summary['rejected']}; delivery counts: {delivery['counts']}"
        )
        return {"session": summary["accepted"], "template": summary["fallback"]}

    report(XComArg(send, key="send_summary"), wait.output)


whatsapp_template_campaign()
