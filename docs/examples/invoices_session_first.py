import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def invoices_session_first():
    @task(show_return_value_in_logs=False)  # the rows hold phone numbers: keep them out of the task log
    def build_audience() -> list[dict]:
        return [{"recipient_whatsapp": "+91 98330 78369", "name": "Asha", "invoice": "INV-1042"}]

    SendWhatsAppMediaOperator(
        task_id="send_invoices",
        recipients=build_audience(),
        attachment_id="1fc380aa-6953-4e95-aef9-f220a22d51a3",  # from Pepipost's Media API
        caption="Hi {name}, here is invoice {invoice}.",
        fallback_template={
            "template_name": "invoice_ready",
            "language": "en",
            "attributes": ["{name}", "{invoice}"],
            "media_url": "https://cdn.example.com/inv.pdf",
            "media_type": "document",
        },
    )


invoices_session_first()
