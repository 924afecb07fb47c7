"""Example: an offer as an approved template with two quick-reply buttons, and a wait for the answers.

The template `slot_offer` was approved with the quick replies "Yes, book it" (payload `YES_BOOK`)
and "Not now" (`NOT_NOW`): the send body is that of any template, and a tap comes back to the
webhook as a customer message that answers this send. `WhatsAppReplySensor` waits until a quarter
of the recipients tapped a button; `whatsapp_reply_router`, scheduled on the taps themselves,
books each "yes" as it comes. Runs as-is against the local sandbox (`make demo`), whose scenario
approves `slot_offer`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppReplySensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example", "replies"],
    params={"audience_size": 60},
)
def whatsapp_offer_with_buttons():
    @task(show_return_value_in_logs=False)  # phone numbers stay out of the task log
    def build_audience(params=None) -> list[dict]:
        """In production: customers due a service, from your CRM."""
        return [
            {"recipient_whatsapp": f"+91 97{index:08d}", "name": f"Customer {index}"}
            for index in range(int(params["audience_size"]))
        ]

    # [START howto_sensor_whatsapp_reply]
    offer = SendWhatsAppTemplateOperator(
        task_id="send_offer",
        recipients=build_audience(),
        template_name="slot_offer",
        language="en",
        attributes=["{name}"],
        max_rejected_ratio=0.1,
        retries=2,
    )

    WhatsAppReplySensor(
        task_id="wait_for_answers",
        message_ids=offer.output,
        kinds=["button"],
        min_ratio=0.25,  # a quarter of the recipients tapped a button
        deferrable=True,
        poke_interval=15,
        timeout=60 * 60,
    )
    # [END howto_sensor_whatsapp_reply]


whatsapp_offer_with_buttons()
