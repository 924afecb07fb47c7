"""Bench 1b: one send task at the limit, against a vendor stand-in that is not the bottleneck.

Issue 26's target: one send task sustains 2,000 msg/s over 50,000 rows at 50 ms of vendor latency
with the durable ledger, spending at most 400 us of client CPU per message. The sandbox tops out
near 600 msg/s, so this bench talks to ``bench/vendor_standin.py`` (asyncio, uvloop, httptools),
whose own ceiling it prints from the stand-in's CPU per request in the same run.

Each figure is the median of ``repeats`` runs with their spread. The client CPU per message is
the whole process's user + system time over the run (every thread: senders, ledger writer,
watchdog) divided by the messages, once for the hook alone (``PepipostHook.apost_message_body``
on one event loop) and once for the operator (``SendWhatsAppMediaOperator`` with its SQLite
ledger); and the same on the threaded transport, side by side (``[pepipost] send_transport =
threads``: a thread pool calling ``post_message_body``, the operator on threads).
Run alone, from the repository: python -m bench.send_limit [--count 50000] [--workers 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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

import uvloop

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


def hook_on_a_loop(count: int, workers: int) -> dict[str, float]:
    """``count`` sends through one hook's event-loop transport, ``workers`` in flight: no ledger."""
    from airflow_provider_pepipost.hooks.pepipost import PepipostHook

    hook = PepipostHook(pool_size=workers)
    bodies = [media_body(phone) for phone in audience(count)]

    async def send_all() -> list[str]:
        slots = asyncio.Semaphore(workers)

        async def one(body: dict) -> str:
            async with slots:
                return await hook.apost_message_body(body)

        try:
            return await asyncio.gather(*(one(body) for body in bodies))
        finally:
            hook.aclose()

    hook.post_message_body(bodies[0])  # the connection settings, outside the timing
    cpu, started = cpu_seconds(), time.perf_counter()
    ids = uvloop.run(send_all())
    elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    hook.close()
    if len(set(ids)) != count:
        raise RuntimeError(f"the hook returned {len(set(ids))} distinct ids for {count} sends")
    return {"msg_per_s": count / elapsed, "cpu_us_per_msg": cpu / count * 1e6}


def operator_alone(count: int, workers: int, store_url: str, transport: str = "event_loop") -> dict[str, float]:
    """The media operator sending ``count`` rows, ``workers`` at a time on ``transport``
    ([pepipost] send_transport), its ledger in ``store_url``."""
    from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

    os.environ["AIRFLOW__PEPIPOST__SEND_TRANSPORT"] = transport

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
    """Each transport, hook alone and in the operator, alternated ``repeats`` times in one run
    against one stand-in: the event loop (the default) beside the threads (before it)."""
    names = ("hook_loop", "hook_threads", "op_loop", "op_threads")
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp, standin_process(LATENCY) as (url, pid):
        standin_cpu = cpu_seconds(pid)
        for repeat in range(repeats):
            for transport in ("event_loop", "threads"):
                store_url = f"sqlite:///{Path(tmp) / f'send-limit-{repeat}-{transport}.db'}"
                point_connection(url, store_url)
                hook_run = hook_on_a_loop if transport == "event_loop" else hook_alone
                suffix = "loop" if transport == "event_loop" else "threads"
                runs[f"hook_{suffix}"].append(hook_run(count, workers))
                runs[f"op_{suffix}"].append(operator_alone(count, workers, store_url, transport))
        requests_served = repeats * 2 * (2 * count + 1)
        standin_us = (cpu_seconds(pid) - standin_cpu) / requests_served * 1e6
    limit = workers / LATENCY

    def figure(name: str, key: str) -> dict[str, float]:
        return spread([r[key] for r in runs[name]], 0)

    return {
        "messages": count,
        "workers": workers,
        "latency_s": LATENCY,
        "limit_msg_per_s": limit,
        "hook_msg_per_s": figure("hook_loop", "msg_per_s"),
        "hook_cpu_us_per_msg": figure("hook_loop", "cpu_us_per_msg"),
        "operator_msg_per_s": figure("op_loop", "msg_per_s"),
        "operator_share_of_limit": round(statistics.median(r["msg_per_s"] for r in runs["op_loop"]) / limit, 3),
        "operator_cpu_us_per_msg": figure("op_loop", "cpu_us_per_msg"),
        "threads_hook_msg_per_s": figure("hook_threads", "msg_per_s"),
        "threads_hook_cpu_us_per_msg": figure("hook_threads", "cpu_us_per_msg"),
        "threads_operator_msg_per_s": figure("op_threads", "msg_per_s"),
        "threads_operator_cpu_us_per_msg": figure("op_threads", "cpu_us_per_msg"),
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
        ("  hook alone, same concurrency", fmt(result["hook_msg_per_s"], "msg/s"), "-", None),
        (
            "  before, on threads (send_transport = threads): operator",
            f"{fmt(result['threads_operator_msg_per_s'], 'msg/s')}, "
            f"{fmt(result['threads_operator_cpu_us_per_msg'], 'us')} a message",
            "-",
            None,
        ),
        (
            "  before, on threads: hook alone",
            f"{fmt(result['threads_hook_msg_per_s'], 'msg/s')}, "
            f"{fmt(result['threads_hook_cpu_us_per_msg'], 'us')} a message",
            "-",
            None,
        ),
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
