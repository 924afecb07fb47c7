"""A PostgreSQL store's pooled connections are checked (one round trip) before use only when they
sat in the pool long enough for the server to have dropped them (``engines.PING_AFTER_IDLE``): under
load, the check was a sixth of the receiver's round trips. A connection the server dropped while it
sat there is replaced unseen, as SQLAlchemy's pool_pre_ping replaces it."""

from __future__ import annotations

import time

import pytest
import sqlalchemy
from sqlalchemy import exc as sa_exc

from airflow_provider_pepipost.status import engines
from airflow_provider_pepipost.status.inbound import WebhookBatch
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.batching import is_transient


def counted_pings(engine, monkeypatch) -> list[int]:
    pings: list[int] = []
    real = engine.dialect.do_ping

    def do_ping(dbapi_connection):
        pings.append(1)
        return real(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", do_ping)
    return pings


def backend_pid(store: StatusStore) -> int:
    with store.engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def drop_connection(url: str, pid: int) -> None:
    """What a server restart or an idle timeout does to a pooled connection."""
    admin = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with admin.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar()
    admin.dispose()


def test_a_connection_back_a_moment_ago_is_used_unchecked_and_an_idle_one_is_checked(postgres_url, monkeypatch):
    store = StatusStore(postgres_url)
    pings = counted_pings(store.engine, monkeypatch)
    for _ in range(20):  # back to back, as the receiver's commits under load
        store.count_rows("pepipost_events")
    assert pings == []
    monkeypatch.setattr(engines, "PING_AFTER_IDLE", 0.05)
    time.sleep(0.1)
    store.count_rows("pepipost_events")
    assert pings == [1]


def test_a_connection_the_server_dropped_while_it_sat_idle_is_replaced_unseen(postgres_url, monkeypatch):
    monkeypatch.setattr(engines, "PING_AFTER_IDLE", 0.05)
    store = StatusStore(postgres_url)
    pid = backend_pid(store)
    drop_connection(postgres_url, pid)
    time.sleep(0.1)
    assert store.count_rows("pepipost_events") == 0  # no error: the check found it dropped
    assert backend_pid(store) != pid


def test_one_dropped_a_moment_after_its_last_use_fails_that_use_only(postgres_url, monkeypatch):
    """As a connection dropped in use does: the store's error (the receiver answers 503 and the vendor
    sends again), and the pool's connections are replaced for the next use."""
    monkeypatch.setattr(engines, "PING_AFTER_IDLE", 3600.0)
    store = StatusStore(postgres_url)
    pid = backend_pid(store)
    drop_connection(postgres_url, pid)
    with pytest.raises(sa_exc.OperationalError) as raised:
        store.count_rows("pepipost_events")
    assert is_transient(raised.value)
    assert store.count_rows("pepipost_events") == 0
    assert backend_pid(store) != pid


def test_after_a_restart_the_receivers_commits_fail_once_not_once_a_pooled_connection(postgres_url):
    """A server restart drops every pooled connection. The first commit to meet a dropped one fails
    (503: the vendor sends it again); every connection back in the pool before it is then checked
    and replaced, so the commits after it go through."""
    store = StatusStore(postgres_url)
    held = [store.engine.connect() for _ in range(6)]  # as the writers, readers and pages hold them
    for conn in held:
        conn.exec_driver_sql("SELECT 1")
    pids = [conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() for conn in held]
    for conn in held:
        conn.close()
    for pid in pids:
        drop_connection(postgres_url, pid)
    failed = 0
    for index in range(10):
        try:
            store.ingest_many([WebhookBatch(events=[DeliveryEvent(f"m{index}", "sent", "sent", None)])])
        except sa_exc.OperationalError as err:
            assert is_transient(err)
            failed += 1
    assert failed <= 1
    assert store.count_rows("pepipost_events") == 10 - failed


def test_a_check_that_finds_a_connection_dropped_renews_the_pool(postgres_url, monkeypatch):
    """As pool_pre_ping does: the connections back in the pool before it are replaced without a
    check each (a server restart drops them all)."""
    monkeypatch.setattr(engines, "PING_AFTER_IDLE", 0.05)
    store = StatusStore(postgres_url)
    held = [store.engine.connect() for _ in range(3)]
    pids = [conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() for conn in held]
    for conn in held:
        conn.close()
    for pid in pids:
        drop_connection(postgres_url, pid)
    time.sleep(0.1)
    pings = counted_pings(store.engine, monkeypatch)
    again = [store.engine.connect() for _ in range(3)]
    try:
        assert all(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() not in pids for conn in again)
    finally:
        for conn in again:
            conn.close()
    assert pings == [1]
