"""A throwaway PostgreSQL database for one benchmark."""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager

import sqlalchemy


@contextmanager
def scratch_database(server_url: str):
    # Named like the tests' databases: PEPIPOST_TEST_DB_PREFIX (default pepipost_) then bench_.
    name = f"{os.environ.get('PEPIPOST_TEST_DB_PREFIX', 'pepipost_')}bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        from airflow_provider_pepipost.status.engines import dispose_engine

        dispose_engine(url)
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
