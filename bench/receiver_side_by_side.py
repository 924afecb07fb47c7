"""The receivers of several versions of the package, side by side: one event a body, alternating.

Each folder given holds an ``airflow_provider_pepipost`` (a git worktree of an older commit, say);
``installed`` is the one this virtualenv imports. Each gets its own ``pepipost-webhook`` process
and store, and they take turns under ``bench/ingest_ceiling.py``'s load client, the order reversed
every round, so that the machine's noise falls on all of them. Only what is stored counts.

Run from the repository:
python -m bench.receiver_side_by_side /tmp/base installed [--postgres URL] [--rounds 5] [--seconds 2.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench.* from the repository
    sys.path.insert(0, str(ROOT))

from bench.ingest_ceiling import SECONDS, Target, _python_path, measure  # noqa: E402
from bench.webhook_ingest import receiver  # noqa: E402

INSTALLED = "installed"


def side_by_side(trees: list[str], postgres_url: str | None, rounds: int, seconds: float) -> list[dict]:
    """Each tree's events/s and server CPU a request on each store: a row per tree and store."""
    runs: dict[tuple[str, str], list[dict]] = {}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pepipost-side-by-side-")))
        targets: list[tuple[tuple[str, str], Target]] = []
        for store in ["sqlite", "postgresql"] if postgres_url else ["sqlite"]:
            for number, tree in enumerate(trees):
                if store == "sqlite":
                    store_url = f"sqlite:///{tmp / f'tree{number}.db'}"
                else:
                    from bench.pg import scratch_database

                    store_url = stack.enter_context(scratch_database(postgres_url))
                with _python_path(None if tree == INSTALLED else tree):
                    url, process = stack.enter_context(receiver(store_url, 1))
                targets.append(((store, tree), Target(tree, url, process, store_url)))
        for _, target in targets:  # warm-up: schema, pools, page cache
            measure(target, 50, 0.5)
            measure(target, 1, 0.5)
        for round_ in range(rounds):
            for key, target in targets if round_ % 2 == 0 else targets[::-1]:
                runs.setdefault(key, []).append(measure(target, 1, seconds))
    rows = []
    for (store, tree), measured in runs.items():
        rates = [m["events_per_s"] for m in measured]
        rows.append(
            {
                "store": store,
                "tree": tree,
                "events_per_s": statistics.median(rates),
                "min": min(rates),
                "max": max(rates),
                "server_cpu_us_per_request": statistics.median(m["server_cpu_us_per_request"] for m in measured),
            }
        )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", help=f"folders holding the package, or {INSTALLED!r}")
    parser.add_argument("--postgres", default=os.environ.get("PEPIPOST_BENCH_POSTGRES_URL"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of one run")
    args = parser.parse_args()
    for row in side_by_side(args.trees, args.postgres, args.rounds, args.seconds):
        print(
            f"{row['store']:10} {row['tree']:30} {row['events_per_s']:7,.0f} events/s "
            f"({row['min']:,}-{row['max']:,}), {row['server_cpu_us_per_request']:.0f} us CPU a request"
        )
