"""The report route's own CPU a body, on the event loop, in process: no server, no network, no store.

The receiver's share of the ingest ceiling (``bench/ingest_ceiling.py``) moves with everything the
machine does, by several per cent from one run to the next. What the route itself costs its event
loop is steadier when measured without the rest: this drives the receiver's ASGI app directly
(16 tasks posting one-event bodies, the body handed over in one ASGI message) with the store's
commit replaced by one that stores nothing, and reads the event loop thread's CPU time per body.
Each tree given runs in its own process, alternately, ``rounds`` times.

Run from the repository:
python -m bench.report_route_cpu /tmp/base installed [--rounds 5] [--bodies 10000]
(``installed`` is the package this virtualenv imports; any other argument is a folder holding an
``airflow_provider_pepipost``, a git worktree of an older commit, say.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INSTALLED = "installed"
TASKS = 16  # bodies in flight, as the ingest bench's connections
WARM_UP = 2_000  # bodies before the measured ones
TOKEN = "bench-route-token"


def _scope(body: bytes) -> dict:
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"x-pepipost-token", TOKEN.encode()),
               (b"content-length", str(len(body)).encode())]  # fmt: skip
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/pepipost/webhook", "raw_path": b"/pepipost/webhook", "root_path": "", "query_string": b"",
            "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 80)}  # fmt: skip


def measure_here(payloads: list[bytes]) -> float:
    """In this process: the event loop's CPU (us) per body, over the bodies after the first ``WARM_UP``."""
    import uvloop

    from airflow_provider_pepipost.status.ingest import IngestResult
    from airflow_provider_pepipost.status.store import StatusStore
    from airflow_provider_pepipost.webhook.app import create_app

    # The commit stores nothing: what is measured is the route, not the database.
    StatusStore.ingest_many = lambda self, batches: [IngestResult(accepted=len(b.events)) for b in batches]
    app = create_app(f"sqlite:///{tempfile.mkdtemp(prefix='pepipost-bench-')}/route.db", TOKEN)

    async def post(body: bytes) -> None:
        sent: list[dict] = []
        delivered = False

        async def receive() -> dict:
            nonlocal delivered
            if delivered:  # the body was delivered whole: nothing more comes on this request
                await asyncio.Event().wait()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await app(_scope(body), receive, send)
        if sent[0]["status"] != 200:
            raise RuntimeError(f"the route answered {sent[0]['status']}: {sent[-1].get('body', b'')[:200]!r}")

    async def run(chunk: list[bytes]) -> float:
        queue = iter(chunk)

        async def poster() -> None:
            for body in queue:
                await post(body)

        started = time.thread_time()
        await asyncio.gather(*(poster() for _ in range(TASKS)))
        return (time.thread_time() - started) / len(chunk) * 1e6

    uvloop.run(run(payloads[:WARM_UP]))  # warm-up: imports, the writer thread, caches
    return uvloop.run(run(payloads[WARM_UP:]))


def measure_tree(tree: str, payload_file: Path) -> float:
    """In a process of its own importing ``tree``'s package (this script by its path, from a folder
    of its own, so that nothing else on the path comes first)."""
    env = dict(os.environ)
    if tree != INSTALLED:
        env["PYTHONPATH"] = tree
    command = [sys.executable, str(Path(__file__).resolve()), "--here", str(payload_file)]
    out = subprocess.run(
        command, env=env, cwd=payload_file.parent, capture_output=True, text=True, timeout=600, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["us_per_body"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="*", default=[INSTALLED])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bodies", type=int, default=10_000)
    parser.add_argument("--here", help=argparse.SUPPRESS)  # one measurement in this process: the bodies' file
    args = parser.parse_args()
    if args.here:
        payloads = [line.encode() for line in Path(args.here).read_text().splitlines()]
        print(json.dumps({"us_per_body": round(measure_here(payloads), 2)}))
        return
    if str(ROOT) not in sys.path:  # run as a script: bench.* from the repository
        sys.path.insert(0, str(ROOT))
    from bench.webhook_ingest import bodies

    figures: dict[str, list[float]] = {tree: [] for tree in args.trees}
    with tempfile.TemporaryDirectory(prefix="pepipost-bench-") as tmp:
        payload_file = Path(tmp) / "bodies.jsonl"
        payload_file.write_text("\n".join(body.decode() for body in bodies(1, WARM_UP + args.bodies)))
        for round_ in range(args.rounds):
            for tree in args.trees if round_ % 2 == 0 else args.trees[::-1]:
                figures[tree].append(measure_tree(tree, payload_file))
    for tree, values in figures.items():
        print(f"{tree:40} {statistics.median(values):6.1f} us a body ({min(values):.1f}-{max(values):.1f})")


if __name__ == "__main__":
    main()
