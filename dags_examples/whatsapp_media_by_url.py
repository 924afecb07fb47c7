"""Example: media by URL instead of an uploaded media id, recipients from a JSON Lines file."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example"],
    params={"audience_size": 15},
)
def whatsapp_media_by_url():
    @task
    def export_audience(params=None) -> str:
        """Write the audience to a JSON Lines file; large audiences stream from files like this one."""
        path = Path(tempfile.mkdtemp(prefix="pepipost-audience-")) / "audience.jsonl"
        with path.open("w") as handle:
            for index in range(int(params["audience_size"])):
                handle.write(json.dumps({"recipient_whatsapp": f"4479{index:08d}", "first_name": f"Ann{index}"}) + "\n")
        return str(path)

    send = SendWhatsAppMediaOperator(
        task_id="send_video",
        recipients=export_audience(),
        attachment_url="https://cdn.example.com/spring-launch.mp4",
        attachment_type="video",
        caption="{first_name}, see what is new this spring",
        max_rejected_ratio=0.1,  # a real audience holds a few numbers that are not on WhatsApp
    )

    WhatsAppMessageStatusSensor(
        task_id="wait_for_read",
        message_ids=send.output,
        target_status="read",
        min_success_ratio=0.5,
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (see README)
        timeout=15 * 60,
    )


whatsapp_media_by_url()
