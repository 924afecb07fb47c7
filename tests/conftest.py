"""Test set-up: a throwaway AIRFLOW_HOME (set before Airflow is imported), real loopback servers, real stores."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

# Airflow reads its configuration when first imported: point it at a throwaway home first.
_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="pepipost-tests-airflow-"))
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(_AIRFLOW_HOME / "dags")
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ.pop("PEPIPOST_STATUS_STORE_URL", None)
os.environ.pop("AIRFLOW_CONN_PEPIPOST_DEFAULT", None)
os.environ.pop("AIRFLOW__PEPIPOST__STATUS_STORE_CONN_ID", None)

import pytest  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

from airflow_provider_pepipost.sandbox import DEFAULT_API_KEY, DEFAULT_SOURCE, SandboxServer, Scenario  # noqa: E402
from tests.helpers import ServedApp  # noqa: E402

POSTGRES_URL_ENV = "PEPIPOST_TEST_POSTGRES_URL"
# The PostgreSQL tests create (and drop) databases named <prefix>test_* and <prefix>sys_*.
DB_PREFIX_ENV = "PEPIPOST_TEST_DB_PREFIX"
WEBHOOK_TOKEN = "test-webhook-token-4f1c"

# Hypothesis draws the same examples in every run (no random seed, no example database): a
# failure it finds is a failure every time, not one run in so many.
hypothesis_settings.register_profile("pepipost", derandomize=True, database=None, print_blob=True)
hypothesis_settings.load_profile("pepipost")


def database_name(kind: str) -> str:
    """A fresh database name for a PostgreSQL test: ``pepipost_test_<hex>`` or ``pepipost_sys_<hex>`` by default."""
    prefix = os.environ.get(DB_PREFIX_ENV, "pepipost_")
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,40}", prefix):
        raise pytest.UsageError(
            f"{DB_PREFIX_ENV}={prefix!r}: use lower-case letters, digits and underscores (at most 41, no digit first)"
        )
    return f"{prefix}{kind}_{uuid.uuid4().hex[:12]}"


REPO = Path(__file__).resolve().parent.parent
DAG_SOURCES = [REPO / "tests" / "dags" / "dag_files", REPO / "dags_examples"]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite Airflow database, and a DAGs folder holding the test and example DAGs.

    dag.test() runs only DAGs that its bundle (the DAGs folder) holds.
    """
    dags = _AIRFLOW_HOME / "dags"
    dags.mkdir(exist_ok=True)
    for folder in DAG_SOURCES:
        for source in folder.glob("*.py"):
            shutil.copy(source, dags / source.name)
        if (folder / "data").is_dir():  # files the examples read beside them
            shutil.copytree(folder / "data", dags / "data", dirs_exist_ok=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        stdout=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    return _AIRFLOW_HOME


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'status.db'}"


@pytest.fixture(scope="session")
def postgres_server_url() -> str:
    url = os.environ.get(POSTGRES_URL_ENV)
    if not url:
        pytest.skip(f"no PostgreSQL for this run: set {POSTGRES_URL_ENV} (.ci/run does) to run the PostgreSQL tests")
    return url


@pytest.fixture
def postgres_url(postgres_server_url: str):
    """A fresh PostgreSQL database per test, dropped afterwards."""
    import sqlalchemy

    name = database_name("test")
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    url = sqlalchemy.engine.make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    from airflow_provider_pepipost.status import store as store_module
    from airflow_provider_pepipost.status.engines import dispose_engine

    dispose_engine(url)
    store_module._SCHEMA_READY.discard(url)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """Each store test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def receiver(store_url: str):
    """The webhook receiver on a real loopback port, writing to ``store_url``."""
    from airflow_provider_pepipost.webhook.app import create_app

    with ServedApp(create_app(store_url, WEBHOOK_TOKEN)) as served:
        served.webhook_url = f"{served.url}/pepipost/webhook"
        yield served


@pytest.fixture
def sqlite_receiver(sqlite_url: str):
    from airflow_provider_pepipost.webhook.app import create_app

    with ServedApp(create_app(sqlite_url, WEBHOOK_TOKEN)) as served:
        served.webhook_url = f"{served.url}/pepipost/webhook"
        served.store_url = sqlite_url
        yield served


@pytest.fixture
def sandbox():
    """The sandbox with no delivery reports; tests that need reports start their own."""
    with SandboxServer(Scenario(status_delay=0.01)) as server:
        yield server


STORE_CONN_ID = "pepipost_status_store"


def connection_json(base_url: str, store_url: str | None = None, **extra: object) -> str:
    """The ``pepipost_default`` connection as JSON; the store goes in ``store_env``, not in here."""
    extras = {"source": DEFAULT_SOURCE, "max_retries": 3, "backoff_max": 0.2, **extra}
    return json.dumps({"conn_type": "pepipost", "host": base_url, "password": DEFAULT_API_KEY, "extra": extras})


def store_connection_json(store_url: str) -> str:
    """A SQLAlchemy URL as the Airflow connection (postgres or sqlite type) a user would make."""
    import sqlalchemy

    url = sqlalchemy.engine.make_url(store_url)
    if url.get_backend_name() == "sqlite":
        return json.dumps({"conn_type": "sqlite", "host": url.database})
    fields = {"host": url.host, "port": url.port, "login": url.username, "password": url.password}
    return json.dumps({"conn_type": "postgres", "schema": url.database, **{k: v for k, v in fields.items() if v}})


def store_env(store_url: str) -> dict[str, str]:
    """Environment that makes every part resolve ``store_url`` through an Airflow connection."""
    return {
        f"AIRFLOW_CONN_{STORE_CONN_ID.upper()}": store_connection_json(store_url),
        "AIRFLOW__PEPIPOST__STATUS_STORE_CONN_ID": STORE_CONN_ID,
    }


@pytest.fixture
def pepipost_conn(monkeypatch: pytest.MonkeyPatch):
    """Point ``pepipost_default`` at a server and the store resolver at a store:
    ``pepipost_conn(url, store_url=..., **extras)``."""

    def point(base_url: str, store_url: str | None = None, **extra: object) -> None:
        monkeypatch.setenv("AIRFLOW_CONN_PEPIPOST_DEFAULT", connection_json(base_url, **extra))
        if store_url:
            for name, value in store_env(store_url).items():
                monkeypatch.setenv(name, value)

    return point


@pytest.fixture
def use_store(monkeypatch: pytest.MonkeyPatch):
    """``use_store(url)`` makes ``url`` the store of the connection it returns the id of."""

    def point(store_url: str) -> str:
        monkeypatch.setenv(f"AIRFLOW_CONN_{STORE_CONN_ID.upper()}", store_connection_json(store_url))
        return STORE_CONN_ID

    return point
