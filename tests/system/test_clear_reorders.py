"""A clear never sends twice, through Airflow's own clear under the real scheduler.

A mapped send whose upstream lists its segments in another order after a clear
(``dag_files/pepipost_clear_reorders.py``) is triggered by hand, then the whole run is cleared
through the REST API as the UI's Clear button does: every row lands in another map index, and
the sandbox must still have received each message once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

from tests.conftest import connection_json, store_env
from tests.helpers import free_port
from tests.system.stack import AirflowStack, Sandbox, StackFailure, start_receiver

pytestmark = pytest.mark.system

DAG = "pepipost_clear_reorders"
DOWNSTREAM = "pepipost_after_mapped_send"  # scheduled on the mapped send's campaign asset
TOKEN = "system-test-webhook-token"
NUMBERS = [f"9198{segment}{i:07d}" for segment in range(3) for i in range(10)]


def test_a_clear_of_a_mapped_run_whose_upstream_reorders_sends_nothing_twice(tmp_path, fresh_database):
    dags = tmp_path / "dags"
    dags.mkdir()
    for dag_id in (DAG, DOWNSTREAM):
        shutil.copy(Path(__file__).parent / "dag_files" / f"{dag_id}.py", dags)
    store_url = fresh_database()
    sandbox = Sandbox()
    env = {
        "AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox.url),
        "PEPIPOST_WEBHOOK_TOKEN": TOKEN,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # the REST API's clear without a login
        **store_env(store_url),
    }
    stack = AirflowStack(tmp_path, fresh_database(), env, dags_folder=dags)
    try:
        sandbox.start(stack.procs, start_receiver(stack.procs, "receiver", free_port()), {"latency": 0.01})
        stack.start([DAG, DOWNSTREAM])
        run_id = stack.trigger(DAG, "manual-clear-1")
        stack.wait_for_runs([DAG], 1)
        first = {index: recipients(stack, run_id, index) for index in range(3)}
        assert stack_sent(sandbox) == 30
        # The mapped send's asset is active: one event per map index, each with its counts.
        events = campaign_events(stack)
        assert sorted(event["map_index"] for event in events) == [0, 1, 2], events
        assert all(event["accepted"] == 10 and event["run_id"] == run_id for event in events), events
        assert "inactive assets" not in stack.procs.log("api-server")
        # ...and a DAG scheduled on it runs, its triggering events carrying the campaign's counts.
        stack.wait_for_runs([DOWNSTREAM], 1)
        runs = stack.run_states([DOWNSTREAM])[DOWNSTREAM]
        downstream_run = next(run for run, state, _ in runs if state == "success")
        accepted = xcom(stack, DOWNSTREAM, downstream_run, "accepted_by_the_campaign", "return_value")
        assert accepted in (10, 20, 30), accepted  # one map index's events or more, each with its 10

        answer = requests.post(
            f"{stack.api_url}/api/v2/dags/{DAG}/clearTaskInstances",
            json={"dag_run_id": run_id, "dry_run": False, "only_failed": False, "reset_dag_runs": True},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        wait_for_second_try(stack, run_id)

        again = {index: recipients(stack, run_id, index) for index in range(3)}
        assert again[0] == first[2] and again[2] == first[0]  # the segments did move
        for index in range(3):
            summary = xcom(stack, DAG, run_id, "send", "send_summary", map_index=index)
            assert (summary["accepted"], summary["reused_from_earlier_try"]) == (10, 10), summary
        assert stack_sent(sandbox) == 30  # not one message more
        assert all(per_number(sandbox, number) == 1 for number in NUMBERS)
        stack.procs.alive()
    finally:
        stack.stop()


def xcom(stack: AirflowStack, dag_id: str, run_id: str, task_id: str, key: str, map_index: int = -1) -> Any:
    """A task instance's XCom as Airflow's database holds it (JSON)."""
    query = sqlalchemy.text(
        "SELECT value FROM xcom WHERE dag_id = :dag AND run_id = :run AND task_id = :task AND key = :key"
        " AND map_index = :map_index"
    )
    with stack.metadata.connect() as conn:
        params = {"dag": dag_id, "run": run_id, "task": task_id, "key": key, "map_index": map_index}
        value = conn.execute(query, params).scalar_one()
    return json.loads(value) if isinstance(value, str) else value


def campaign_events(stack: AirflowStack) -> list[dict[str, Any]]:
    """The extras of the asset events the mapped send emitted, from Airflow's database."""
    query = sqlalchemy.text(
        "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id WHERE a.uri = :uri ORDER BY e.id"
    )
    with stack.metadata.connect() as conn:
        extras = conn.execute(query, {"uri": f"pepipost://campaign/{DAG}/send"}).scalars().all()
    return [json.loads(extra) if isinstance(extra, str) else extra for extra in extras]


def recipients(stack: AirflowStack, run_id: str, map_index: int) -> list[str]:
    return [row["recipient"] for row in xcom(stack, DAG, run_id, "send", "messages", map_index=map_index)]


def stack_sent(sandbox: Sandbox) -> int:
    return sandbox.stats()["accepted"]


def per_number(sandbox: Sandbox, number: str) -> int:
    return requests.get(f"{sandbox.url}/_sandbox/recipients/{number}", timeout=5).json()["accepted"]


def wait_for_second_try(stack: AirflowStack, run_id: str, timeout: float = 180) -> None:
    """Until every send instance ran again (try 2) and the run is back to success."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.procs.alive()
        sends = [ti for ti in stack.task_instances(DAG, run_id) if ti["task_id"] == "send"]
        if any(ti["state"] == "failed" for ti in sends):
            raise StackFailure(f"a send failed after the clear: {sends}\n{stack.task_log_tails()}")
        state = {r: s for r, s, _ in stack.run_states([DAG]).get(DAG, [])}.get(run_id)
        if state == "success" and len(sends) == 3 and all(ti["try_number"] >= 2 for ti in sends):
            return
        time.sleep(1)
    raise StackFailure(f"the cleared run did not finish in {timeout:g}s\n{stack.task_log_tails()}")
