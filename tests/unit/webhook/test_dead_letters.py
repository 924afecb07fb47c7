"""The store's side of the receiver: keyed dead letters (schema v3, migrated from v2), and errors without values."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, text

from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status import store as store_module
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.logs import describe_error


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
    assert migrated.schema_version() == 3
    for _ in range(2):
        migrated.record_dead_letter("bad body", "{", key="body-hash")
    assert migrated.dead_letters() == [("old", "{}"), ("bad body", "{")]


def test_store_errors_name_no_bound_values(store_url):
    """A failed statement's error, as the receiver logs it, shows no phone number."""
    store = StatusStore(store_url)
    with pytest.raises(Exception) as failure, store.engine.begin() as conn:
        conn.execute(insert(schema.ledger).values(idempotency_key="k", recipient="919812345678", api_header=None))
    assert "[SQL parameters hidden due to hide_parameters=True]" in str(failure.value)
    described = describe_error(failure.value)
    assert "919812345678" not in described and described.split(":")[0] in ("IntegrityError", "NotNullViolation")
