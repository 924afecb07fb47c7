"""Bench 1: send throughput against the sandbox with a fixed 50 ms latency.

The operator (default and tuned workers) side by side with the loop a user writes today: one
requests.post per message, in sequence. Run alone, from the repository: python -m bench.send_throughput
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import requests
from sqlalchemy.engine import make_url

from bench.common import API_KEY, BenchTaskInstance, point_connection, sandbox_process

LATENCY = 0.05


def audience(count: int) -> list[str]:
    return [f"9198{index:08d}" for index in range(count)]


def media_body(phone: str) -> dict:
    """The send API's body of one media message to ``phone``, as a user's own loop posts it."""
    attachment = {"attachment_id": "m-1", "caption": "Hi"}
    return {
        "message": [
            {
                "recipient_whatsapp": phone,
                "message_type": "media",
                "recipient_type": "individual",
                "source": "bench-source",
                "type_media": [{"attachments": [attachment]}],
            }
        ]
    }


def sequential_baseline(base_url: str, count: int) -> float:
    """The baseline: a plain loop of requests.post, one message after the other. Returns msg/s."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    started = time.perf_counter()
    for phone in audience(count):
        body = media_body(phone)
        answer = requests.post(f"{base_url}/api/v2/message/", data=json.dumps(body), headers=headers, timeout=30)
        assert answer.json()["status"] == "success"
    return count / (time.perf_counter() - started)


def operator_rate(base_url: str, count: int, workers: int, store_url: str, kind: str = "media") -> dict:
    """A send operator (``kind`` media or template) sending ``count`` messages with ``workers`` threads,
    its ledger in ``store_url``."""
    from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator, SendWhatsAppTemplateOperator

    point_connection(base_url, store_url)
    common = {"task_id": "send", "recipients": audience(count), "max_workers": workers, "progress_interval": 3600}
    if kind == "template":  # an approved template of the sandbox's default scenario
        operator = SendWhatsAppTemplateOperator(template_name="spring_offer", attributes=["Hi"], **common)
    else:
        operator = SendWhatsAppMediaOperator(attachment_id="m-1", caption="Hi", **common)
    ti = BenchTaskInstance("bench_send", f"run-{uuid.uuid4().hex}")
    started = time.perf_counter()
    result = operator.execute({"ti": ti})
    elapsed = time.perf_counter() - started
    accepted = ti.xcom["send_summary"]["accepted"]
    assert accepted == count, ti.xcom["send_summary"]
    rate = count / elapsed
    limit = workers / LATENCY
    return {
        "kind": kind,
        "workers": workers,
        "ledger": make_url(store_url).get_backend_name(),
        "messages": count,
        "seconds": round(elapsed, 2),
        "msg_per_s": round(rate, 1),
        "limit_msg_per_s": limit,
        "share_of_limit": round(rate / limit, 3),
        "ids_returned": len(result),
    }


def run(
    count: int = 10_000, baseline_count: int = 300, tuned_workers: int = 48, postgres_url: str | None = None
) -> dict:
    """Baseline, then the operator with 16 and ``tuned_workers`` workers (SQLite ledger, and
    PostgreSQL for the tuned one when ``postgres_url`` names a server)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp, sandbox_process({"latency": LATENCY}) as url:
        baseline = sequential_baseline(url, baseline_count)
        for workers in (16, tuned_workers):
            runs.append(operator_rate(url, count, workers, f"sqlite:///{Path(tmp) / f'send-{workers}.db'}"))
        runs.append(operator_rate(url, count, 16, f"sqlite:///{Path(tmp) / 'send-template.db'}", kind="template"))
        if postgres_url:
            from bench.pg import scratch_database

            with scratch_database(postgres_url) as store_url:
                runs.append(operator_rate(url, count, tuned_workers, store_url))
    for row in runs:
        row["vs_baseline"] = round(row["msg_per_s"] / baseline, 1)
    return {
        "latency_s": LATENCY,
        "baseline_msg_per_s": round(baseline, 1),
        "baseline_messages": baseline_count,
        "runs": runs,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=48)
    parser.add_argument("--postgres")
    args = parser.parse_args()
    print(json.dumps(run(args.count, tuned_workers=args.workers, postgres_url=args.postgres), indent=2))
