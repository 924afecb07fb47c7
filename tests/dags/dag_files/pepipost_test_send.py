"""DAGs the send tests run with dag.test(): an upstream audience task feeding SendWhatsAppMediaOperator."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")
PARAMS = {"audience_size": 12, "bad_row": False}


@task
def build_audience(params=None) -> list[dict]:
    rows = [
        {"recipient_whatsapp": f"+91 983{index:07d}", "name": f"Customer {index}", "attachment_id": "media-invoice"}
        for index in range(int(params["audience_size"]))
    ]
    if params["bad_row"]:
        rows[3]["recipient_whatsapp"] = "12345"
    return rows


def send_dag(dag_id: str, *, native: bool = False, recipients=None, **send_kwargs) -> DAG:
    with DAG(dag_id, schedule=None, start_date=START, params=PARAMS, render_template_as_native_obj=native) as dag:
        audience = build_audience()
        send = SendWhatsAppMediaOperator(
            task_id="send",
            recipients=recipients if recipients is not None else audience,
            caption="Hi {name}, your invoice of {{ ds }}",
            max_workers=4,
            retry_delay=timedelta(0),
            **send_kwargs,
        )
        audience >> send
    return dag


send_basic = send_dag("pepipost_send_basic")
send_native_template = send_dag(
    "pepipost_send_native_template", native=True, recipients="{{ ti.xcom_pull(task_ids='build_audience') }}"
)
send_text_template = send_dag("pepipost_send_text_template", recipients="{{ ti.xcom_pull(task_ids='build_audience') }}")
send_tolerant = send_dag("pepipost_send_tolerant", max_rejected_ratio=0.5)
send_with_retries = send_dag("pepipost_send_with_retries", retries=3)
send_ledger_ref = send_dag("pepipost_send_ledger_ref", xcom_ids_limit=5)


with DAG(
    "pepipost_send_mapped", schedule=None, start_date=START, params={"segments": 3, "per_segment": 4}
) as send_mapped:

    @task
    def build_segments(params=None) -> list[list[str]]:
        return [
            [f"91970{segment:02d}{index:05d}" for index in range(int(params["per_segment"]))]
            for segment in range(int(params["segments"]))
        ]

    SendWhatsAppMediaOperator.partial(task_id="send", attachment_id="media-brochure", max_workers=2).expand(
        recipients=build_segments()
    )
