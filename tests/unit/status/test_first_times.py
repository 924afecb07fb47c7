"""Each message's first delivered and first read time, kept beside its status (schema v6)."""

from __future__ import annotations

from sqlalchemy import select, text, update

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status import store as store_module
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore


def ev(message_id: str, status: str, at: float | None) -> DeliveryEvent:
    return DeliveryEvent(message_id, status, status, at, raw=f"{message_id}{status}{at}")


def times(store: StatusStore, message_id: str) -> tuple:
    st = schema.message_status
    with store.engine.connect() as conn:
        return tuple(
            conn.execute(
                select(st.c.status, st.c.delivered_at, st.c.read_at).where(st.c.message_id == message_id)
            ).one()
        )


def test_the_first_report_of_each_status_sets_its_time_and_nothing_lowers_it(store_url):
    store = StatusStore(store_url)
    store.ingest([ev("m1", "sent", 100.0), ev("m1", "delivered", 120.0)])
    assert times(store, "m1") == ("delivered", 120.0, None)
    store.ingest([ev("m1", "read", 130.0)])
    assert times(store, "m1") == ("read", 120.0, 130.0)
    store.ingest([ev("m1", "read", 125.0), ev("m1", "delivered", 110.0)])  # late duplicates
    assert times(store, "m1") == ("read", 120.0, 130.0)
    store.ingest([ev("m3", "read", 50.0)])  # read first: read implies delivered
    store.ingest([ev("m3", "delivered", 40.0)])  # a delivered after the read changes nothing
    assert times(store, "m3") == ("read", 50.0, 50.0)
    store.ingest([ev("m4", "delivered", 60.0), ev("m4", "read", 70.0), ev("m4", "delivered", 55.0)])
    assert times(store, "m4") == ("read", 55.0, 70.0)  # within one batch the earliest wins
    store.ingest([ev("m2", "delivered", 10.0)])
    store.ingest([ev("m2", "failed", 20.0)])
    assert times(store, "m2") == ("failed", 10.0, None)


def test_a_v5_store_gets_the_times_from_its_events(store_url):
    store = StatusStore(store_url)
    store.ingest([ev("m1", "delivered", 50.0), ev("m1", "read", 70.0), ev("m2", "sent", 5.0)])
    with store.engine.begin() as conn:  # back to what a v5 provider left: no times
        conn.execute(update(schema.message_status).values(delivered_at=None, read_at=None))
        conn.execute(text("DELETE FROM pepipost_schema_version"))
        conn.execute(text("INSERT INTO pepipost_schema_version (version, applied_at) VALUES (5, 0)"))
    store_module._SCHEMA_READY.discard(store_url)
    migrated = StatusStore(store_url)
    assert migrated.schema_version() == schema.SCHEMA_VERSION
    assert times(migrated, "m1") == ("read", 50.0, 70.0) and times(migrated, "m2") == ("sent", None, None)
