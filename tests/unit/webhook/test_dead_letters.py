"""The store's side of the receiver: keyed dead letters (schema v3, migrated from v2), errors without values,
and when the last report came."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import insert, text

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status import store as store_module
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.logs import describe_error
from tests.store_reads import dead_letters


def test_a_v2_store_gets_keyed_dead_letters(store_url):
    store = StatusStore(store_url)
    with store.engine.begin() as conn:  # back to what a v2 provider made
        conn.execute(text("DROP INDEX ux_pepipost_dead_letters_key"))
        conn.execute(text("ALTER TABLE pepipost_dead_letters DROP COLUMN letter_key"))
        conn.execute(text("DELETE FROM pepipost_schema_version"))
        conn.execute(text("INSERT INTO pepipost_schema_version (version, applied_at) VALUES (2, 0)"))
        conn.execute(text("INSERT INTO pepipost_dead_letters (received_at, reason, raw) VALUES (1, 'old', '{}')"))
    store_module._SCHEMA_READY.discard(store_url)

    migrated = StatusStore(store_url)
    assert migrated.schema_version() == schema.SCHEMA_VERSION  # v3 and every step after it
    for _ in range(2):
        migrated.record_dead_letter("bad body", "{", key="body-hash")
    assert dead_letters(migrated) == [("old", "{}"), ("bad body", "{")]


def test_store_errors_name_no_bound_values(store_url):
    """A failed statement's error, as the receiver logs it, shows no phone number."""
    store = StatusStore(store_url)
    with pytest.raises(Exception) as failure, store.engine.begin() as conn:
        conn.execute(insert(schema.ledger).values(idempotency_key="k", recipient="919812345678", api_header=None))
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(failure.value)
    described = describe_error(failure.value)
    assert "919812345678" not in described and described.split(":")[0] in ("IntegrityError", "NotNullViolation")


def test_last_report_at_for_the_store_for_ids_and_for_a_task(store_url):
    """What the sensor can say when it times out: when the store last heard of these messages."""
    store = StatusStore(store_url)
    task = TaskKey("dag", "run", "send")
    assert store.last_report_at() is None and store.last_report_at(["m1", task]) is None
    store.write_ledger(task, [Claim("k1", "h1", "919800000001", 0)], [Outcome("k1", "accepted", "m1")])
    before = time.time()
    store.ingest([DeliveryEvent("m1", "delivered", "delivered", 1.0)])
    store.ingest([DeliveryEvent("m2", "read", "read", 2.0)])
    assert store.last_report_at() >= store.last_report_at([task]) >= before
    assert store.last_report_at(["m2"]) >= store.last_report_at(["m1"]) == store.last_report_at([task])
    assert store.last_report_at(["nobody"]) is None and store.last_report_at([TaskKey("d", "r", "other")]) is None
