"""DAG the secrets test runs with `airflow dags test`: send, then a sensor that fails on purpose."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor

with DAG("pepipost_secrets", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    send = SendWhatsAppMediaOperator(
        task_id="send",
        recipients=[f"9196{index:08d}" for index in range(5)],
        attachment_id="media-1",
        caption="Hello",
    )
    WhatsAppMessageStatusSensor(task_id="wait", message_ids=send.output, timeout=1, poke_interval=0.2)
