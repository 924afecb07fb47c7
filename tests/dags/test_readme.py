"""The README runs as written: every ```python block in it is a DAG file that Airflow loads, and the
sending ones run end to end against the sandbox and the receiver."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from tests.conftest import REPO, WEBHOOK_TOKEN
from tests.helpers import DagResult

pytestmark = pytest.mark.dag
README = REPO / "README.md"
# Timetables that start a run only when someone triggers it, or its assets are updated.
UNSCHEDULED = {"NullTimetable", "AssetTriggeredTimetable"}
# Upstream tasks that return an audience: their return value (whole numbers) stays out of the log.
AUDIENCE_TASKS = {"build_audience"}
# A whole number as the README's audiences write them: '+91 98330 78369', '919833078369'.
WHOLE_NUMBER = re.compile(r"\+91 \d{5} \d{5}|(?<!\d)91\d{10}(?!\d)")
# The blocks that send, run with dag.test() against the sandbox: (DAG id, the task that must succeed).
RUN = {"invoices": "wait", "invoice_reminders": "remind", "invoices_session_first": "send_invoices"}


def readme_blocks() -> list[tuple[str, str]]:
    """(section heading, code) of every ```python block, in order."""
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```$", text, flags=re.S | re.M):
        headings = re.findall(r"^## (.+)$", text[: match.start()], flags=re.M)
        blocks.append((headings[-1] if headings else "", match.group(1)))
    return blocks


@pytest.fixture(scope="module")
def readme_dags(airflow_db) -> dict[str, tuple[str, list]]:
    """Each block as a file in the DAGs folder (dag.test() runs DAGs of its bundle only), loaded by a DagBag."""
    from airflow.dag_processing.dagbag import DagBag

    folder = airflow_db / "dags" / "readme"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    loaded = {}
    for index, (section, code) in enumerate(readme_blocks()):
        path = folder / f"readme_block_{index}.py"
        path.write_text(code)
        bag = DagBag(dag_folder=str(path), safe_mode=False)
        assert not bag.import_errors, (section, bag.import_errors)
        loaded[f"{index}: {section}"] = (section, list(bag.dags.values()))
    return loaded


def test_every_python_block_of_the_readme_loads_and_defines_its_dag(readme_dags):
    assert len(readme_dags) >= 6
    for name, (_section, dags) in readme_dags.items():
        assert dags, f"README block {name} defines no DAG (is the @dag function called?)"
        for dag in dags:
            assert dag.task_ids, f"README block {name}: DAG {dag.dag_id} has no task"
            # A copied DAG runs when someone triggers it (or its assets do), never on unpausing.
            assert type(dag.timetable).__name__ in UNSCHEDULED, (
                f"README block {name}: DAG {dag.dag_id} has a time schedule"
            )
            for task in dag.tasks:
                if task.task_type == "WhatsAppMessageStatusSensor":  # waits as long as it needs, no longer
                    assert task.poke_interval <= 30 and task.timeout <= 24 * 3600, (name, task.task_id)
                if task.task_type == "_PythonDecoratedOperator" and task.task_id in AUDIENCE_TASKS:
                    assert task.show_return_value_in_logs is False, (name, task.task_id)
    dag_ids = {dag.dag_id for _, dags in readme_dags.values() for dag in dags}
    assert set(RUN) <= dag_ids


@pytest.fixture
def sandbox_for_readme(sqlite_receiver, pepipost_conn):
    scenario = Scenario(final_mix={"read": 0.9, "delivered": 0.1}, status_delay=0.05)
    headers = {"X-Pepipost-Token": WEBHOOK_TOKEN}
    with SandboxServer(scenario, webhook_url=sqlite_receiver.webhook_url, webhook_headers=headers) as sandbox:
        pepipost_conn(sandbox.url, sqlite_receiver.store_url)  # also the README's pepipost_status_store
        yield sandbox


@pytest.mark.parametrize("dag_id", sorted(RUN))
def test_the_readmes_sending_dags_run_against_the_sandbox(readme_dags, sandbox_for_readme, dag_id, capfd):
    (dag,) = [dag for _, dags in readme_dags.values() for dag in dags if dag.dag_id == dag_id]
    result = DagResult(dag.test())
    logged = "".join(capfd.readouterr())
    assert not WHOLE_NUMBER.search(logged), WHOLE_NUMBER.search(logged)  # the task logs show masked numbers
    assert result.state == "success", result.tasks
    assert result.task_state(RUN[dag_id]) == "success"
    assert sandbox_for_readme.state.accepted_count == 1
    if dag_id == "invoices":
        assert result.value("wait")["counts"] in ({"delivered": 1}, {"read": 1})


def test_the_readmes_report_dag_triggered_by_hand_has_nothing_to_read(readme_dags):
    (dag,) = [dag for _, dags in readme_dags.values() for dag in dags if dag.dag_id == "campaign_delivered_report"]
    result = DagResult(dag.test())
    assert result.state == "success", result.tasks
    assert result.value("figures") == {}


def test_the_readme_keeps_benchmark_history_out(readme_dags):
    text = README.read_text()
    section = text[text.index("## Benchmarks") : text.index("## Development")]
    assert "docs/benchmarks.md" in section and "|---|" not in section
    assert Path(REPO / "docs" / "benchmarks.md").exists()
