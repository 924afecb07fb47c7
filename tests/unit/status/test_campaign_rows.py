"""The per-row table the campaign page reads (schema 8), on SQLite and PostgreSQL: filled from the
ledger for stores made before it, and kept to the latest try's audience."""

from __future__ import annotations

from sqlalchemy import insert, select

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status import store as store_module
from airflow_provider_pepipost.status.ledger import RowRecord, TaskKey
from airflow_provider_pepipost.status.store import StatusStore

TASK = TaskKey("d", "r", "send")


def ledger_row(key: str, row: int, state: str, code: str | None = None, message_id: str | None = None) -> dict:
    return {"idempotency_key": key, "api_header": key, "recipient": f"91980000000{row}", "dag_id": "d",
            "run_id": "r", "task_id": "send", "map_index": -1, "row_index": row, "state": state,
            "error_code": code, "message_id": message_id, "sent_at": 1.0, "updated_at": 1.0}  # fmt: skip


def test_a_store_before_schema_8_gets_its_rows_from_the_ledger(store_url):
    store = StatusStore(store_url)
    with store.engine.begin() as conn:
        conn.execute(insert(schema.ledger), [
            ledger_row("s0", 0, "accepted", message_id="m0"),
            ledger_row("s1", 1, "rejected", "8007"), ledger_row("t1", 1, "accepted", message_id="m1"),  # fallback
            ledger_row("s2", 2, "rejected", "8007"), ledger_row("t2", 2, "rejected", "8006"),  # both refused
            ledger_row("s3", 3, "sending"),
            ledger_row("s4", 4, "not_sent"),
        ])  # fmt: skip
        conn.execute(schema.schema_version.delete())
        conn.execute(insert(schema.schema_version).values(version=7, applied_at=1.0))
    store_module._SCHEMA_READY.discard(store_url)
    migrated = StatusStore(store_url)
    with migrated.engine.connect() as conn:
        rows = conn.execute(
            select(
                schema.campaign_rows.c.row_index, schema.campaign_rows.c.state, schema.campaign_rows.c.ledger_key
            ).order_by(schema.campaign_rows.c.row_index)
        ).all()
    assert [tuple(r) for r in rows] == [
        (0, "accepted", "s0"), (1, "fallback", "t1"), (2, "rejected", rows[2][2]), (3, "unknown", "s3"),
        (4, "not_sent", "s4"),
    ]  # fmt: skip
    assert migrated.campaign_report("d", "r").states["fallback"] == 1


def test_a_later_try_with_a_smaller_audience_leaves_no_row_of_the_earlier_one(store_url):
    store = StatusStore(store_url)
    store.write_ledger(TASK, rows=[RowRecord(i, f"91980000000{i}", "not_sent", None) for i in range(5)], attempt="a")
    store.write_ledger(TASK, rows=[RowRecord(i, f"91980000000{i}", "suppressed", None) for i in range(3)], attempt="b")
    store.prune_rows(TASK, "b")
    report = store.campaign_report("d", "r", "send")
    assert report.rows == 3 and report.states["suppressed"] == 3 and report.states["not_sent"] == 0


def test_the_reports_times_count_every_message_on_a_streaming_connection_too(store_url):
    """The times are read from the driver's cursor: a streaming connection (one row pre-buffered by
    SQLAlchemy) must not lose a message, and the connection stays usable afterwards."""
    from airflow_provider_pepipost.operators.campaign import CampaignSender
    from airflow_provider_pepipost.status import reports
    from airflow_provider_pepipost.status.model import DeliveryEvent
    from tests.faults.test_campaign_truth import StandInVendor, _message

    store = StatusStore(store_url)
    numbers = [f"9198{i:08d}" for i in range(5)]
    vendor = StandInVendor(dict.fromkeys(numbers, "accepted"))
    task = TaskKey("times", "r", "send")
    CampaignSender(vendor, store, task, total=5, max_workers=1).run([(i, _message(n)) for i, n in enumerate(numbers)])
    store.ingest([DeliveryEvent(mid, "delivered", "delivered", 2_000_000_000.0) for mid, _ in vendor.accepted.values()])
    assert store.campaign_report("times", "r").to_delivered.count == 5
    with store.engine.connect() as conn:
        streamed = reports.campaign_report(conn.execution_options(stream_results=True), "times", "r")
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    assert streamed.to_delivered.count == 5
