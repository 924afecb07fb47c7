"""Bench 5: a mapped campaign across Celery workers, 20,000 rows at 50 ms latency, one worker then two.

The unchanged mapped example (8 segments of 2,500 rows; the example sends with 4 threads a
segment) under CeleryExecutor, in one Airflow stack (the one tests/system/ runs: api-server,
scheduler, dag-processor, triggerer, Redis as the broker, PostgreSQL as the metadata database and
the status store): first with one worker of 4 task slots, then with a second one added. msg/s is
the rows over the time from the first send's start to the last send's end (task_instance dates),
so the stack's start-up and the sensor's wait do not count. Both workers share this machine's
cores: the second worker adds task slots, not CPUs.

Needs PostgreSQL (PEPIPOST_BENCH_POSTGRES_URL or PEPIPOST_TEST_POSTGRES_URL) and Redis
(PEPIPOST_BENCH_REDIS_URL, PEPIPOST_TEST_REDIS_URL, else redis://127.0.0.1:6379/0), and the
Celery stack (`pip install -e '.[celery]'`). Run alone: python -m bench.celery_scale
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import point_connection

MAPPED = "whatsapp_media_campaign_mapped"
LATENCY = 0.05
SEGMENTS, PER_SEGMENT = 8, 2_500
SLOTS = 4  # task slots per worker (airflow celery worker --concurrency)
THREADS = 4  # the example's max_workers per mapped send
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"


def redis_url() -> str:
    return os.environ.get("PEPIPOST_BENCH_REDIS_URL") or os.environ.get("PEPIPOST_TEST_REDIS_URL") or REDIS_DEFAULT


def unavailable(postgres_url: str | None, broker_url: str) -> str | None:
    """Why this bench cannot run here, or None."""
    if not postgres_url:
        return "needs PostgreSQL: set PEPIPOST_BENCH_POSTGRES_URL or PEPIPOST_TEST_POSTGRES_URL"
    from tests.system.stack import celery_stack_problem

    return celery_stack_problem(broker_url)


def campaign(stack: Any, sandbox: Any, run_id: str, workers: int) -> dict[str, Any]:
    """Trigger the mapped example with ``workers`` workers up; the send span's rate and the run's wall time."""
    accepted_before = sandbox.stats()["accepted"]
    runs_before = len(stack.run_states([MAPPED]).get(MAPPED, []))
    started = time.monotonic()
    stack.trigger(MAPPED, run_id, {"segments": SEGMENTS, "per_segment": PER_SEGMENT})
    stack.wait_for_runs([MAPPED], runs_before + 1, timeout=900)
    wall = time.monotonic() - started
    sends = [ti for ti in stack.task_instances(MAPPED, run_id) if ti["task_id"] == "send_segment"]
    span = (max(ti["end_date"] for ti in sends) - min(ti["start_date"] for ti in sends)).total_seconds()
    rows = SEGMENTS * PER_SEGMENT
    accepted = sandbox.stats()["accepted"] - accepted_before
    assert accepted == rows, f"{accepted} of {rows} accepted"
    return {
        "workers": workers,
        "slots": workers * SLOTS,
        "messages": rows,
        "send_seconds": round(span, 1),
        "msg_per_s": round(rows / span, 1),
        "limit_msg_per_s": min(SEGMENTS, workers * SLOTS) * THREADS / LATENCY,
        "run_wall_seconds": round(wall, 1),
        "segments_per_worker": dict(Counter(ti["hostname"] for ti in sends)),
    }


def run(postgres_url: str, broker_url: str) -> dict[str, Any]:
    """One stack; the campaign with one worker, then with a second worker started beside it."""
    from bench.pg import scratch_database
    from tests.helpers import free_port
    from tests.system.stack import AirflowStack, Sandbox, forget_celery_queue, start_receiver

    queue = f"pepipost-bench-{uuid.uuid4().hex[:8]}"
    sandbox = Sandbox()
    with (
        tempfile.TemporaryDirectory(prefix="pepipost-bench-celery-") as tmp,
        scratch_database(postgres_url) as metadata_url,
        scratch_database(postgres_url) as store_url,
    ):
        point_connection(sandbox.url, store_url)  # the stack's processes inherit both
        env = {
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": queue,
            "PEPIPOST_WEBHOOK_TOKEN": "bench-webhook-token",
        }
        stack = AirflowStack(Path(tmp), metadata_url, env, executor="CeleryExecutor")
        try:
            receiver = start_receiver(stack.procs, "receiver", free_port())
            scenario = {"latency": LATENCY, "final_mix": {"sent": 1.0}, "status_delay": 0.5}
            sandbox.start(stack.procs, receiver, scenario, "--any-source", "--no-record")
            stack.start([MAPPED])
            stack.start_celery_worker("worker-1", queue, SLOTS)
            one = campaign(stack, sandbox, "bench-celery-1-worker", 1)
            stack.start_celery_worker("worker-2", queue, SLOTS)
            two = campaign(stack, sandbox, "bench-celery-2-workers", 2)
        finally:
            stack.stop()
            forget_celery_queue(broker_url, queue)
    return {
        "latency_s": LATENCY,
        "segments": SEGMENTS,
        "per_segment": PER_SEGMENT,
        "runs": [one, two],
        "ratio": round(two["msg_per_s"] / one["msg_per_s"], 2),
    }


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    pg = os.environ.get("PEPIPOST_BENCH_POSTGRES_URL") or os.environ.get("PEPIPOST_TEST_POSTGRES_URL")
    if reason := unavailable(pg, redis_url()):
        raise SystemExit(reason)
    print(json.dumps(run(pg, redis_url()), indent=2))
