"""Airflow's own components, the sandbox and the receivers as child processes: what the system tests and
the Celery benchmark run.

No pytest in here (``bench/celery_scale.py`` imports it). Every wait is bounded by time; a failure
says what every component last logged.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil
import requests
import sqlalchemy

from tests.helpers import free_port, http_ok, wait_until

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
EXAMPLES_FOLDER = REPO / "dags_examples"
RUN_TIMEOUT = 180
# The sandbox for the examples: reports come seconds after the send, so a deferrable sensor's first
# poke finds them pending and it defers to the triggerer; no message stays at 'sent' for ever; 2 %
# of the recipients are not on WhatsApp (8003).
EXAMPLES_SCENARIO = {
    "latency": 0.01,
    "status_delay": 2.0,
    "final_mix": {"read": 0.7, "delivered": 0.25, "failed": 0.05},
    "reject_ratio": {"8003": 0.02},
}
WORKER_NAME_ENV = "PEPIPOST_WORKER_NAME"
# [core] hostname_callable for the Celery workers: each worker process reports its own name, as
# two machines would, so that task_instance.hostname tells which worker ran a task.
_WORKER_NAME_MODULE = f"import os\n\n\ndef hostname():\n    return os.environ[{WORKER_NAME_ENV!r}]\n"


class StackFailure(AssertionError):
    """A component died, a run failed or a wait ran out; the message carries the logs."""


class Processes:
    """Child processes with their output in files; stopped together, their tails shown on failure."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, *command: str, env: dict[str, str] | None = None) -> None:
        log = (self.folder / f"{name}.log").open("ab")
        self.running[name] = subprocess.Popen(
            command, env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def stop(self, name: str) -> None:
        process = self.running.pop(name)
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            _kill_tree(process)

    def kill_tree(self, name: str) -> int:
        """SIGKILL a process and everything under it, as when its machine dies; returns how many died.

        Airflow puts each task in a process group of its own, so killing the worker's group alone
        would leave the task running without its worker.
        """
        return _kill_tree(self.running.pop(name))

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 40) -> str:
        parts = []
        for log in sorted(self.folder.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(parts)

    def alive(self) -> None:
        for name, process in self.running.items():
            if process.poll() is not None:
                raise StackFailure(f"{name} exited with {process.returncode}:\n{self.tails()}")


def _kill_tree(process: subprocess.Popen) -> int:
    """SIGKILL ``process`` and its descendants, frozen first so that none forks away meanwhile."""
    root = psutil.Process(process.pid)
    tree: list[psutil.Process] = []
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = [root, *root.children(recursive=True)]
        for member in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.send_signal(sig)
    process.wait(timeout=10)
    psutil.wait_procs(tree, timeout=10)
    return len(tree)


def celery_stack_problem(redis_url: str) -> str | None:
    """Why a CeleryExecutor stack cannot run here (the provider missing, Redis not answering), or None."""
    try:
        import airflow.providers.celery  # noqa: F401
    except ImportError as err:
        return f"the Celery stack is not installed ({err}): pip install -e '.[celery]'"
    address = urlsplit(redis_url)
    try:
        with socket.create_connection((address.hostname or "127.0.0.1", address.port or 6379), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            answer = sock.recv(64)
    except OSError as err:
        return f"Redis not reachable at {redis_url}: {err}"
    if not answer.startswith((b"+PONG", b"-NOAUTH")):
        return f"Redis not reachable at {redis_url}: it answered PING with {answer!r}"
    return None


def forget_celery_queue(redis_url: str, queue: str) -> None:
    """Remove what Celery left in Redis for ``queue``: its bindings, its messages, and the messages a
    killed worker had taken and never acknowledged (which Redis would otherwise redeliver in 24 h)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    for tag, raw in client.hscan_iter("unacked"):
        try:
            routing_key = json.loads(raw)[2]  # [message, exchange, routing key]
        except (ValueError, IndexError, TypeError):
            continue
        if routing_key == queue:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    if keys := list(client.scan_iter(match=f"*{queue}*")):
        client.delete(*keys)
    client.close()


def airflow(env: dict[str, str], *args: str) -> str:
    run = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise StackFailure(f"airflow {' '.join(args)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    return run.stdout


class AirflowStack:
    """``airflow api-server``, ``scheduler``, ``dag-processor`` and ``triggerer`` (and Celery workers)
    on a PostgreSQL metadata database, with ``env`` (connections, store) given to every one of them."""

    def __init__(
        self,
        folder: Path,
        metadata_url: str,
        env: dict[str, str],
        executor: str = "LocalExecutor",
        dags_folder: Path = EXAMPLES_FOLDER,
    ) -> None:
        self.folder = folder
        self.home = folder / "airflow"
        self.home.mkdir(parents=True, exist_ok=True)
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.env = {
            **os.environ,
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__FERNET_KEY": "",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
            "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "1",
            **env,
        }
        self.env.pop("AIRFLOW__CORE__UNIT_TEST_MODE", None)
        self.procs = Processes(folder, self.env)
        self.metadata = sqlalchemy.create_engine(metadata_url)

    def start(self, dag_ids: list[str], components: tuple[str, ...] = ("scheduler", "dag-processor", "triggerer")):
        """Migrate, start the api-server and ``components``, and wait until ``dag_ids`` are parsed."""
        airflow(self.env, "db", "migrate")
        self.procs.start(
            "api-server", str(BIN / "airflow"), "api-server", "--port", str(self.api_port), "--host", "127.0.0.1"
        )
        # The api-server first: a task the scheduler starts before the execution API answers gives up
        # after a few retries and fails without running (the nightly maintenance DAG's run is due at
        # once, since DAGs are unpaused at creation), as it would in any deployment started that way.
        self.wait(lambda: http_ok(f"{self.api_url}/api/v2/monitor/health"), 120, "the api-server did not come up")
        for component in components:
            self.procs.start(component, str(BIN / "airflow"), component)

        def parsed() -> bool:
            query = sqlalchemy.text("SELECT count(*) FROM dag WHERE dag_id = ANY(:ids)")
            with self.metadata.connect() as conn:
                return conn.execute(query, {"ids": dag_ids}).scalar() == len(dag_ids)

        self.wait(parsed, 120, f"the dag-processor did not parse {dag_ids}")

    def start_celery_worker(self, name: str, queue: str, concurrency: int) -> None:
        """``airflow celery worker`` named ``name`` (also its task instances' hostname) on ``queue``."""
        module = self.folder / "pepipost_worker_name.py"
        module.write_text(_WORKER_NAME_MODULE)
        path = os.pathsep.join(filter(None, [str(self.folder), self.env.get("PYTHONPATH")]))
        env = {
            WORKER_NAME_ENV: name,
            "PYTHONPATH": path,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "pepipost_worker_name.hostname",
        }
        self.procs.start(
            name, str(BIN / "airflow"), "celery", "worker", "--celery-hostname", f"{name}@pepipost",
            "--queues", queue, "--concurrency", str(concurrency), "--skip-serve-logs",
            "--without-mingle", "--without-gossip", env=env,
        )  # fmt: skip
        self.wait(lambda: f"{name}@pepipost ready" in self.procs.log(name), 120, f"celery worker {name} not ready")

    def wait(self, predicate: Any, timeout: float, what: str) -> None:
        if not wait_until(lambda: self.procs.alive() or predicate(), timeout=timeout, interval=0.5):
            raise StackFailure(f"{what} within {timeout:g}s\n{self.procs.tails()}")

    def trigger(self, dag_id: str, run_id: str, conf: dict[str, Any] | None = None) -> str:
        """``airflow dags trigger`` as a person would: no logical date."""
        args = ["dags", "trigger", dag_id, "--run-id", run_id]
        airflow(self.env, *args, *(["--conf", json.dumps(conf)] if conf else []))
        return run_id

    def run_states(self, dag_ids: list[str]) -> dict[str, list[tuple[str, str, Any]]]:
        query = sqlalchemy.text("SELECT dag_id, run_id, state, logical_date FROM dag_run WHERE dag_id = ANY(:ids)")
        states: dict[str, list[tuple[str, str, Any]]] = {}
        with self.metadata.connect() as conn:
            for dag_id, run_id, state, logical_date in conn.execute(query, {"ids": dag_ids}):
                states.setdefault(dag_id, []).append((run_id, state, logical_date))
        return states

    def task_instances(self, dag_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
        query = sqlalchemy.text(
            "SELECT task_id, map_index, state, try_number, hostname, start_date, end_date FROM task_instance "
            "WHERE dag_id = :dag AND (CAST(:run AS TEXT) IS NULL OR run_id = :run) ORDER BY task_id, map_index"
        )
        with self.metadata.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query, {"dag": dag_id, "run": run_id})]

    def wait_for_runs(self, dag_ids: list[str], count: int, timeout: float = RUN_TIMEOUT) -> None:
        """Until every DAG has ``count`` successful runs; fails with the task states and the logs if one failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.procs.alive()
            states = self.run_states(dag_ids)
            failed = [dag for dag, runs in states.items() if any(state == "failed" for _, state, _ in runs)]
            if failed:
                details = {dag: self.task_instances(dag) for dag in failed}
                raise StackFailure(f"runs failed: {details}\n{self.task_log_tails()}\n{self.procs.tails()}")
            if all(sum(state == "success" for _, state, _ in states.get(dag, [])) >= count for dag in dag_ids):
                return
            time.sleep(1)
        details = {dag: self.task_instances(dag) for dag in dag_ids}
        raise StackFailure(
            f"runs not finished in {timeout:g}s: {details}\n{self.task_log_tails()}\n{self.procs.tails()}"
        )

    def task_log_tails(self) -> str:
        logs = sorted((self.home / "logs").rglob("*.log"), key=lambda log: log.stat().st_mtime)
        return "\n".join(f"--- {log} ---\n{log.read_text(errors='replace')[-1500:]}" for log in logs[-6:])

    def stop(self) -> None:
        self.procs.stop_all()
        self.metadata.dispose()


class Sandbox:
    """``pepipost-sandbox`` as a child process on a free port, its reports posted to ``webhook_url``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: Processes | None = None

    def start(self, procs: Processes, webhook_url: str, scenario: dict[str, Any], *options: str) -> None:
        self.procs = procs
        procs.start(
            "sandbox", str(BIN / "pepipost-sandbox"), "--port", str(self.port), "--webhook-url", webhook_url,
            "--scenario", json.dumps(scenario), *options,
        )  # fmt: skip
        if not wait_until(lambda: http_ok(f"{self.url}/_sandbox/stats"), timeout=30):
            raise StackFailure(f"the sandbox did not start\n{procs.tails()}")

    def stop(self) -> None:
        self.procs.stop("sandbox")

    def stats(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_sandbox/stats", timeout=5).json()

    def drain(self, timeout: float = 60) -> dict[str, Any]:
        """The stats once every delivery report queued so far has been posted (or given up on)."""
        if not wait_until(lambda: self.stats()["reports"]["pending"] == 0, timeout=timeout, interval=0.5):
            raise StackFailure(f"the sandbox still had reports to post after {timeout:g}s: {self.stats()}")
        time.sleep(1)  # the batch in the air
        return self.stats()


def start_receiver(procs: Processes, name: str, port: int) -> str:
    """``pepipost-webhook`` on ``port``, its store and token from the environment; returns its webhook URL."""
    procs.start(name, str(BIN / "pepipost-webhook"), "--port", str(port))
    base = f"http://127.0.0.1:{port}"
    if not wait_until(lambda: http_ok(f"{base}/pepipost/healthz"), timeout=30):
        raise StackFailure(f"receiver {name} did not start\n{procs.tails()}")
    return f"{base}/pepipost/webhook"
