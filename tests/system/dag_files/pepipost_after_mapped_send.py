"""Scheduled on the mapped send's campaign asset: the system test checks that a DAG waiting on a
mapped send's asset really runs, and what its triggering events carry."""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task

CAMPAIGN = Asset("pepipost://campaign/pepipost_clear_reorders/send")


@dag(schedule=[CAMPAIGN], start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["pepipost-test"])
def pepipost_after_mapped_send():
    @task
    def accepted_by_the_campaign() -> int:
        events = get_current_context()["triggering_asset_events"][CAMPAIGN]
        return sum(event.extra["accepted"] for event in events)

    accepted_by_the_campaign()


pepipost_after_mapped_send()
