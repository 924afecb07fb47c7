"""The example DAGs under Airflow's own components, triggered by hand as a person would.

`dag.test()` is not Airflow: it always sets a logical date, runs triggers inline and skips the
scheduler. Here the api-server, scheduler, dag-processor and triggerer run as separate processes
(LocalExecutor, PostgreSQL as the metadata database), with the sandbox and the receiver beside
them. Every example DAG is triggered with `airflow dags trigger` (no logical date) and must
succeed, its deferrable sensor waiting in the real triggerer. Delivery reports go first to the
standalone `pepipost-webhook`, then to the receiver the plugin mounts in the api-server.
"""

from __future__ import annotations

import pytest

from tests.conftest import connection_json, store_env
from tests.helpers import free_port
from tests.system.stack import EXAMPLES_SCENARIO, AirflowStack, Sandbox, start_receiver

pytestmark = pytest.mark.system

EXAMPLES = [
    "whatsapp_media_campaign",
    "whatsapp_media_campaign_mapped",
    "whatsapp_media_by_url",
    "whatsapp_template_campaign",
]
TOKEN = "system-test-webhook-token"


def test_every_example_succeeds_when_triggered_by_hand_under_the_real_scheduler(tmp_path, fresh_database):
    store_url = fresh_database()
    sandbox = Sandbox()
    env = {"AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url), "PEPIPOST_WEBHOOK_TOKEN": TOKEN}
    stack = AirflowStack(tmp_path, fresh_database(), {**env, **store_env(store_url)})
    try:
        receiver_url = start_receiver(stack.procs, "receiver", free_port())
        sandbox.start(stack.procs, receiver_url, EXAMPLES_SCENARIO)
        stack.start(EXAMPLES)

        # Round 1: by hand, no logical date; reports to the standalone receiver.
        for dag_id in EXAMPLES:
            stack.trigger(dag_id, f"manual-1-{dag_id}")
        stack.wait_for_runs(EXAMPLES, 1)
        runs = stack.run_states(EXAMPLES)
        assert all(logical_date is None for runs_ in runs.values() for _, _, logical_date in runs_)

        # Round 2: a cold audience (the 24-hour window closed for 40 %): the template campaign
        # falls back to its template; reports to the receiver the plugin mounts in the api-server.
        sandbox.stop()
        cold = {**EXAMPLES_SCENARIO, "closed_window_ratio": 0.4}
        sandbox.start(stack.procs, f"{stack.api_url}/pepipost/webhook", cold)
        stack.trigger("whatsapp_template_campaign", "manual-2-whatsapp_template_campaign")
        stack.wait_for_runs(["whatsapp_template_campaign"], 2)

        stats = sandbox.stats()
        assert stats["reports"]["events_lost"] == 0, stats
        assert stats["accepted_by_type"]["template"] > 0 and stats["responses"]["8007"] > 0, stats
        # The deferrable sensor waited in the triggerer: its trigger's log sits beside the task log.
        trigger_logs = list((stack.home / "logs").rglob("task_id=wait_for_delivery/*.trigger.*.log"))
        assert any("trigger completed" in log.read_text(errors="replace") for log in trigger_logs), stack.procs.tails()
        stack.procs.alive()
    finally:
        stack.stop()
