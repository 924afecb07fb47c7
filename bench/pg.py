"""A throwaway PostgreSQL database for one benchmark."""

from __future__ import annotations

import uuid
from contextlib import contextmanager

import sqlalchemy


@contextmanager
def scratch_database(server_url: str):
    name = f"pepipost_bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        from airflow_provider_pepipost.status import store

        for url, engine in list(store._ENGINES.items()):
            if name in url:
                engine.dispose()
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
