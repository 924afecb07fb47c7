"""DAGs the status tests run with dag.test(): send, then wait on delivery reports in each sensor mode."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor

START = pendulum.datetime(2026, 1, 1, tz="UTC")


def status_dag(dag_id: str, *, xcom_ids_limit: int = 10_000, timeout: float = 120, **sensor_kwargs) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START, params={"audience_size": 20}) as dag:

        @task
        def build_audience(params=None) -> list[str]:
            return [f"9198{index:08d}" for index in range(int(params["audience_size"]))]

        send = SendWhatsAppMediaOperator(
            task_id="send",
            recipients=build_audience(),
            attachment_id="media-1",
            caption="Your order has shipped",
            max_workers=4,
            xcom_ids_limit=xcom_ids_limit,
        )
        WhatsAppMessageStatusSensor(
            task_id="wait",
            message_ids=send.output,
            poke_interval=0.5,
            timeout=timeout,
            retry_delay=timedelta(0),
            **sensor_kwargs,
        )
    return dag


status_poke = status_dag("pepipost_status_poke", target_status="delivered", min_success_ratio=0.8, mode="poke")
status_reschedule = status_dag(
    "pepipost_status_reschedule", target_status="delivered", min_success_ratio=0.8, mode="reschedule"
)
status_deferrable = status_dag(
    "pepipost_status_deferrable", target_status="delivered", min_success_ratio=0.8, deferrable=True
)
status_all_read = status_dag("pepipost_status_all_read", target_status="read", min_success_ratio=1.0, deferrable=True)
status_ledger_ref = status_dag(
    "pepipost_status_ledger_ref", target_status="delivered", min_success_ratio=0.8, xcom_ids_limit=5, deferrable=True
)
status_short_timeout = status_dag("pepipost_status_short_timeout", target_status="read", deferrable=True, timeout=2)
