"""Keeps the status store's size in check: every night, delete what is older than 90 days.

Delivery events, replies, dead letters and finished ledger rows older than the cut-off go, in short
batches, while the receiver keeps writing; the suppression list stays, so a STOP is never
forgotten. Erasing one person on request is `pepipost-store erase NUMBER` (docs/status-store.md, "Retention and
erasure").
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from airflow_provider_pepipost.operators.maintenance import PurgeStatusStoreOperator


# [START howto_operator_purge_status_store]
@dag(
    schedule="@daily",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["pepipost", "example", "maintenance"],
)
def pepipost_store_maintenance():
    PurgeStatusStoreOperator(task_id="purge_older_than_90_days", older_than_days=90)
    # [END howto_operator_purge_status_store]


pepipost_store_maintenance()
