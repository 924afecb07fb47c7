"""Bench 2: peak memory of one process streaming a large JSON Lines audience through validation and sending.

The audience file is written first; a fresh child process then runs SendWhatsAppMediaOperator on
its path against the sandbox (no latency), sampling its own RSS as it goes.
Run alone, from the repository: python -m bench.memory_stream --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from bench.common import BenchTaskInstance, current_rss_mb, peak_rss_mb, point_connection, sandbox_process


def write_audience(path: Path, rows: int) -> None:
    with path.open("w") as handle:
        for index in range(rows):
            row = {"recipient_whatsapp": f"91{index:010d}", "name": f"Customer {index}", "attachment_id": "m-1"}
            handle.write(json.dumps(row) + "\n")


def child(path: str, base_url: str, store_url: str, workers: int) -> None:
    """Runs in the measured process: the operator on the file, RSS sampled every second."""
    from airflow_provider_pepipost.operators.whatsapp import SendWhatsAppMediaOperator

    point_connection(base_url, store_url)
    samples: list[tuple[float, float]] = []
    started = time.perf_counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((round(time.perf_counter() - started, 1), round(current_rss_mb(), 1)))

    threading.Thread(target=sample, daemon=True).start()
    operator = SendWhatsAppMediaOperator(
        task_id="send", recipients=path, caption="Hi {name}", max_workers=workers, progress_interval=30
    )
    ti = BenchTaskInstance("bench_memory", f"run-{uuid.uuid4().hex}")
    operator.execute({"ti": ti})
    stop.set()
    elapsed = time.perf_counter() - started
    summary = ti.xcom["send_summary"]
    print(
        json.dumps(
            {
                "rows": summary["total"],
                "accepted": summary["accepted"],
                "seconds": round(elapsed, 1),
                "msg_per_s": round(summary["total"] / elapsed),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "rss_samples_mb": samples[:: max(1, len(samples) // 12)],
            }
        )
    )


def run(rows: int = 1_000_000, workers: int = 32) -> dict:
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        path = Path(tmp) / "audience.jsonl"
        write_audience(path, rows)
        file_mb = round(path.stat().st_size / 2**20, 1)
        with sandbox_process({"latency": 0.0}) as url:
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.memory_stream",
                    "--child",
                    str(path),
                    url,
                    f"sqlite:///{Path(tmp) / 'memory.db'}",
                    str(workers),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["file_mb"] = file_mb
    return result


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        parser = argparse.ArgumentParser()
        parser.add_argument("--rows", type=int, default=1_000_000)
        parser.add_argument("--workers", type=int, default=32)
        args = parser.parse_args()
        print(json.dumps(run(args.rows, args.workers), indent=2))
