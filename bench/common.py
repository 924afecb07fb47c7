"""Shared bench plumbing: a sandbox process on loopback, a stand-in task instance, RSS and timing."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from devtools.processes import free_port, wait_http

BIN = Path(sys.executable).parent
API_KEY = "sandbox-api-key"


@contextmanager
def sandbox_process(scenario: dict[str, Any]):
    """The sandbox in its own process, so that it does not share the GIL with what is measured."""
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "pepipost-sandbox"),
            "--port",
            str(port),
            "--no-record",
            "--any-source",
            "--scenario",
            json.dumps(scenario),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/_sandbox/stats")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def point_connection(base_url: str, store_url: str, **extra: Any) -> None:
    """The Pepipost connection at ``base_url``; the store through the resolver's environment path."""
    os.environ["AIRFLOW_CONN_PEPIPOST_DEFAULT"] = json.dumps(
        {"conn_type": "pepipost", "host": base_url, "password": API_KEY, "extra": {"source": "bench-source", **extra}}
    )
    os.environ["PEPIPOST_STATUS_STORE_URL"] = store_url


class BenchTaskInstance:
    """What SendWhatsAppMediaOperator.execute reads from the context, without a scheduler."""

    def __init__(self, dag_id: str, run_id: str, task_id: str = "send") -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = dag_id, run_id, task_id, -1
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (uvicorn's workers are children of its supervisor)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            with open(f"/proc/{current}/task/{current}/children") as handle:
                pending += [int(child) for child in handle.read().split()]
        except OSError:
            pass
    return found


def cpu_seconds(pid: int | None = None) -> float:
    """User and system CPU seconds so far of this process (every thread), or of ``pid`` and its descendants."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    ticks = 0
    for member in process_tree(pid):
        try:
            with open(f"/proc/{member}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident set size (VmHWM) of this process's own memory, or the sum over ``pid`` and its
    descendants.

    Not getrusage's ru_maxrss: Linux carries that across exec, so a child started from a large
    process (make bench runs every bench in one) reports its parent's peak as its own.
    """
    total = 0
    for member in ["self"] if pid is None else process_tree(pid):
        try:
            with open(f"/proc/{member}/status") as handle:
                total += next((int(line.split()[1]) for line in handle if line.startswith("VmHWM:")), 0)
        except OSError:
            continue
    return round(total / 1024, 1)


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    """The median of ``values`` and their spread (min, max), rounded to ``digits``."""
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def on_each_store(measure: Callable[..., Any], postgres_url: str | None, *args: Any) -> dict[str, Any]:
    """``measure(store_url, *args)`` on a new SQLite file, then on a scratch PostgreSQL database
    when there is a server: {"sqlite": ..., "postgresql": ...}."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        results["sqlite"] = measure(f"sqlite:///{Path(tmp) / 'bench.db'}", *args)
    if postgres_url:
        from bench.pg import scratch_database

        with scratch_database(postgres_url) as url:
            results["postgresql"] = measure(url, *args)
    return results
