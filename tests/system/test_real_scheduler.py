"""The example DAGs under Airflow's own components, triggered by hand as a person would.

`dag.test()` is not Airflow: it always sets a logical date, runs triggers inline and skips the
scheduler. Here the api-server, scheduler, dag-processor and triggerer run as separate processes
(LocalExecutor, PostgreSQL as the metadata database), with the sandbox and the receiver beside
them. Every example DAG is triggered with `airflow dags trigger` (no logical date) and must
succeed, its deferrable sensor waiting in the real triggerer. Delivery reports go first to the
standalone `pepipost-webhook`, then to the receiver the plugin mounts in the api-server.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy

from tests.conftest import REPO, connection_json, store_env
from tests.helpers import free_port, http_ok, wait_until

pytestmark = pytest.mark.system

BIN = Path(sys.executable).parent
EXAMPLES = [
    "whatsapp_media_campaign",
    "whatsapp_media_campaign_mapped",
    "whatsapp_media_by_url",
    "whatsapp_template_campaign",
]
TOKEN = "system-test-webhook-token"
RUN_TIMEOUT = 180


@pytest.fixture
def fresh_database(postgres_server_url: str) -> Iterator[Any]:
    """``fresh_database()`` -> the URL of a new, empty PostgreSQL database; all dropped afterwards."""
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def make() -> str:
        name = f"pepipost_sys_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return sqlalchemy.engine.make_url(postgres_server_url).set(database=name).render_as_string(False)

    yield make
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


class Processes:
    """Child processes with their output in files; stopped together, their tails shown on failure."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *command: str) -> None:
        log = (self.folder / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def tails(self, lines: int = 40) -> str:
        parts = []
        for log in sorted(self.folder.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def alive(self) -> None:
        for name, process in self.running.items():
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{self.tails()}"


def airflow(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"airflow {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    return run.stdout


def run_states(metadata: sqlalchemy.Engine, dag_ids: list[str]) -> dict[str, list[tuple[str, str, Any]]]:
    query = sqlalchemy.text("SELECT dag_id, run_id, state, logical_date FROM dag_run WHERE dag_id = ANY(:ids)")
    with metadata.connect() as conn:
        states: dict[str, list[tuple[str, str, Any]]] = {}
        for dag_id, run_id, state, logical_date in conn.execute(query, {"ids": dag_ids}):
            states.setdefault(dag_id, []).append((run_id, state, logical_date))
        return states


def task_states(metadata: sqlalchemy.Engine, dag_id: str) -> list[tuple]:
    query = sqlalchemy.text(
        "SELECT task_id, map_index, state, try_number FROM task_instance WHERE dag_id = :dag ORDER BY task_id"
    )
    with metadata.connect() as conn:
        return [tuple(row) for row in conn.execute(query, {"dag": dag_id})]


def wait_for_runs(metadata: sqlalchemy.Engine, dag_ids: list[str], count: int, procs: Processes) -> None:
    """Until every DAG has ``count`` finished runs; fails with the task states and the logs if one failed."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        procs.alive()
        states = run_states(metadata, dag_ids)
        failed = [dag for dag, runs in states.items() if any(state == "failed" for _, state, _ in runs)]
        if failed:
            details = {dag: task_states(metadata, dag) for dag in failed}
            pytest.fail(f"runs failed: {details}\n{task_log_tails(procs.folder)}\n{procs.tails()}")
        if all(sum(state == "success" for _, state, _ in states.get(dag, [])) >= count for dag in dag_ids):
            return
        time.sleep(1)
    details = {dag: task_states(metadata, dag) for dag in dag_ids}
    pytest.fail(f"runs not finished in {RUN_TIMEOUT}s: {details}\n{procs.tails()}")


def task_log_tails(folder: Path) -> str:
    logs = sorted((folder / "airflow" / "logs").rglob("*.log"))
    return "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-1500:]}" for log in logs[-6:])


def test_every_example_succeeds_when_triggered_by_hand_under_the_real_scheduler(tmp_path, fresh_database):
    metadata_url = fresh_database()
    store_url = fresh_database()
    api_port, sandbox_port, receiver_port = free_port(), free_port(), free_port()
    sandbox_url = f"http://127.0.0.1:{sandbox_port}"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags_examples"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__FERNET_KEY": "",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
        "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
        "AIRFLOW_CONN_PEPIPOST_DEFAULT": connection_json(sandbox_url),
        "PEPIPOST_WEBHOOK_TOKEN": TOKEN,
        **store_env(store_url),
    }
    env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
    (tmp_path / "airflow").mkdir()
    procs = Processes(tmp_path, env)
    metadata = sqlalchemy.create_engine(metadata_url)

    def start_sandbox(webhook_url: str, closed_window_ratio: float = 0.0) -> None:
        # Reports come seconds after the send, so the deferrable sensor's first poke finds them
        # pending and it defers to the triggerer; no message stays at 'sent' for ever.
        final_mix = {"read": 0.7, "delivered": 0.25, "failed": 0.05}
        scenario = json.dumps(
            {
                "latency": 0.01,
                "status_delay": 2.0,
                "final_mix": final_mix,
                "reject_ratio": {"8003": 0.02},
                "closed_window_ratio": closed_window_ratio,
            }
        )
        procs.start(
            "sandbox",
            str(BIN / "pepipost-sandbox"),
            "--port", str(sandbox_port), "--webhook-url", webhook_url, "--scenario", scenario,
        )  # fmt: skip
        assert wait_until(lambda: http_ok(f"{sandbox_url}/_sandbox/stats"), timeout=30), procs.tails()

    try:
        airflow(env, "db", "migrate")
        procs.start("receiver", str(BIN / "pepipost-webhook"), "--port", str(receiver_port))
        start_sandbox(f"http://127.0.0.1:{receiver_port}/pepipost/webhook")
        procs.start("api-server", str(BIN / "airflow"), "api-server", "--port", str(api_port), "--host", "127.0.0.1")
        for component in ("scheduler", "dag-processor", "triggerer"):
            procs.start(component, str(BIN / "airflow"), component)
        assert wait_until(
            lambda: http_ok(f"http://127.0.0.1:{api_port}/api/v2/monitor/health"), timeout=120, interval=1
        ), procs.tails()
        assert wait_until(lambda: http_ok(f"http://127.0.0.1:{receiver_port}/pepipost/healthz"), timeout=30)

        def parsed() -> bool:
            with metadata.connect() as conn:
                found = conn.execute(
                    sqlalchemy.text("SELECT dag_id FROM dag WHERE dag_id = ANY(:ids)"), {"ids": EXAMPLES}
                )
                return len(found.all()) == len(EXAMPLES)

        assert wait_until(parsed, timeout=120, interval=1), (
            f"the dag-processor did not parse the examples\n{procs.tails()}"
        )

        # Round 1: by hand, no logical date; reports to the standalone receiver.
        for dag_id in EXAMPLES:
            airflow(env, "dags", "trigger", dag_id)
        wait_for_runs(metadata, EXAMPLES, 1, procs)
        runs = run_states(metadata, EXAMPLES)
        assert all(logical_date is None for runs_ in runs.values() for _, _, logical_date in runs_)

        # Round 2: a cold audience (the 24-hour window closed for 40 %): the template campaign
        # falls back to its template; reports to the receiver the plugin mounts in the api-server.
        procs.stop("sandbox")
        start_sandbox(f"http://127.0.0.1:{api_port}/pepipost/webhook", closed_window_ratio=0.4)
        airflow(env, "dags", "trigger", "whatsapp_template_campaign")
        wait_for_runs(metadata, ["whatsapp_template_campaign"], 2, procs)

        stats = requests.get(f"{sandbox_url}/_sandbox/stats", timeout=5).json()
        assert stats["reports"]["events_lost"] == 0, stats
        assert stats["accepted_by_type"]["template"] > 0 and stats["responses"]["8007"] > 0, stats
        # The deferrable sensor waited in the triggerer: its trigger's log sits beside the task log.
        trigger_logs = list((tmp_path / "airflow" / "logs").rglob("task_id=wait_for_delivery/*.trigger.*.log"))
        assert any("trigger completed" in log.read_text(errors="replace") for log in trigger_logs), procs.tails()
        procs.alive()
    finally:
        procs.stop_all()
        metadata.dispose()
