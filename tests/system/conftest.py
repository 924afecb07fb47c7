"""Fixtures of the system tests: fresh PostgreSQL databases (Airflow's metadata, the status store)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy

from tests.conftest import database_name


@pytest.fixture
def fresh_database(postgres_server_url: str) -> Iterator[Any]:
    """``fresh_database()`` -> the URL of a new, empty PostgreSQL database; all dropped afterwards."""
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def make() -> str:
        name = database_name("sys")
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return sqlalchemy.engine.make_url(postgres_server_url).set(database=name).render_as_string(False)

    yield make
    with admin.connect() as conn:
        for name in names:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
