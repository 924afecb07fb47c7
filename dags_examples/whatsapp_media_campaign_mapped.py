"""Example: one send task per audience segment (dynamic task mapping), one sensor over all of them."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example"],
    params={"segments": 3, "per_segment": 10},
)
def whatsapp_media_campaign_mapped():
    @task(show_return_value_in_logs=False)  # phone numbers stay out of the task log
    def build_segments(params=None) -> list[list[dict]]:
        return [
            [
                {"recipient_whatsapp": f"91970{segment:02d}{index:05d}", "segment": f"S{segment}"}
                for index in range(int(params["per_segment"]))
            ]
            for segment in range(int(params["segments"]))
        ]

    # [START howto_operator_whatsapp_media_mapped]
    send = SendWhatsAppMediaOperator.partial(
        task_id="send_segment",
        attachment_id="demo-brochure-pdf",
        caption="Your {segment} brochure",
        max_workers=4,
        max_rejected_ratio=0.1,  # a real audience holds a few numbers that are not on WhatsApp
    ).expand(recipients=build_segments())
    # [END howto_operator_whatsapp_media_mapped]

    # [START howto_sensor_whatsapp_status_reschedule]
    WhatsAppMessageStatusSensor(
        task_id="wait_for_delivery",
        message_ids=send.output,  # a list per mapped instance; the sensor flattens them
        target_status="sent",
        min_success_ratio=0.8,
        mode="reschedule",
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (docs/guarantees.md, "Limits")
        timeout=15 * 60,
    )
    # [END howto_sensor_whatsapp_status_reschedule]


whatsapp_media_campaign_mapped()
