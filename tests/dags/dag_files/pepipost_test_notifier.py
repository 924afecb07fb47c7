"""A DAG whose task fails, and whose failure callback sends the on-call phones a WhatsApp template."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task

from airflow_provider_pepipost.notifications.whatsapp import WhatsAppTemplateNotifier

ON_CALL = ["+91 98000 00001", "919800000002"]

with DAG("pepipost_test_notifier", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):

    @task(
        on_failure_callback=WhatsAppTemplateNotifier(recipients=ON_CALL, template_name="airflow_task_alert"),
        retries=0,
    )
    def load_orders() -> None:
        raise RuntimeError("the orders file is empty")

    load_orders()
