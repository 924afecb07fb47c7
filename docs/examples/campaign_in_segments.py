import pendulum
from airflow.sdk import dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False)
def campaign_in_segments():
    # [START howto_operator_whatsapp_media_segments]
    @task
    def segment_files() -> list[str]:
        """Write the audience as files of 10,000 rows; return their paths (small XCom)."""
        # Your export goes here: one .jsonl file per 10,000 rows, where every worker can read it.
        return ["s3://campaigns/spring/seg-0000.jsonl", "s3://campaigns/spring/seg-0001.jsonl"]

    send = SendWhatsAppMediaOperator.partial(
        task_id="send_segment",
        attachment_id="1fc380aa-6953-4e95-aef9-f220a22d51a3",
        caption="Hi {name}, here is what is new this spring.",
        pool="pepipost",  # shares the vendor's rate limit: see below
        max_rate=45,  # messages per second, per task
        xcom_ids_limit=1_000,  # each segment returns one ledger reference, not 10,000 ids
        retries=2,
    ).expand(recipients=segment_files())

    WhatsAppMessageStatusSensor(
        task_id="wait_for_delivery",
        message_ids=send.output,  # a list per mapped instance; the sensor flattens them
        target_status="delivered",
        min_success_ratio=0.95,
        deferrable=True,
        poke_interval=30,
        timeout=4 * 60 * 60,  # the campaign's send time, and some
    )
    # [END howto_operator_whatsapp_media_segments]


campaign_in_segments()
