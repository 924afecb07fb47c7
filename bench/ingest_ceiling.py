"""Bench 3b: the receiver's ingest as a share of the framework's ceiling, measured in one run.

The ceiling is a bare FastAPI endpoint under uvicorn (the receiver's server, parser and event loop)
that only parses the same JSON and answers with its count of events; beside it, once a repeat, the
same work as a plain ASGI function under uvicorn (no framework), since the receiver serves its
report route ahead of FastAPI's layers. Beside it, in the same run and
under the same load client, the receiver (``pepipost-webhook``) on SQLite and on PostgreSQL, with one
event a body and with 50, and with ``--workers 2``. Runs of the ceiling and of the receiver
alternate (and swap order every repeat), so that the machine's noise falls on both. Every receiver
run ends by counting the events in its store: only what is stored counts.

The load client is one asyncio process on raw sockets (keep-alive, one request in flight a
connection, no pipelining): about a tenth of ``http.client``'s CPU per request, which on a small
machine is CPU the servers measured here did not get.

Run alone, from the repository:
python -m bench.ingest_ceiling [--postgres URL] [--repeats 3] [--linger S] [--compare-with DIR]
(``--linger S`` adds the receiver with ``--commit-linger S`` beside the default, one event a body;
``--compare-with DIR`` the receiver of another version of the package unpacked in DIR.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench.* from the repository
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    BIN,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    percentile,
    spread,
    wait_http,
)
from bench.pg import local_postgres_cpu_seconds  # noqa: E402
from bench.webhook_ingest import TOKEN, bodies, receiver  # noqa: E402

TARGET_SHARE = 0.6  # of the ceiling, one event a body, on each store
CLIENTS = 16  # connections of the load client
SECONDS = 2.5  # a run
# Bodies made for a receiver's run, per second of it: more than it takes, so that time ends the run.
# The ceiling stores nothing: it gets the same few bodies over and over.
BODIES_PER_SECOND = {1: 12_000, 50: 1_500}
CEILING_BODIES = 2_000


# -- the ceiling --------------------------------------------------------------------------------


def bare_app():
    """The ceiling: FastAPI that reads the body, parses its JSON and answers with the count of events."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/pepipost/webhook")
    async def webhook(request: Request) -> JSONResponse:
        data = json.loads(await request.body())
        return JSONResponse({"accepted": len(data["delivery_status"])})

    @app.get("/pepipost/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return app


async def bare_asgi(scope: dict, receive: Callable, send: Callable) -> None:
    """The same work as ``bare_app`` with no framework at all: the ceiling of uvicorn alone.

    The receiver serves its report route ahead of FastAPI's layers (``webhook.shortcut``); its share
    of this ceiling shows what the framework it skips would have cost it.
    """
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    if scope["method"] == "GET":  # the health check the bench waits for
        answer = b'{"status":"ok"}'
    else:
        answer = b'{"accepted":%d}' % len(json.loads(body)["delivery_status"])
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


@contextmanager
def bare_process(
    app: str = "bench.ingest_ceiling:bare_app", factory: bool = True
) -> Iterator[tuple[str, subprocess.Popen]]:
    """The ceiling under uvicorn as the receiver runs it (httptools, uvloop, no access log)."""
    port = free_port()
    command = [str(BIN / "python"), "-m", "uvicorn", app]
    command += ["--factory"] if factory else ["--lifespan", "off"]  # an ASGI function has no lifespan
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning"]
    command += ["--http", "httptools", "--loop", "uvloop"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/pepipost/healthz")
        yield f"http://127.0.0.1:{port}/pepipost/webhook", process
    finally:
        process.terminate()
        process.wait(timeout=30)


# -- the load client ----------------------------------------------------------------------------


class _Poster(asyncio.Protocol):
    """One keep-alive connection: a request, its whole answer, the next request; until time or bodies end."""

    def __init__(self, shared: _Load) -> None:
        self.shared, self.buffer, self.head_end, self.length = shared, bytearray(), -1, 0
        self.started = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._send_next()

    def _send_next(self) -> None:
        request = self.shared.next_request()
        if request is None:
            self.transport.close()
            return
        self.buffer.clear()
        self.head_end = -1
        self.started = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end < 0:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end < 0:
                return
            head = bytes(self.buffer[: self.head_end]).lower()
            at = head.find(b"content-length:")
            self.length = int(head[at + 15 : head.find(b"\r\n", at) if head.find(b"\r\n", at) > 0 else None])
        end = self.head_end + 4 + self.length
        if len(self.buffer) < end:
            return
        status = int(self.buffer[9:12])
        self.shared.answered(status, bytes(self.buffer[self.head_end + 4 : end]), time.perf_counter() - self.started)
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        self.shared.closed(exc)


class _Load:
    """What the connections of one run share: the requests, the deadline and the tally."""

    def __init__(self, requests: Iterator[bytes], seconds: float, connections: int) -> None:
        self.requests, self.deadline = requests, time.monotonic() + seconds
        self.open = connections
        self.accepted = self.answers = 0
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: Exception | None = None

    def next_request(self) -> bytes | None:
        if time.monotonic() >= self.deadline:
            return None
        return next(self.requests, None)

    def answered(self, status: int, body: bytes, seconds: float) -> None:
        self.answers += 1
        self.latencies.append(seconds)
        if status == 200:
            self.accepted += json.loads(body)["accepted"]
        else:
            self.statuses[status] = self.statuses.get(status, 0) + 1

    def closed(self, exc: Exception | None) -> None:
        self.error = self.error or exc
        self.open -= 1
        if self.open == 0 and not self.done.done():
            self.done.set_result(None)


def requests_for(url: str, payloads: list[bytes]) -> list[bytes]:
    """Whole HTTP/1.1 requests, made before the clock starts."""
    parts = urlsplit(url)
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nX-Pepipost-Token: {TOKEN}\r\n"
    head += "Content-Type: application/json\r\nContent-Length: "
    return [f"{head}{len(body)}\r\n\r\n".encode() + body for body in payloads]


def post_all(url: str, requests: Iterator[bytes], seconds: float, connections: int = CLIENTS) -> dict[str, Any]:
    """Post ``requests`` over ``connections`` until they or ``seconds`` run out; the tally."""
    parts = urlsplit(url)

    async def main() -> dict[str, Any]:
        load = _Load(requests, seconds, connections)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        for _ in range(connections):
            await loop.create_connection(lambda: _Poster(load), parts.hostname, parts.port)
        await asyncio.wait_for(load.done, seconds + 120)
        return {
            "accepted": load.accepted,
            "answers": load.answers,
            "refused": load.statuses,
            "seconds": time.perf_counter() - started,
            "latencies": load.latencies,
            "error": repr(load.error) if load.error else None,
        }

    return _run_async(main)


def _run_async(main: Callable[[], Any]) -> Any:
    """``main()`` on a new uvloop loop (the lighter client), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return asyncio.run(main())
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


# -- processes: CPU and memory ------------------------------------------------------------------


# -- one measured run ---------------------------------------------------------------------------


class Target:
    """A server under load: the ceiling or one receiver configuration."""

    def __init__(self, name: str, url: str, process: subprocess.Popen, store_url: str | None = None) -> None:
        self.name, self.url, self.process, self.store_url = name, url, process, store_url
        self._store = None
        self._same: dict[int, list[bytes]] = {}

    def requests(self, batch: int, seconds: float) -> Iterator[bytes]:
        """New events for a receiver (a duplicate would not count); the same few for the ceiling."""
        if self.store_url is not None:
            return iter(requests_for(self.url, bodies(batch, int(BODIES_PER_SECOND[batch] * seconds) * batch)))
        if batch not in self._same:
            self._same[batch] = requests_for(self.url, bodies(batch, CEILING_BODIES * batch))
        return itertools.cycle(self._same[batch])

    def stored_events(self) -> int | None:
        if self.store_url is None:
            return None
        if self._store is None:
            from airflow_provider_pepipost.status.store import StatusStore

            self._store = StatusStore(self.store_url)
        return self._store.count_rows("pepipost_events")


def measure(target: Target, batch: int, seconds: float = SECONDS, clients: int = CLIENTS) -> dict[str, Any]:
    """One run: events per second recorded (counted in the store for the receiver), and CPU per request."""
    requests = target.requests(batch, seconds)
    before = target.stored_events()
    on_postgres = target.store_url is not None and target.store_url.startswith("postgresql")
    database_cpu = local_postgres_cpu_seconds() if on_postgres else None
    server_cpu, client_cpu = cpu_seconds(target.process.pid), time.process_time()
    tally = post_all(target.url, requests, seconds, clients)
    server_cpu, client_cpu = cpu_seconds(target.process.pid) - server_cpu, time.process_time() - client_cpu
    if database_cpu is not None:  # the server's processes, when they run on this machine
        database_cpu = (local_postgres_cpu_seconds() or database_cpu) - database_cpu
    after = target.stored_events()
    events = tally["accepted"] if before is None else after - before
    answers = max(tally["answers"], 1)
    if before is not None and events != tally["accepted"]:  # an answer for an event not stored: a bug
        raise AssertionError(f"{target.name}: {tally['accepted']} events acknowledged, {events} stored")
    return {
        "events": events,
        "events_per_s": round(events / tally["seconds"]),
        "requests_per_s": round(tally["answers"] / tally["seconds"]),
        "refused": tally["refused"],
        "p50_ms": round(percentile(tally["latencies"], 0.5) * 1000, 2),
        "p99_ms": round(percentile(tally["latencies"], 0.99) * 1000, 2),
        "server_cpu_us_per_request": round(server_cpu / answers * 1e6),
        "client_cpu_us_per_request": round(client_cpu / answers * 1e6),
        # On SQLite the database is the receiver's own CPU; a PostgreSQL server elsewhere is not counted.
        "database_cpu_us_per_request": 0 if database_cpu is None else round(database_cpu / answers * 1e6),
        "error": tally["error"],
    }


# -- the whole bench ----------------------------------------------------------------------------


def run(
    postgres_url: str | None,
    repeats: int = 3,
    linger: float | None = None,
    seconds: float = SECONDS,
    compare_with: str | None = None,
) -> dict:
    """Every configuration beside the ceiling, ``repeats`` times alternating; medians, spreads, ratios.

    ``linger`` adds the receiver with ``--commit-linger linger``, and ``compare_with`` (a folder holding
    another version of ``airflow_provider_pepipost``) that version's receiver, one event a body, on each store.
    """
    started = time.monotonic()
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pepipost-bench-")))
        stores = {"sqlite": f"sqlite:///{tmp / 'ingest.db'}"}
        if postgres_url:
            from bench.pg import scratch_database

            stores["postgresql"] = stack.enter_context(scratch_database(postgres_url))
        # (label, store, workers, options, batches)
        configs: list[tuple[str, str, int, tuple[str, ...], tuple[int, ...]]] = [
            (store, store, 1, (), (1, 50)) for store in stores
        ]
        configs += [(f"{store}, --workers 2", store, 2, (), (1,)) for store in stores]
        if linger is not None:
            option = ("--commit-linger", f"{linger:g}")
            configs += [(f"{store}, --commit-linger {linger:g}", store, 1, option, (1,)) for store in stores]
        if compare_with:
            configs += [(f"{store}, from {compare_with}", store, 1, (), (1,)) for store in stores]
        bare_url, bare_proc = stack.enter_context(bare_process())
        ceiling = Target("ceiling", bare_url, bare_proc)
        asgi_url, asgi_proc = stack.enter_context(bare_process("bench.ingest_ceiling:bare_asgi", factory=False))
        asgi_ceiling = Target("ceiling without FastAPI", asgi_url, asgi_proc)
        targets = {}
        for label, store, workers, options, _ in configs:
            store_url = stores[store]
            if workers > 1 and store == "sqlite":  # a file of its own, beside the one-process receiver's
                store_url = f"sqlite:///{tmp / 'ingest-workers.db'}"
            with _python_path(compare_with if compare_with and label.endswith(compare_with) else None):
                url, process = stack.enter_context(receiver(store_url, workers, *options))
            targets[label] = Target(label, url, process, store_url)
        for target in [ceiling, asgi_ceiling, *targets.values()]:  # warm-up: schema, pools, page cache
            measure(target, 50, 0.5)
            measure(target, 1, 0.5)
        bare_runs: dict[int, list[dict]] = {1: [], 50: []}
        asgi_runs: list[dict] = []
        runs: dict[tuple[str, int], list[tuple[dict, dict]]] = {}
        for repeat in range(repeats):
            asgi_runs.append(measure(asgi_ceiling, 1, seconds))  # once a repeat, one event a body
            for label, *_, batches in configs:
                for batch in batches:
                    order = [ceiling, targets[label]] if repeat % 2 == 0 else [targets[label], ceiling]
                    measured = {target.name: measure(target, batch, seconds) for target in order}
                    bare_runs[batch].append(measured["ceiling"])
                    runs.setdefault((label, batch), []).append((measured["ceiling"], measured[label]))
        memory = {label: peak_rss_mb(target.process.pid) for label, target in targets.items()}
        memory["ceiling"] = peak_rss_mb(bare_proc.pid)
    result: dict[str, Any] = {
        "clients": CLIENTS,
        "cores": len(os.sched_getaffinity(0)),
        "seconds_per_run": seconds,
        "repeats": repeats,
        "ceiling": {str(batch): summary(measured) for batch, measured in bare_runs.items()},
        "ceiling_without_fastapi": summary(asgi_runs),
        "receiver": [],
        "peak_rss_mb": memory,
    }
    for (label, batch), pairs in runs.items():
        ratios = [mine["events_per_s"] / bare["events_per_s"] for bare, mine in pairs]
        result["receiver"].append(
            {"config": label, "batch": batch, **summary([mine for _, mine in pairs]), "ratio": spread(ratios, 3)}
        )
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


@contextmanager
def _python_path(folder: str | None) -> Iterator[None]:
    """Processes started inside import from ``folder`` first (the package there, not the installed one)."""
    before = os.environ.get("PYTHONPATH")
    if folder:
        os.environ["PYTHONPATH"] = folder
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before


def summary(measured: list[dict]) -> dict[str, Any]:
    """The runs of one configuration: spreads of the rates, medians of the rest."""
    return {
        "events_per_s": spread([m["events_per_s"] for m in measured], 3),
        "requests_per_s": spread([m["requests_per_s"] for m in measured], 3),
        "events": sum(m["events"] for m in measured),
        "p50_ms": statistics.median(m["p50_ms"] for m in measured),
        "p99_ms": statistics.median(m["p99_ms"] for m in measured),
        "server_cpu_us_per_request": statistics.median(m["server_cpu_us_per_request"] for m in measured),
        "client_cpu_us_per_request": statistics.median(m["client_cpu_us_per_request"] for m in measured),
        "database_cpu_us_per_request": statistics.median(m["database_cpu_us_per_request"] for m in measured),
        "refused": sum(sum(m["refused"].values()) for m in measured),
        "errors": [m["error"] for m in measured if m["error"]],
    }


def rows(result: dict) -> list[tuple[str, str, str, bool | None]]:
    """(figure, measured, target, ok) for ``bench/run.py``'s table."""

    def rate(figures: dict) -> str:
        events = figures["events_per_s"]
        return f"{events['median']:.0f} ev/s ({events['min']:.0f}-{events['max']:.0f})"

    out: list[tuple[str, str, str, bool | None]] = []
    for batch, figures in result["ceiling"].items():
        out.append(
            (
                f"ingest ceiling (bare FastAPI parse), batch {batch}, {result['clients']} connections",
                f"{rate(figures)}, {figures['server_cpu_us_per_request']} us CPU/request",
                "-",
                None,
            )
        )
    bare = result["ceiling_without_fastapi"]
    out.append(
        (
            f"ingest ceiling without FastAPI (uvicorn and an ASGI function), batch 1, {result['clients']} connections",
            f"{rate(bare)}, {bare['server_cpu_us_per_request']} us CPU/request",
            "-",
            None,
        )
    )
    for r in result["receiver"]:
        ratio = r["ratio"]
        judged = r["batch"] == 1 and "," not in r["config"]  # the target: one event a body, each store
        out.append(
            (
                f"  receiver, {r['config']}, batch {r['batch']}: share of the ceiling",
                f"{ratio['median']:.0%} ({ratio['min']:.0%}-{ratio['max']:.0%}), {rate(r)}, "
                f"{r['server_cpu_us_per_request']} us CPU/request"
                + (
                    f"; {r['events_per_s']['median'] / bare['events_per_s']['median']:.0%} of the one without FastAPI"
                    if r["batch"] == 1
                    else ""
                ),
                f">= {TARGET_SHARE:.0%}" if judged else "-",
                ratio["median"] >= TARGET_SHARE if judged else None,
            )
        )
        if judged:
            out.append(machine_bound(r, result["ceiling"]["1"], result["cores"]))
    peak = max(value for label, value in result["peak_rss_mb"].items() if label != "ceiling")
    out.append(("  receiver peak RSS (largest configuration, all its processes)", f"{peak} MB", "-", None))
    return out


def machine_bound(receiver: dict, ceiling: dict, cores: int) -> tuple[str, str, str, bool | None]:
    """What this machine could give the receiver at most: its cores busy all the time, divided by
    the CPU a report cost in these runs (receiver, database server when local, load client), all
    of them on the same cores. A share of the ceiling above it cannot be reached here."""
    parts = {
        "receiver": receiver["server_cpu_us_per_request"],
        "database": receiver["database_cpu_us_per_request"],
        "load client": receiver["client_cpu_us_per_request"],
    }
    bound = cores * 1e6 / max(sum(parts.values()), 1)
    share = bound / max(ceiling["events_per_s"]["median"], 1)
    spent = " + ".join(f"{name} {us:.0f}" for name, us in parts.items() if us)
    return (
        f"    its machine bound: {cores} cores busy all the time / CPU a report",
        f"{bound:.0f} ev/s = {share:.0%} of the ceiling ({spent} us a report)",
        "-",
        None,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default=os.environ.get("PEPIPOST_BENCH_POSTGRES_URL"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="length of one run")
    parser.add_argument("--linger", type=float, help="also the receiver with --commit-linger LINGER")
    parser.add_argument(
        "--compare-with",
        help="also the receiver of the airflow_provider_pepipost in this folder (e.g. an older version unpacked "
        "there), one event a body",
    )
    args = parser.parse_args()
    print(json.dumps(run(args.postgres, args.repeats, args.linger, args.seconds, args.compare_with), indent=2))
