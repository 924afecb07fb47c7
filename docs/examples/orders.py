import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.notifications.whatsapp import WhatsAppTemplateNotifier

alert = WhatsAppTemplateNotifier(
    recipients=["+91 98000 00001", "919800000002"],
    template_name="airflow_task_alert",  # "{{1}} failed in {{2}} (run {{3}}, try {{4}}). Log: {{5}}"
    # the default attributes: task id, DAG id, run id, try number, log URL
    attributes=["{{ ti.task_id }}", "{{ dag.dag_id }}", "{{ run_id }}", "{{ ti.try_number }}", "{{ ti.log_url }}"],
)


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def orders():
    @task(on_failure_callback=alert)
    def load_orders(): ...

    load_orders()


orders()
