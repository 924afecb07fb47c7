"""One receiver commit alone: a group of one-event bodies stored by ``StatusStore.ingest_many``,
with no server, no load client and no event loop, as the receiver's writer thread stores it.

Under the receiver's load a commit's cost hides among everything else on the machine; alone, its
wall time, its client CPU and (on a PostgreSQL server on this machine) the server's CPU are
steadier. Each tree given runs in a process of its own, on a new database, alternately.

Run from the repository:
python -m bench.store_commit /tmp/base installed --postgres URL [--bodies 1 8 16] [--commits 400] [--rounds 3]
(``installed`` is the package this virtualenv imports; any other argument is a folder holding an
``airflow_provider_pepipost``, a git worktree of an older commit, say. Without ``--postgres``, SQLite.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = "installed"
WARM_UP = 50  # commits before the measured ones: schema, pool, caches


def measure_here(store_url: str, bodies_file: Path, bodies_per_commit: int, commits: int) -> dict[str, float]:
    """In this process: per commit, its wall time, this process's CPU and the local PostgreSQL's (us)."""
    from airflow_provider_pepipost.status.store import StatusStore
    from airflow_provider_pepipost.webhook.payload import DEFAULT_STOP_SET, body_key, parse_body

    postgres_cpu = _bench_pg().local_postgres_cpu_seconds
    store = StatusStore(store_url)
    raw = [line.encode() for line in bodies_file.read_text().splitlines()]
    batches = [parse_body(json.loads(body), body_key(body), DEFAULT_STOP_SET) for body in raw]
    groups = [batches[start : start + bodies_per_commit] for start in range(0, len(batches), bodies_per_commit)]
    for group in groups[:WARM_UP]:
        store.ingest_many(group)
    server = postgres_cpu() if store_url.startswith("postgresql") else None
    wall, cpu = time.perf_counter(), time.process_time()
    for group in groups[WARM_UP:]:
        store.ingest_many(group)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if server is not None:
        server = (postgres_cpu() or server) - server
    stored = store.count_rows("pepipost_events")
    if stored != len(batches):
        raise AssertionError(f"{len(batches)} bodies of one event each, {stored} events stored")
    return {
        "wall_us": wall / commits * 1e6,
        "client_cpu_us": cpu / commits * 1e6,
        "server_cpu_us": 0.0 if server is None else server / commits * 1e6,
    }


def _bench_pg() -> Any:
    """``bench/pg.py`` by its path: with the repository on the path, its package would be imported
    instead of the tree's."""
    spec = importlib.util.spec_from_file_location("bench_pg", ROOT / "bench" / "pg.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure_tree(tree: str, store_url: str, bodies_file: Path, bodies_per_commit: int, commits: int) -> dict:
    """In a process of its own importing ``tree``'s package (this script by its path, from a folder
    of its own, so that nothing else on the path comes first)."""
    env = dict(os.environ)
    if tree != INSTALLED:
        env["PYTHONPATH"] = tree
    command = [sys.executable, str(Path(__file__).resolve()), "--here", store_url, "--bodies-file", str(bodies_file)]
    command += ["--bodies", str(bodies_per_commit), "--commits", str(commits)]
    out = subprocess.run(command, env=env, cwd=bodies_file.parent, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise RuntimeError(f"{tree}: the measurement failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", default=[INSTALLED])
    parser.add_argument("--postgres", default=os.environ.get("PEPIPOST_BENCH_POSTGRES_URL"))
    parser.add_argument("--bodies", type=int, nargs="+", default=[1, 8, 16], help="bodies a commit")
    parser.add_argument("--commits", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--here", help=argparse.SUPPRESS)  # one measurement in this process: its store's URL
    parser.add_argument("--bodies-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.here:
        print(json.dumps(measure_here(args.here, args.bodies_file, args.bodies[0], args.commits)))
        return
    if str(ROOT) not in sys.path:  # run as a script: bench.* from the repository
        sys.path.insert(0, str(ROOT))
    from bench.pg import scratch_database
    from bench.webhook_ingest import bodies

    figures: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        for round_ in range(args.rounds):
            for size in args.bodies:
                bodies_file = Path(tmp) / f"bodies-{round_}-{size}.jsonl"  # new events for every run
                for tree in args.trees if round_ % 2 == 0 else args.trees[::-1]:
                    bodies_file.write_text("\n".join(b.decode() for b in bodies(1, size * (WARM_UP + args.commits))))
                    with ExitStack() as stack:
                        if args.postgres:
                            store_url = stack.enter_context(scratch_database(args.postgres))
                        else:
                            store_url = f"sqlite:///{tmp}/commit-{uuid.uuid4().hex[:8]}.db"
                        figure = measure_tree(tree, store_url, bodies_file, size, args.commits)
                    figures.setdefault((tree, size), []).append(figure)
    for (tree, size), runs in figures.items():
        medians = {name: statistics.median(run[name] for run in runs) for name in runs[0]}
        print(
            f"{tree:30} {size:3} bodies a commit: {medians['wall_us']:6.0f} us wall, "
            f"{medians['client_cpu_us']:6.0f} us client CPU, {medians['server_cpu_us']:6.0f} us server CPU"
        )


if __name__ == "__main__":
    main()
