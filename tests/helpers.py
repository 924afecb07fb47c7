"""Test helpers: serve an ASGI app on a real loopback port, run a DAG with dag.test()."""

from __future__ import annotations

import functools
import socket
import threading
import time
from typing import Any

import uvicorn

from devtools.processes import free_port as free_port  # the tests import it from here


class ServedApp:
    """Runs an ASGI app with uvicorn in a thread on 127.0.0.1 and a free port."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> ServedApp:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "the app did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200; False while the server is not up."""
    import requests

    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; bounded by time, never forever."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class DagResult:
    """What a dag.test() run left: its state, each task's state and tries, and the XComs pushed."""

    def __init__(self, dag_run: Any) -> None:
        from airflow.models.dagrun import DagRun
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:
            run = session.get(DagRun, dag_run.id)
            self.state = str(run.state)
            self.run_id = run.run_id
            self.tasks = {
                (ti.task_id, ti.map_index): (str(ti.state), ti.try_number)
                for ti in run.get_task_instances(session=session)
            }
            rows = session.query(XComModel).filter(XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id)
            self.xcom = {(row.task_id, row.map_index, row.key): row.value for row in rows}

    def task_state(self, task_id: str, map_index: int = -1) -> str:
        return self.tasks[(task_id, map_index)][0]

    def tries(self, task_id: str, map_index: int = -1) -> int:
        return self.tasks[(task_id, map_index)][1]

    def value(self, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
        return self.xcom.get((task_id, map_index, key))


def dag_bag_class() -> Any:
    """Airflow's DagBag: in airflow.dag_processing.dagbag from 3.2 (a deprecated alias stays in
    airflow.models.dagbag), in airflow.models.dagbag before."""
    from airflow_provider_pepipost.version_compat import AIRFLOW_V_3_2_PLUS

    if AIRFLOW_V_3_2_PLUS:
        from airflow.dag_processing.dagbag import DagBag
    else:
        from airflow.models.dagbag import DagBag
    return DagBag


@functools.cache
def _dag_bag() -> Any:
    bag = dag_bag_class()(safe_mode=False)
    assert not bag.import_errors, bag.import_errors
    return bag


def load_dag(dag_id: str) -> Any:
    """The DAG object from the copy in the DAGs folder, which is what dag.test() syncs."""
    dag = _dag_bag().get_dag(dag_id)
    assert dag is not None, f"no DAG {dag_id} in the DAGs folder"
    return dag


def run_dag(dag_id: str, **conf: Any) -> DagResult:
    return DagResult(load_dag(dag_id).test(run_conf=conf or None))


class StandInTaskInstance:
    """What SendWhatsAppMediaOperator.execute reads from its context: for tests that drive the
    operator directly (thousands of rows, many fault scenarios) without a scheduler loop."""

    def __init__(
        self, dag_id: str = "faults", run_id: str = "faults-run", task_id: str = "send", map_index: int = -1
    ) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, map_index
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def run_operator(
    recipients: Any,
    ti: StandInTaskInstance | None = None,
    operator_class: Any = None,
    clear_number: int = 0,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Execute a send operator (media by default) once; returns (return value or the exception, task instance).

    ``clear_number``: how many times the stand-in run was cleared (Airflow's ``dag_run.clear_number``).
    """
    from types import SimpleNamespace

    from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

    ti = ti or StandInTaskInstance()
    if operator_class is None:
        operator_class = SendWhatsAppMediaOperator
        kwargs.setdefault("attachment_id", "media-1")
    kwargs.setdefault("progress_interval", 3600)
    operator = operator_class(task_id=ti.task_id, recipients=recipients, **kwargs)
    try:
        return operator.execute({"ti": ti, "dag_run": SimpleNamespace(clear_number=clear_number)}), ti
    except Exception as err:  # the caller asserts on it
        return err, ti


class StatsdListener:
    """A StatsD server on a loopback UDP port: keeps every metric line it is sent, as Airflow sends them."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self._sock.recv(65536)
            except OSError:  # the timeout: look at the stop flag again
                continue
            self.lines.extend(packet.decode("utf-8", "replace").splitlines())

    def env(self) -> dict[str, str]:
        """Airflow's [metrics] settings that send here, tags in InfluxDB's form (name,tag=value:1|c)."""
        return {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(self.port),
            "AIRFLOW__METRICS__STATSD_INFLUXDB_ENABLED": "True",
        }

    def metric(self, name: str, **tags: str) -> list[tuple[float, str]]:
        """(value, type) of each line for ``name`` whose tags include ``tags``."""
        found = []
        for line in list(self.lines):
            head, _, rest = line.partition(":")
            metric, *pairs = head.split(",")
            given = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
            if metric == name and all(given.get(key) == value for key, value in tags.items()):
                value, _, kind = rest.partition("|")
                found.append((float(value), kind.split("|")[0]))
        return found

    def total(self, name: str, **tags: str) -> float:
        return sum(value for value, kind in self.metric(name, **tags) if kind == "c")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()


def scrape_metrics(url: str, token: str, **headers: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a receiver's /metrics, read with its token: (name, sorted labels) -> value."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    answer = requests.get(url, headers={"X-Pepipost-Token": token, **headers}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }
