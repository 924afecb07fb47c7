"""``pepipost-store``: the status store's own maintenance, from a shell or a deployment's job.

``migrate`` brings the schema up to this provider's (as first use does); ``purge --older-than
DAYS`` deletes what is older, in batches, with ``--dry-run`` to see first; ``erase NUMBER``
forgets a person but keeps their STOP; ``stats`` shows rows, bytes and the oldest row per table.
The store is named as everywhere else: ``--store-conn-id``, ``--store-url``, or the resolver's
defaults (``[pepipost] status_store_conn_id``, ``$PEPIPOST_STATUS_STORE_URL``, SQLite).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone

from airflow_provider_pepipost.errors import PepipostError
from airflow_provider_pepipost.numbers import mask_number
from airflow_provider_pepipost.status.resolver import STORE_URL_ENV, store_source
from airflow_provider_pepipost.status.retention import DEFAULT_PURGE_BATCH
from airflow_provider_pepipost.status.store import StatusStore, open_store


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="pepipost-store", description=__doc__.splitlines()[0])
    top.add_argument("--store-conn-id", default=None, help="Airflow connection of the status store (postgres, sqlite)")
    top.add_argument("--store-url", default=None, help=f"SQLAlchemy URL; prefer --store-conn-id or ${STORE_URL_ENV}")
    top.add_argument("--json", action="store_true", help="print the result as JSON")
    commands = top.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="bring the schema up to this provider's")
    purge = commands.add_parser("purge", help="delete what is older than DAYS (never the suppression list)")
    purge.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    purge.add_argument("--batch-size", type=int, default=DEFAULT_PURGE_BATCH, help="rows per transaction")
    purge.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    erase = commands.add_parser("erase", help="forget a number everywhere; it stays suppressed under a keyed hash")
    erase.add_argument("number")
    commands.add_parser("stats", help="rows, bytes and the oldest row per table")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    where = "--store-url" if args.store_url else store_source(args.store_conn_id)
    try:
        store = open_store(args.store_conn_id, url=args.store_url)
        result = run(store, args)
    except (PepipostError, ValueError) as err:
        print(f"pepipost-store {args.command}: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"status store: {where}")
        print(describe(args.command, result))
    return 0


def run(store: StatusStore, args: argparse.Namespace) -> dict:
    if args.command == "migrate":
        return {"schema_version": store.schema_version()}
    if args.command == "purge":
        deleted = store.purge(args.older_than, batch_size=args.batch_size, dry_run=args.dry_run)
        return {"dry_run": args.dry_run, "older_than_days": args.older_than, "rows": deleted}
    if args.command == "erase":
        return {"number": mask_number(args.number), **store.erase(args.number).to_dict()}
    return {"tables": [table.__dict__ for table in store.stats()]}


def describe(command: str, result: dict) -> str:
    if command == "migrate":
        return f"schema version {result['schema_version']}"
    if command == "purge":
        verb = "would delete" if result["dry_run"] else "deleted"
        lines = [f"  {table:<28} {count:>12,}" for table, count in result["rows"].items()]
        total = sum(result["rows"].values())
        return f"{verb} {total:,} rows older than {result['older_than_days']:g} days:\n" + "\n".join(lines)
    if command == "erase":
        changed = {k: v for k, v in result.items() if k not in ("number", "suppression_kept")}
        return f"erased {result['number']}: {changed}; it stays suppressed under its keyed hash"
    lines = [f"  {'table':<28} {'rows':>12} {'bytes':>14}  oldest"]
    for table in result["tables"]:
        size = "-" if table["bytes"] is None else f"{table['bytes']:,}"
        oldest = "-" if table["oldest"] is None else _utc(table["oldest"])
        lines.append(f"  {table['table']:<28} {table['rows']:>12,} {size:>14}  {oldest}")
    return "\n".join(lines)


def _utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


if __name__ == "__main__":
    sys.exit(main())
