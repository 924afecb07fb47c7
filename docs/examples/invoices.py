import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor

STORE = "pepipost_status_store"  # or set [pepipost] status_store_conn_id once for every part


# schedule=None: it runs when triggered. With a schedule such as "@daily", unpausing the DAG
# starts a run for the latest interval at once, and that run sends.
@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def invoices():
    @task(show_return_value_in_logs=False)  # the rows hold phone numbers: keep them out of the task log
    def build_audience() -> list[dict]:
        return [
            {
                "recipient_whatsapp": "+91 98330 78369",
                "name": "Asha",
                # the id Pepipost's Media API returned for the uploaded file (see below)
                "attachment_id": "1fc380aa-6953-4e95-aef9-f220a22d51a3",
            }
        ]

    send = SendWhatsAppMediaOperator(
        task_id="send_invoices",
        recipients=build_audience(),  # or "{{ ti.xcom_pull(task_ids='build_audience') }}"
        # {name} from the row; Jinja from Airflow. A run triggered by hand has no logical date,
        # so {{ ds }} is undefined there: dag_run.run_after always exists.
        caption="Hi {name}, your invoice of {{ dag_run.run_after | ds }}",
        max_workers=16,
        max_rate=50,
        max_rejected_ratio=0.02,
        status_store_conn_id=STORE,
    )
    WhatsAppMessageStatusSensor(
        task_id="wait",
        message_ids=send.output,
        target_status="delivered",
        min_success_ratio=0.95,
        deferrable=True,
        poke_interval=15,  # read the store every 15 s (Airflow's default of 60 s waits a minute for a 2 s report)
        timeout=60 * 60,  # fail after an hour below the ratio
        status_store_conn_id=STORE,  # the store the send wrote to
    )


invoices()
