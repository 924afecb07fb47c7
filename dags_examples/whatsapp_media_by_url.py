"""Example: media by URL instead of an uploaded media id, recipients from a JSON Lines file in object storage.

`export_audience` stands for a CRM export: it writes the audience as JSON Lines under
`audience_root` (any ObjectStoragePath URL), and returns the file's URL, not the rows: phone
numbers stay out of XCom, and large audiences stream from the file. The send task reads the file
wherever it runs; `remove_audience` deletes it once the send is over, whatever its outcome, so no
file of phone numbers stays behind.

The default root is this machine's temporary directory, which only tasks on this machine reach.
Where tasks run on several machines (Celery, Kubernetes), trigger with `audience_root` set to
storage every worker reaches, e.g. `s3://aws_default@my-bucket/pepipost-audiences` (the Amazon
provider installed; `aws_default` is the connection). To send again after the run, clear from
`export_audience` on: the file is gone, and the send's idempotency keys make it send nothing twice.
"""

from __future__ import annotations

import json
import re
import tempfile

import pendulum
from airflow.sdk import ObjectStoragePath, dag, task

from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppMessageStatusSensor


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["pepipost", "whatsapp", "example"],
    params={"audience_size": 15, "audience_root": f"file://{tempfile.gettempdir()}/pepipost-audiences"},
)
def whatsapp_media_by_url():
    @task
    def export_audience(params=None, dag_run=None) -> str:
        """Write the audience to <audience_root>/<dag>/<run>/audience.jsonl; return its URL."""
        folder = ObjectStoragePath(params["audience_root"]) / dag_run.dag_id / re.sub(r"[^\w.-]", "_", dag_run.run_id)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "audience.jsonl"
        with path.open("w") as handle:
            for index in range(int(params["audience_size"])):
                handle.write(json.dumps({"recipient_whatsapp": f"4479{index:08d}", "first_name": f"Ann{index}"}) + "\n")
        return str(path)

    # [START howto_operator_whatsapp_media_by_url]
    audience = export_audience()
    send = SendWhatsAppMediaOperator(
        task_id="send_video",
        recipients=audience,  # the file's URL: the operator streams the rows from it
        attachment_url="https://cdn.example.com/spring-launch.mp4",
        attachment_type="video",
        caption="{first_name}, see what is new this spring",
        max_rejected_ratio=0.1,  # a real audience holds a few numbers that are not on WhatsApp
    )
    # [END howto_operator_whatsapp_media_by_url]

    @task(trigger_rule="all_done")  # also when the send failed: the file holds phone numbers
    def remove_audience(path: str) -> None:
        audience_file = ObjectStoragePath(path)
        if audience_file.exists():
            audience_file.unlink()
        if not any(audience_file.parent.iterdir()):
            audience_file.parent.rmdir()
        print(f"Removed the audience file {path}")

    send >> remove_audience(audience)

    WhatsAppMessageStatusSensor(
        task_id="wait_for_read",
        message_ids=send.output,
        target_status="read",
        min_success_ratio=0.5,
        poke_interval=15,  # under ~15 s a busy scheduler can trip apache/airflow#66374 (docs/guarantees.md, "Limits")
        timeout=15 * 60,
    )


whatsapp_media_by_url()
