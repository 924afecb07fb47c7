"""Which status database? The one answer that the operators, sensor, trigger, plugin and receiver share.

In order:
1. an Airflow connection: the ``status_store_conn_id`` an operator or sensor names, else
   ``[pepipost] status_store_conn_id`` (``AIRFLOW__PEPIPOST__STATUS_STORE_CONN_ID``). Airflow
   encrypts its password and masks it in logs and in the API; a trigger carries only its id;
2. a URL from the environment or Airflow's config: ``$PEPIPOST_STATUS_STORE_URL``, else
   ``[pepipost] status_store_url``: for processes that have no Airflow connections, such as the
   standalone receiver (the environment, not argv, where the process list would show it);
3. a SQLite file in ``$AIRFLOW_HOME``: the embedded default of one machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from airflow_provider_pepipost.errors import PepipostConfigError

STORE_URL_ENV = "PEPIPOST_STATUS_STORE_URL"
CONFIG_SECTION = "pepipost"
DEFAULT_SQLITE_NAME = "pepipost_status.db"

# Airflow connection type -> SQLAlchemy driver name
_DRIVERS = {
    "postgres": "postgresql+psycopg2",
    "postgresql": "postgresql+psycopg2",
    "sqlite": "sqlite",
}


def airflow_setting(key: str) -> str | None:
    """``[pepipost] key`` from Airflow's config (env ``AIRFLOW__PEPIPOST__KEY`` included), if any."""
    try:
        from airflow.configuration import conf
    except Exception:  # no Airflow config in this process
        return None
    try:
        return conf.get(CONFIG_SECTION, key, fallback=None) or None
    except Exception:
        return None


ERASURE_KEY_ENV = "PEPIPOST_ERASURE_KEY"


def erasure_key() -> str | None:
    """The deployment's erasure key (``$PEPIPOST_ERASURE_KEY``, else ``[pepipost] erasure_key``), or
    None when none is set: then no number can be erased, and only plain numbers are suppressed."""
    key = os.environ.get(ERASURE_KEY_ENV) or airflow_setting("erasure_key")
    return key.strip() or None if key else None  # a _CMD's output ends with a newline


def default_sqlite_url() -> str:
    home = Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")
    return f"sqlite:///{home / DEFAULT_SQLITE_NAME}"


def resolve_store_url(conn_id: str | None = None) -> str:
    """The SQLAlchemy URL of the status store, by the order in this module's docstring."""
    conn_id = conn_id or airflow_setting("status_store_conn_id")
    if conn_id:
        return url_from_connection(conn_id)
    return os.environ.get(STORE_URL_ENV) or airflow_setting("status_store_url") or default_sqlite_url()


def store_source(conn_id: str | None = None) -> str:
    """Where ``resolve_store_url`` takes the URL from, in words for a log line (no URL in it)."""
    conn_id = conn_id or airflow_setting("status_store_conn_id")
    if conn_id:
        return f"Airflow connection '{conn_id}'"
    if os.environ.get(STORE_URL_ENV):
        return f"${STORE_URL_ENV}"
    if airflow_setting("status_store_url"):
        return "[pepipost] status_store_url"
    return f"the default SQLite file in AIRFLOW_HOME ({DEFAULT_SQLITE_NAME})"


def url_from_connection(conn_id: str) -> str:
    """The store URL of an Airflow connection of type postgres or sqlite; its password is masked."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    return connection_to_url(conn, conn_id)


def connection_to_url(conn: Any, conn_id: str) -> str:
    conn_type = (conn.conn_type or "").lower()
    driver = (conn.extra_dejson or {}).get("sqlalchemy_driver") or _DRIVERS.get(conn_type)
    if driver is None:
        raise PepipostConfigError(
            f"connection '{conn_id}' is of type '{conn.conn_type}'; the status store needs a 'postgres' or "
            "'sqlite' connection (or extra 'sqlalchemy_driver', e.g. 'postgresql+psycopg2')"
        )
    if driver == "sqlite":
        path = conn.host or conn.schema or ""
        if not path:
            raise PepipostConfigError(f"connection '{conn_id}': a sqlite connection needs the file path as its host")
        return f"sqlite:///{path}"
    if conn.password:
        _mask(conn.password)
    extra = conn.extra_dejson or {}
    url = URL.create(
        driver,
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
        query=_libpq_query(extra, conn_id),
    )
    return url.render_as_string(hide_password=False)


def _libpq_query(extra: dict[str, Any], conn_id: str) -> dict[str, str]:
    """The connection's libpq extras as the URL's query: a flag as 1 or 0, as libpq reads it."""
    query = {}
    for name in LIBPQ_EXTRAS:
        value = extra.get(name)
        if value is None or value == "":
            continue
        if isinstance(value, (dict, list)):
            raise PepipostConfigError(
                f"connection '{conn_id}': extra {name!r} must be a string or a number (libpq reads it as "
                f"text), not {type(value).__name__}"
            )
        query[name] = str(int(value)) if isinstance(value, bool) else str(value)
    return query


# The extras of a postgres connection that libpq reads (as Airflow's postgres provider passes them):
# TLS to a database on another machine, how long to try, what the server sees.
LIBPQ_EXTRAS = (
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslcrl", "connect_timeout", "application_name",
    "keepalives", "keepalives_idle", "keepalives_interval", "keepalives_count", "target_session_attrs", "options",
)  # fmt: skip


def _mask(secret: str) -> None:
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # Airflow 3.1
        try:
            from airflow.sdk.execution_time.secrets_masker import mask_secret as mask_secret_3_1
        except ImportError:
            return
        mask_secret_3_1(secret)
        return
    mask_secret(secret)
