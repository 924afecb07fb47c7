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


def local_postgres_cpu_seconds() -> float | None:
    """CPU seconds so far of every PostgreSQL process on this machine (its backends, WAL writer,
    checkpointer...), None when none runs here: what a PostgreSQL store costs the machine beside
    its client, on the same cores."""
    ticks, found = 0, False
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as handle:
                if not handle.read().startswith("postgres"):
                    continue
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended meanwhile
            continue
        found = True
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK") if found else None
