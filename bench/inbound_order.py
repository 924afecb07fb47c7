"""What the order lock on customer messages costs on PostgreSQL: filing replies, with and without it.

Since the reply feed (issue 23), a transaction that files customer messages on PostgreSQL first
takes a transaction-scoped advisory lock, so that their ids become visible in order. This files
single-reply bodies from ``--threads`` threads at once into one PostgreSQL store, alternating
rounds with the lock and without it (the step patched out), and prints replies per second of each,
side by side. Delivery reports never take the lock: their path only tests whether a body holds
customer messages.

    PEPIPOST_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:5432/test \\
        .venv/bin/python -m bench.inbound_order --replies 2000 --threads 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from airflow_provider_pepipost.status import ingest
from airflow_provider_pepipost.status.inbound import TextReply
from airflow_provider_pepipost.status.store import StatusStore
from bench.pg import scratch_database


@contextmanager
def without_order_lock() -> Iterator[None]:
    """``ingest.ingest_many`` with the lock step left out (the code before it)."""
    original = ingest.ingest_many

    def unlocked(conn, batches, now):  # type: ignore[no-untyped-def]
        results = [ingest.IngestResult(dead_letters=len(b.dead_letters), inbound=len(b.inbound)) for b in batches]
        for step in ingest.FILING_STEPS:
            step(conn, batches, results, now)
        return results

    ingest.ingest_many = unlocked
    try:
        yield
    finally:
        ingest.ingest_many = original


def file_replies(store: StatusStore, replies: int, threads: int, tag: str) -> float:
    """Replies per second, filed one body each from ``threads`` threads."""
    share = replies // threads

    def worker(number: int) -> None:
        for index in range(share):
            raw = json.dumps({"tag": tag, "worker": number, "index": index})
            store.ingest([], inbound=[TextReply("text", f"9198{number:02d}{index:06d}", None, raw, text="thanks")])

    workers = [threading.Thread(target=worker, args=(number,)) for number in range(threads)]
    started = time.perf_counter()
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return share * threads / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = os.environ.get("PEPIPOST_BENCH_POSTGRES_URL") or os.environ.get("PEPIPOST_TEST_POSTGRES_URL")
    if not server:
        raise SystemExit("set PEPIPOST_TEST_POSTGRES_URL (or PEPIPOST_BENCH_POSTGRES_URL) to a PostgreSQL server")
    with scratch_database(server) as url:
        store = StatusStore(url)
        locked, unlocked = [], []
        for round_number in range(args.rounds):
            locked.append(file_replies(store, args.replies, args.threads, f"locked-{round_number}"))
            with without_order_lock():
                unlocked.append(file_replies(store, args.replies, args.threads, f"unlocked-{round_number}"))
        store.engine.dispose()
    print(
        f"{args.replies} single-reply bodies from {args.threads} threads, {args.rounds} alternated rounds: "
        f"with the order lock {statistics.median(locked):,.0f} replies/s (rounds {[round(r) for r in locked]}), "
        f"without {statistics.median(unlocked):,.0f} (rounds {[round(r) for r in unlocked]}), "
        f"ratio {statistics.median(locked) / statistics.median(unlocked):.3f}"
    )


if __name__ == "__main__":
    main()
