"""The PostgreSQL tests' databases are named from PEPIPOST_TEST_DB_PREFIX: runs sharing a server tell theirs."""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy

from tests.conftest import DB_PREFIX_ENV, database_name


def test_database_names_take_the_prefix_from_the_environment(monkeypatch):
    monkeypatch.delenv(DB_PREFIX_ENV, raising=False)
    assert re.fullmatch(r"pepipost_test_[0-9a-f]{12}", database_name("test"))
    assert re.fullmatch(r"pepipost_sys_[0-9a-f]{12}", database_name("sys"))
    monkeypatch.setenv(DB_PREFIX_ENV, "ci_job7_")
    assert re.fullmatch(r"ci_job7_test_[0-9a-f]{12}", database_name("test"))
    assert database_name("test") != database_name("test")


@pytest.mark.parametrize("prefix", ['x"; DROP DATABASE test; --', "Upper_", "7up_", "a" * 42])
def test_a_prefix_that_is_no_plain_name_is_refused(monkeypatch, prefix):
    monkeypatch.setenv(DB_PREFIX_ENV, prefix)
    with pytest.raises(pytest.UsageError, match=DB_PREFIX_ENV):
        database_name("test")


@pytest.mark.postgres
def test_the_postgres_fixture_names_its_database_with_the_prefix(postgres_url):
    prefix = os.environ.get(DB_PREFIX_ENV, "pepipost_")
    name = sqlalchemy.engine.make_url(postgres_url).database
    assert name.startswith(f"{prefix}test_")
    engine = sqlalchemy.create_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == name
    engine.dispose()
