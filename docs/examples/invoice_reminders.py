import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppTemplateOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def invoice_reminders():
    @task(show_return_value_in_logs=False)  # the rows hold phone numbers: keep them out of the task log
    def build_audience() -> list[dict]:
        return [{"recipient_whatsapp": "+91 98330 78369", "name": "Asha", "invoice": "INV-1042"}]

    SendWhatsAppTemplateOperator(
        task_id="remind",
        recipients=build_audience(),  # as for media: list, XCom, CSV / JSON Lines path
        template_name="invoice_ready",  # a row's own template_name wins
        language="en",  # the approved locale; language_policy optional
        attributes=["{name}", "{invoice}"],  # the template's variables, filled from each row
        media_url="https://cdn.example.com/inv.pdf",
        media_type="document",  # optional media header
        ttl=2,  # optional, whole days
    )


invoice_reminders()
