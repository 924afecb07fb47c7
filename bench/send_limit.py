"""Bench 1b: one send task at the limit, against a vendor stand-in that is not the bottleneck.

Issue 26's target: one send task sustains 2,000 msg/s over 50,000 rows at 50 ms of vendor latency
with the durable ledger, spending at most 400 us of client CPU per message. The sandbox tops out
near 600 msg/s, so this bench talks to ``bench/vendor_standin.py`` (asyncio, uvloop, httptools),
whose own ceiling it prints from the stand-in's CPU per request in the same run.

Each figure is the median of ``repeats`` runs with their spread. The client CPU per message is
the whole process's user + system time over the run (every thread: senders, ledger writer,
watchdog) divided by the messages, once for the hook alone (a thread pool calling
``PepipostHook.post_message_body``) and once for the operator (``SendWhatsAppMediaOperator`` with
its SQLite ledger). Run alone, from the repository: python -m bench.send_limit [--count 50000] [--workers 128]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import BenchTaskInstance, cpu_seconds, free_port, point_connection, spread
from bench.send_throughput import audience, media_body

LATENCY = 0.05
TARGET_MSG_PER_S = 2000
TARGET_CPU_US = 400


@contextmanager
def standin_process(latency: float):
    """The stand-in vendor in its own process; yields (base URL, pid)."""
    port = free_port()
    script = Path(__file__).with_name("vendor_standin.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", str(port), "--latency", str(latency)])
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the vendor stand-in did not start within 20 s") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def hook_alone(count: int, workers: int) -> dict[str, float]:
    """``count`` sends through one hook from ``workers`` threads: no ledger, no operator."""
    from airflow_provider_pepipost.hooks.pepipost import PepipostHook

    hook = PepipostHook(pool_size=workers)
    bodies = [media_body(phone) for phone in audience(count)]
    hook.post_message_body(bodies[0])  # the connection settings and the pool, outside the timing
    cpu, started = cpu_seconds(), time.perf_counter()
    with ThreadPoolExecutor(workers, thread_name_prefix="bench-hook") as pool:
        ids = list(pool.map(hook.post_message_body, bodies))
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    hook.close()
    if len(set(ids)) != count:
        raise RuntimeError(f"the hook returned {len(set(ids))} distinct ids for {count} sends")
    return {"msg_per_s": count / elapsed, "cpu_us_per_msg": cpu / count * 1e6}


def operator_alone(count: int, workers: int, store_url: str) -> dict[str, float]:
    """The media operator sending ``count`` rows with ``workers`` threads, its ledger in ``store_url``."""
    from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

    operator = SendWhatsAppMediaOperator(
        task_id="send", recipients=audience(count), attachment_id="m-1", caption="Hi",
        max_workers=workers, progress_interval=3600,
    )  # fmt: skip
    ti = BenchTaskInstance("bench_send_limit", f"run-{uuid.uuid4().hex}")
    cpu, started = cpu_seconds(), time.perf_counter()
    operator.execute({"ti": ti})
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    accepted = ti.xcom["send_summary"]["accepted"]
    if accepted != count:
        raise RuntimeError(f"the operator had {accepted} of {count} rows accepted: {ti.xcom['send_summary']}")
    return {"msg_per_s": count / elapsed, "cpu_us_per_msg": cpu / count * 1e6}


def run(count: int = 50_000, workers: int = 128, repeats: int = 3) -> dict[str, Any]:
    """Hook alone and operator, alternated ``repeats`` times in one run against one stand-in."""
    hook_runs: list[dict[str, float]] = []
    operator_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp, standin_process(LATENCY) as (url, pid):
        standin_cpu = cpu_seconds(pid)
        for repeat in range(repeats):
            store_url = f"sqlite:///{Path(tmp) / f'send-limit-{repeat}.db'}"
            point_connection(url, store_url)
            hook_runs.append(hook_alone(count, workers))
            operator_runs.append(operator_alone(count, workers, store_url))
        requests_served = repeats * (2 * count + 1)
        standin_us = (cpu_seconds(pid) - standin_cpu) / requests_served * 1e6
    limit = workers / LATENCY
    operator_rate = [r["msg_per_s"] for r in operator_runs]
    return {
        "messages": count,
        "workers": workers,
        "latency_s": LATENCY,
        "limit_msg_per_s": limit,
        "hook_msg_per_s": spread([r["msg_per_s"] for r in hook_runs], 0),
        "hook_cpu_us_per_msg": spread([r["cpu_us_per_msg"] for r in hook_runs], 0),
        "operator_msg_per_s": spread(operator_rate, 0),
        "operator_share_of_limit": round(statistics.median(operator_rate) / limit, 3),
        "operator_cpu_us_per_msg": spread([r["cpu_us_per_msg"] for r in operator_runs], 0),
        "standin_cpu_us_per_request": round(standin_us, 1),
        # One core of the stand-in's: what it could serve if it had nothing else to do.
        "standin_ceiling_per_s": round(1e6 / standin_us) if standin_us else None,
    }


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """Table rows for bench/run.py: (figure, measured, target, ok)."""

    def fmt(figure: dict[str, float], unit: str) -> str:
        return f"{figure['median']:.0f} {unit} ({figure['min']:.0f}-{figure['max']:.0f})"

    count, workers = result["messages"], result["workers"]
    operator_rate, operator_cpu = result["operator_msg_per_s"], result["operator_cpu_us_per_msg"]
    return [
        (
            f"one send task at the limit: {count:,} rows, {workers} workers, 50 ms, SQLite ledger",
            f"{fmt(operator_rate, 'msg/s')} = {result['operator_share_of_limit']:.0%} "
            f"of {result['limit_msg_per_s']:.0f}",
            f">= {TARGET_MSG_PER_S} msg/s",
            operator_rate["median"] >= TARGET_MSG_PER_S,
        ),
        (
            "  client CPU per message, operator",
            fmt(operator_cpu, "us"),
            f"<= {TARGET_CPU_US} us",
            operator_cpu["median"] <= TARGET_CPU_US,
        ),
        ("  client CPU per message, hook alone", fmt(result["hook_cpu_us_per_msg"], "us"), "-", None),
        ("  hook alone, same threads", fmt(result["hook_msg_per_s"], "msg/s"), "-", None),
        (
            "  the vendor stand-in's own ceiling (1 core)",
            f"{result['standin_ceiling_per_s']} req/s ({result['standin_cpu_us_per_request']} us per request)",
            f"> {TARGET_MSG_PER_S} req/s",
            (result["standin_ceiling_per_s"] or 0) > TARGET_MSG_PER_S,
        ),
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.count, args.workers, args.repeats), indent=2))
