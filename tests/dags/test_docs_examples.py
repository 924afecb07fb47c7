"""The documentation's examples run as shown: every DAG file in docs/examples/ (the pages include
them, tests/unit/test_docs.py checks that) is loaded by Airflow, and the sending ones run end to
end against the sandbox and the receiver."""

from __future__ import annotations

import re
import shutil

import pytest

from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from tests.conftest import REPO, WEBHOOK_TOKEN
from tests.helpers import DagResult, dag_bag_class

pytestmark = pytest.mark.dag
EXAMPLES = REPO / "docs" / "examples"
# Timetables that start a run only when someone triggers it, or its assets are updated.
UNSCHEDULED = {"NullTimetable", "AssetTriggeredTimetable"}
# Upstream tasks that return an audience: their return value (whole numbers) stays out of the log.
AUDIENCE_TASKS = {"build_audience"}
# A whole number as the examples' audiences write them: '+91 98330 78369', '919833078369'.
WHOLE_NUMBER = re.compile(r"\+91 \d{5} \d{5}|(?<!\d)91\d{10}(?!\d)")
# The examples that send, run with dag.test() against the sandbox: (DAG id, the task that must succeed).
RUN = {"invoices": "wait", "invoice_reminders": "remind", "invoices_session_first": "send_invoices"}


@pytest.fixture(scope="module")
def docs_dags(airflow_db) -> dict[str, list]:
    """Each example file in the DAGs folder (dag.test() runs DAGs of its bundle only), loaded by a DagBag."""
    folder = airflow_db / "dags" / "docs_examples"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    loaded = {}
    for source in sorted(EXAMPLES.glob("*.py")):
        path = shutil.copy(source, folder / source.name)
        bag = dag_bag_class()(dag_folder=str(path), safe_mode=False)
        assert not bag.import_errors, (source.name, bag.import_errors)
        loaded[source.name] = list(bag.dags.values())
    return loaded


def test_every_example_file_loads_and_defines_its_dag(docs_dags):
    assert len(docs_dags) >= 9
    for name, dags in docs_dags.items():
        assert len(dags) == 1, f"docs/examples/{name} defines {len(dags)} DAGs, not one (is the @dag function called?)"
        (dag,) = dags
        assert dag.task_ids, f"docs/examples/{name}: DAG {dag.dag_id} has no task"
        # A copied DAG runs when someone triggers it (or its assets do), never on unpausing.
        assert type(dag.timetable).__name__ in UNSCHEDULED, f"docs/examples/{name}: {dag.dag_id} has a time schedule"
        for task in dag.tasks:
            if task.task_type == "WhatsAppMessageStatusSensor":  # waits as long as it needs, no longer
                assert task.poke_interval <= 30 and task.timeout <= 24 * 3600, (name, task.task_id)
            if task.task_type == "_PythonDecoratedOperator" and task.task_id in AUDIENCE_TASKS:
                assert task.show_return_value_in_logs is False, (name, task.task_id)
    dag_ids = {dag.dag_id for dags in docs_dags.values() for dag in dags}
    assert set(RUN) <= dag_ids


def dag_named(docs_dags: dict[str, list], dag_id: str):
    (dag,) = [dag for dags in docs_dags.values() for dag in dags if dag.dag_id == dag_id]
    return dag


@pytest.fixture
def sandbox_for_examples(sqlite_receiver, pepipost_conn):
    scenario = Scenario(final_mix={"read": 0.9, "delivered": 0.1}, status_delay=0.05)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        pepipost_conn(sandbox.url, sqlite_receiver.store_url)  # also the examples' pepipost_status_store
        yield sandbox


@pytest.mark.parametrize("dag_id", sorted(RUN))
def test_the_sending_examples_run_against_the_sandbox(docs_dags, sandbox_for_examples, dag_id, capfd):
    result = DagResult(dag_named(docs_dags, dag_id).test())
    logged = "".join(capfd.readouterr())
    assert not WHOLE_NUMBER.search(logged), WHOLE_NUMBER.search(logged)  # the task logs show masked numbers
    assert result.state == "success", result.tasks
    assert result.task_state(RUN[dag_id]) == "success"
    assert sandbox_for_examples.state.accepted_count == 1
    if dag_id == "invoices":
        assert result.value("wait")["counts"] in ({"delivered": 1}, {"read": 1})


def test_the_report_example_triggered_by_hand_has_nothing_to_read(docs_dags):
    result = DagResult(dag_named(docs_dags, "campaign_delivered_report").test())
    assert result.state == "success", result.tasks
    assert result.value("figures") == {}
