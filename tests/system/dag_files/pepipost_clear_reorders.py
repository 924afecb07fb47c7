"""A mapped campaign whose upstream lists its segments in another order after each clear, as a file
listing, a set or an unordered query may: the system test clears it and counts what the sandbox got."""

from __future__ import annotations

import pendulum
from airflow.sdk import dag, get_current_context, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

SEGMENTS = [[f"9198{segment}{i:07d}" for i in range(10)] for segment in range(3)]


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["pepipost-test"])
def pepipost_clear_reorders():
    @task(show_return_value_in_logs=False)
    def segments() -> list[list[str]]:
        cleared = get_current_context()["dag_run"].clear_number or 0
        return SEGMENTS[::-1] if cleared % 2 else SEGMENTS

    # Whole numbers in XCom: the test tells the segments apart by them (the masks would look alike).
    SendWhatsAppMediaOperator.partial(
        task_id="send", attachment_id="media-1", max_workers=4, xcom_full_numbers=True
    ).expand(recipients=segments())


pepipost_clear_reorders()
