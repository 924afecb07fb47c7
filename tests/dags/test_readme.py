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
# Sections whose block is still a fragment (an operator, no DAG): it must import and build, no more.
# "Consent and opt-outs" is edited elsewhere for now (see the report of issue 20).
FRAGMENT_SECTIONS = {"Consent and opt-outs"}
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
    for name, (section, dags) in readme_dags.items():
        if section in FRAGMENT_SECTIONS:
            continue
        assert dags, f"README block {name} defines no DAG (is the @dag function called?)"
        for dag in dags:
            assert dag.task_ids, f"README block {name}: DAG {dag.dag_id} has no task"
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
def test_the_readmes_sending_dags_run_against_the_sandbox(readme_dags, sandbox_for_readme, dag_id):
    (dag,) = [dag for _, dags in readme_dags.values() for dag in dags if dag.dag_id == dag_id]
    result = DagResult(dag.test())
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
