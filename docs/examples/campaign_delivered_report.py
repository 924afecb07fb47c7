import pendulum
from airflow.sdk import Asset, dag, task

DELIVERED = Asset("pepipost://delivery/whatsapp_template_campaign/wait_for_delivery")


@dag(schedule=[DELIVERED], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def campaign_delivered_report():
    @task
    def figures(triggering_asset_events=None) -> dict:
        events = triggering_asset_events[DELIVERED]  # none when the run was triggered by hand
        return events[-1].extra if events else {}  # the counts of the wait

    figures()


campaign_delivered_report()
