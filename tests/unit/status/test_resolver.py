"""The store resolver: one answer to "which status database?" for every part, by a fixed order."""

from __future__ import annotations

import json

import pytest

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.status.resolver import resolve_store_url, store_source

POSTGRES = {"conn_type": "postgres", "host": "db.internal", "port": 5433, "login": "pp", "password": "s3cr3t-pw"}


@pytest.fixture(autouse=True)
def clean(monkeypatch, tmp_path):
    for name in ("PEPIPOST_STATUS_STORE_URL", "AIRFLOW__PEPIPOST__STATUS_STORE_CONN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))


def test_a_postgres_connection_becomes_a_sqlalchemy_url(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_STORE_PG", json.dumps({**POSTGRES, "schema": "campaigns"}))
    assert resolve_store_url("store_pg") == "postgresql+psycopg2://pp:s3cr3t-pw@db.internal:5433/campaigns"
    assert "s3cr3t" not in store_source("store_pg")


def test_a_sqlite_connection_names_its_file(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_STORE_LITE", json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "s.db")}))
    assert resolve_store_url("store_lite") == f"sqlite:///{tmp_path / 's.db'}"


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ({**POSTGRES, "schema": "campaigns", "extra": {"sqlalchemy_driver": "postgresql+psycopg2"}},
         "postgresql+psycopg2://pp:s3cr3t-pw@db.internal:5433/campaigns"),
        ({"host": "/data/pepipost.db", "extra": {"sqlalchemy_driver": "sqlite"}}, "sqlite:////data/pepipost.db"),
    ],
)  # fmt: skip
def test_a_generic_connection_names_its_driver_in_an_extra(monkeypatch, conn, expected):
    """What the UI offers without any provider: a Generic connection."""
    monkeypatch.setenv("AIRFLOW_CONN_STORE_GENERIC", json.dumps({**conn, "conn_type": "generic"}))
    assert resolve_store_url("store_generic") == expected


def test_the_order_connection_then_environment_then_config_then_default(monkeypatch, tmp_path):
    assert resolve_store_url() == f"sqlite:///{tmp_path / 'pepipost_status.db'}"
    monkeypatch.setenv("AIRFLOW__PEPIPOST__STATUS_STORE_URL", "sqlite:////from/config.db")
    assert resolve_store_url() == "sqlite:////from/config.db"
    monkeypatch.setenv("PEPIPOST_STATUS_STORE_URL", "sqlite:////from/env.db")
    assert resolve_store_url() == "sqlite:////from/env.db"
    monkeypatch.setenv("AIRFLOW_CONN_STORE_PG", json.dumps(POSTGRES))
    monkeypatch.setenv("AIRFLOW__PEPIPOST__STATUS_STORE_CONN_ID", "store_pg")
    assert resolve_store_url().startswith("postgresql+psycopg2://pp:")
    assert store_source() == "Airflow connection 'store_pg'"
    monkeypatch.setenv("AIRFLOW_CONN_OTHER", json.dumps({"conn_type": "sqlite", "host": "/other.db"}))
    assert resolve_store_url("other") == "sqlite:////other.db"  # an operator's own conn id wins


@pytest.mark.parametrize(
    ("conn", "expected"),
    [
        ({"conn_type": "http", "host": "x"}, "type 'http'"),
        ({"conn_type": "sqlite"}, "file path as its host"),
    ],
)
def test_a_connection_that_cannot_name_a_store_is_a_clear_error(monkeypatch, conn, expected):
    monkeypatch.setenv("AIRFLOW_CONN_BAD_STORE", json.dumps(conn))
    with pytest.raises(PepipostConfigError, match=expected):
        resolve_store_url("bad_store")


def test_a_postgres_connection_passes_libpq_extras_such_as_tls(monkeypatch):
    """A store on another machine wants TLS (sslmode=verify-full) and its own connect timeout."""
    extra = {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/db-ca.pem", "connect_timeout": 3, "cursor": "dict"}
    monkeypatch.setenv("AIRFLOW_CONN_STORE_PG", json.dumps({**POSTGRES, "schema": "campaigns", "extra": extra}))
    assert resolve_store_url("store_pg") == (
        "postgresql+psycopg2://pp:s3cr3t-pw@db.internal:5433/campaigns"
        "?connect_timeout=3&sslmode=verify-full&sslrootcert=%2Fetc%2Fssl%2Fdb-ca.pem"
    )


def test_the_tls_extras_reach_the_driver(monkeypatch, tmp_path, postgres_server_url):
    """Not only written into the URL: libpq reads them (a root certificate that is not there fails
    the connection, saying so, whether or not the server speaks TLS)."""
    from sqlalchemy.engine import make_url

    from airflow_provider_pepipost.errors import StatusStoreUnavailable
    from airflow_provider_pepipost.status.engines import dispose_engine
    from airflow_provider_pepipost.status.store import open_store

    server = make_url(postgres_server_url)
    missing = tmp_path / "no-such-ca.pem"
    conn = {"conn_type": "postgres", "host": server.host, "port": server.port, "login": server.username,
            "schema": server.database, "extra": {"sslmode": "verify-full", "sslrootcert": str(missing)}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_STORE_TLS", json.dumps(conn))
    try:
        with pytest.raises(StatusStoreUnavailable, match=r"(?i)ssl|certificate") as raised:
            open_store("store_tls")
    finally:
        dispose_engine(resolve_store_url("store_tls"))
    assert "could not be opened" in str(raised.value)


def test_libpq_extras_are_given_as_libpq_reads_them(monkeypatch):
    """A JSON true is libpq's 1 (it refuses "True"); a mapping is no libpq value, and is refused by name."""
    extra = {"keepalives": True, "keepalives_idle": 30}
    monkeypatch.setenv("AIRFLOW_CONN_STORE_PG", json.dumps({**POSTGRES, "schema": "c", "extra": extra}))
    assert resolve_store_url("store_pg").endswith("/c?keepalives=1&keepalives_idle=30")
    extra = {"options": {"statement_timeout": 5}}
    monkeypatch.setenv("AIRFLOW_CONN_STORE_PG", json.dumps({**POSTGRES, "schema": "c", "extra": extra}))
    with pytest.raises(PepipostConfigError, match="connection 'store_pg': extra 'options' must be a string"):
        resolve_store_url("store_pg")
