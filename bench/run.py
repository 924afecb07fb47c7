"""`make bench`: every benchmark side by side in one run, each figure next to its target and baseline.

Prints a table and writes bench/results/bench.json. PostgreSQL figures come when
PEPIPOST_BENCH_POSTGRES_URL (or PEPIPOST_TEST_POSTGRES_URL) names a server; the Celery row also
needs Redis (PEPIPOST_BENCH_REDIS_URL or PEPIPOST_TEST_REDIS_URL, else 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    campaign_page,
    celery_scale,
    ingest_ceiling,
    memory_stream,
    send_limit,
    send_throughput,
    sensor_poke,
    store_size,
    webhook_ingest,
)


def table(rows: list[tuple[str, str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def spread_ms(timing: dict[str, float]) -> str:
    """A median with the spread of the runs it came from: '73 ms (70-81)'."""
    return f"{timing['median']} ms ({timing['min']}-{timing['max']})"


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-rows", type=int, default=int(os.environ.get("PEPIPOST_BENCH_MEMORY_ROWS", 200_000)))
    parser.add_argument(
        "--only", choices=["send", "memory", "ingest", "poke", "celery", "page", "size"], action="append"
    )
    parser.add_argument(
        "--size-messages", type=int, default=int(os.environ.get("PEPIPOST_BENCH_SIZE_MESSAGES", 1_000_000))
    )
    args = parser.parse_args()
    pg = os.environ.get("PEPIPOST_BENCH_POSTGRES_URL") or os.environ.get("PEPIPOST_TEST_POSTGRES_URL")
    only = set(args.only or ["send", "memory", "ingest", "poke", "celery", "page", "size"])
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    rows = [("figure", "measured", "target", "verdict")]

    def add(figure: str, measured: str, target: str = "-", ok: bool | None = None) -> None:
        rows.append((figure, measured, target, "-" if ok is None else verdict(ok)))

    started = time.monotonic()

    if "send" in only:
        print("[bench] 1/7 send throughput (sandbox latency 50 ms) ...", flush=True)
        send = results["send"] = send_throughput.run(postgres_url=pg)
        base = send["baseline_msg_per_s"]
        add("sequential requests.post loop (baseline)", f"{base} msg/s")
        for r in send["runs"]:
            add(
                f"{r['kind']} operator, {r['workers']} workers, {r['messages']} msgs, {r['ledger']} ledger",
                f"{r['msg_per_s']} msg/s = {r['share_of_limit']:.0%} of {r['limit_msg_per_s']:.0f}",
                ">= 90% of workers/latency",
                r["share_of_limit"] >= 0.9,
            )
            add(
                f"  ratio to baseline ({r['workers']} workers, {r['ledger']})",
                f"{r['vs_baseline']}x",
                ">= 15x",
                r["vs_baseline"] >= 15,
            )
        print("[bench] 1/7 one send task at the limit (vendor stand-in, 50 ms) ...", flush=True)
        limit = results["send_limit"] = send_limit.run()
        for row in send_limit.rows(limit):
            add(*row)
    if "memory" in only:
        print(f"[bench] 2/7 memory, {args.memory_rows} JSONL rows streamed ...", flush=True)
        mem = results["memory"] = memory_stream.run(args.memory_rows)
        add(
            f"peak RSS, {mem['rows']} rows validated + sent",
            f"{mem['peak_rss_mb']} MB",
            "< 300 MB",
            mem["peak_rss_mb"] < 300,
        )
        add("  send rate, no latency", f"{mem['msg_per_s']} msg/s")
    if "ingest" in only:
        print("[bench] 3/7 webhook ingest ...", flush=True)
        ingest = results["ingest"] = webhook_ingest.run(pg)
        for r in ingest:
            add(
                f"webhook ingest, {r['store']}, batch {r['batch']} ({r['clients']} clients)",
                f"{r['events_per_s']} ev/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms",
                ">= 2000 ev/s",
                r["events_per_s"] >= 2000,
            )
        print("[bench] 3/7 webhook ingest against a bare FastAPI ceiling ...", flush=True)
        ceiling = results["ingest_ceiling"] = ingest_ceiling.run(pg)
        for row in ingest_ceiling.rows(ceiling):
            add(*row)
    if "poke" in only:
        print("[bench] 4/7 sensor poke over 100k ids ...", flush=True)
        poke = results["poke"] = sensor_poke.run(100_000, pg)
        for store, r in poke.items():
            by_ids, by_ledger = r["poke_ms_ids_one_parameter"], r["poke_ms_ledger_reference"]
            add(
                f"sensor poke, {store}, 100k ids / {r['events']} events",
                spread_ms(by_ids),
                "< 500 ms",
                by_ids["max"] < 500,
            )
            add(f"  before (chunked IN lists), {store}", f"{r['poke_ms_ids_chunked_before']} ms")
            add(f"  by ledger reference, {store}", spread_ms(by_ledger), "< 500 ms", by_ledger["max"] < 500)
    if "celery" in only:
        print("[bench] 5/7 mapped campaign across Celery workers, one then two (sandbox latency 50 ms) ...", flush=True)
        if reason := celery_scale.unavailable(pg, celery_scale.redis_url()):
            add("mapped campaign across Celery workers", f"skipped: {reason}")
        else:
            scale = results["celery"] = celery_scale.run(pg, celery_scale.redis_url())
            for r in scale["runs"]:
                add(
                    f"mapped campaign, {r['messages']} rows, {r['workers']} Celery worker(s), {r['slots']} slots",
                    f"{r['msg_per_s']} msg/s = {r['msg_per_s'] / r['limit_msg_per_s']:.0%} of "
                    f"{r['limit_msg_per_s']:.0f} ({r['send_seconds']} s of sends, run {r['run_wall_seconds']} s)",
                )
            add("  ratio, 2 workers / 1 worker", f"{scale['ratio']}x")
    if "page" in only:
        print("[bench] 6/7 the campaign page over 100k messages ...", flush=True)
        pages = results["page"] = campaign_page.run(100_000, pg)
        for store, page in pages.items():
            add(f"campaign page, 100k messages, {store}: the page", spread_ms(page["page_ms"]), "< 500 ms",
                page["page_ms"]["max"] < 500)  # fmt: skip
            add("  its figures (StatusStore.campaign_report)", f"{page['report_ms']} ms")
            add("  the CSV of every recipient", f"{page['csv_seconds']} s")

    if "size" in only:
        print(
            f"[bench] 7/7 the store's size and a purge of {args.size_messages:,} messages under ingest ...", flush=True
        )
        size = results["size"] = store_size.run(args.size_messages, pg)
        for backend in ("sqlite", "postgresql"):
            if backend in size:
                figures = size[backend]
                add(
                    f"store size per message (ledger, row, status, 3 reports), {backend}",
                    f"{figures['bytes_per_message']} B",
                )
                add(
                    f"  purge of {args.size_messages:,} messages under ingest, {backend}",
                    f"{figures['purge_seconds']} s, {figures['reports_during']} reports during it, "
                    f"{figures['reports_refused']} refused",
                    "0 refused",
                    figures["reports_refused"] == 0,
                )

    results["wall_seconds"] = round(time.monotonic() - started, 1)
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(rows))
    print(f"\n[bench] {results['machine']}; {results['wall_seconds']} s; written to bench/results/bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
