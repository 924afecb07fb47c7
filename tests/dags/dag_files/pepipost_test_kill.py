"""DAG the kill-and-retry test runs with `airflow tasks test`: one send task of 3,000 recipients."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

with DAG("pepipost_kill", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    SendWhatsAppMediaOperator(
        task_id="send",
        recipients=[f"9197{index:08d}" for index in range(3000)],
        attachment_id="media-1",
        caption="Your statement is ready",
        max_workers=8,
        progress_interval=1,
    )
