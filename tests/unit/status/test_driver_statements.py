"""The receiver's commits run their statements on the driver's own cursor (``engines.on_driver``;
every one on SQLite, the inserts and the look-up of unknown sends on psycopg2): the same rows, the
same errors, and the look-ups by index.
"""

from __future__ import annotations

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select

from airflow_provider_pepipost.status import engines, ingest, schema
from airflow_provider_pepipost.status.inbound import WebhookBatch
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.batching import is_transient


@pytest.fixture(autouse=True)
def nothing_compiled_yet(monkeypatch):
    monkeypatch.setattr(engines, "_PREBUILT", {})
    monkeypatch.setattr(engines, "_ON_DRIVER", {})


def event(message_id: str, status: str, **fields) -> DeliveryEvent:
    fields.setdefault("reported_at", None)
    return DeliveryEvent(message_id=message_id, status=status, raw_status=status, **fields)


def test_values_are_converted_as_sqlalchemy_converts_them(sqlite_url):
    """A billable flag goes in as SQLite's 0/1 and a time given as a string as a float, as
    SQLAlchemy's own executemany writes them."""
    store = StatusStore(sqlite_url)
    store.ingest_many([WebhookBatch(events=[event("m1", "delivered", reported_at=1700000000, billable=False)])])
    with store.engine.connect() as conn:
        raw = conn.exec_driver_sql(
            "SELECT billable, typeof(billable), reported_at, typeof(reported_at) FROM pepipost_message_status"
        ).one()
    assert tuple(raw) == (0, "integer", 1700000000.0, "real")


def test_a_report_sent_again_in_a_later_commit_counts_as_a_duplicate(store_url):
    store = StatusStore(store_url)
    first = store.ingest_many([WebhookBatch(events=[event("m1", "read", reported_at=1.0)])])
    again = store.ingest_many(
        [WebhookBatch(events=[event("m1", "read", reported_at=1.0)]), WebhookBatch(events=[event("m2", "sent")])]
    )
    assert (first[0].accepted, first[0].duplicates) == (1, 0)
    assert [(r.accepted, r.duplicates) for r in again] == [(0, 1), (1, 0)]
    assert store.count_rows("pepipost_events") == 2


def test_a_driver_error_comes_out_as_sqlalchemys_without_the_values(sqlite_url):
    store = StatusStore(sqlite_url)
    statement = engines.DriverStatement("INSERT INTO no_such_table VALUES (?)", (("number", None),))
    with (
        store.engine.begin() as conn,
        pytest.raises(sa_exc.OperationalError) as raised,
        engines.driver_cursor(conn, statement) as cursor,
    ):
        cursor.execute(statement.sql, statement.values({"number": "919833078369"}))
    assert "no such table" in str(raised.value) and "919833078369" not in str(raised.value)
    assert is_transient(raised.value)  # what the receiver answers 503 for, not a dead letter


def test_unknown_sends_are_looked_up_by_header_not_by_every_row_without_a_message_id(sqlite_url):
    """Every refused or suppressed send of every campaign has no message id: a look-up that walked
    them cost 30 ms a commit with 200,000 in the ledger. SQLite keeps no statistics, so the
    statement says which index to prefer."""
    store = StatusStore(sqlite_url)
    with store.engine.connect() as conn:
        statement = engines.on_driver(conn, "waiting_sends_json", ingest._waiting_sends_json, ("headers", "states"))
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement.sql}", ("[]", "[]")).all()
    assert "USING INDEX ix_pepipost_ledger_api_header" in plan[0][3]


def test_an_unknown_send_is_reconciled_beside_many_refused_rows(store_url):
    store = StatusStore(store_url)
    led = schema.ledger
    common = dict(
        recipient="919800000000", dag_id="d", run_id="r", task_id="t", map_index=-1, sent_at=1.0, updated_at=1.0
    )
    refused = [
        dict(idempotency_key=f"k{i}", api_header=f"x{i}", state="rejected", row_index=i, **common) for i in range(50)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(led), refused)
        conn.execute(
            insert(led), [dict(idempotency_key="u", api_header="h-u", state="unknown", row_index=99, **common)]
        )
    result = store.ingest_many(
        [WebhookBatch(events=[event("m-u", "delivered", api_header="h-u"), event("m-x", "sent", api_header="x3")])]
    )
    assert result[0].reconciled == 1
    with store.engine.connect() as conn:
        assert conn.execute(select(led.c.message_id, led.c.state).where(led.c.idempotency_key == "u")).one() == (
            "m-u",
            "accepted",
        )
        assert conn.execute(select(led.c.message_id).where(led.c.idempotency_key == "k3")).scalar() is None


def test_unknown_sends_on_postgresql_are_looked_up_by_header(postgres_url):
    """The look-up takes every header as one array, whatever their number: by the header's index."""
    store = StatusStore(postgres_url)
    common = dict(
        recipient="919800000000", dag_id="d", run_id="r", task_id="t", map_index=-1, sent_at=1.0, updated_at=1.0
    )
    refused = [
        dict(idempotency_key=f"k{i}", api_header=f"x{i}", state="rejected", row_index=i, **common)
        for i in range(20_000)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(schema.ledger), refused)
        conn.exec_driver_sql("ANALYZE pepipost_ledger")
    with store.engine.connect() as conn:
        statement = engines.on_driver(conn, "waiting_sends_any", ingest._waiting_sends_any, ("headers", "states"))
        headers = [f"x{i}" for i in range(0, 20_000, 1000)]
        plan = " ".join(conn.exec_driver_sql(f"EXPLAIN {statement.sql}", (headers, ["unknown"])).scalars())
    assert "ix_pepipost_ledger_api_header" in plan, plan


def test_more_unknown_sends_in_one_commit_than_one_look_up_held_are_all_reconciled(store_url):
    """The look-up once went by chunks of 5,000 headers; now by one list (a JSON array on SQLite, an
    array on PostgreSQL), it must still find every one."""
    store = StatusStore(store_url)
    count = engines.ID_CHUNK + 500
    common = dict(
        recipient="919800000000", dag_id="d", run_id="r", task_id="t", map_index=-1, sent_at=1.0, updated_at=1.0
    )
    with store.engine.begin() as conn:
        conn.execute(
            insert(schema.ledger),
            [
                dict(idempotency_key=f"u{i}", api_header=f"h-{i}", state="unknown", row_index=i, **common)
                for i in range(count)
            ],
        )
    events = [event(f"m-{i}", "delivered", api_header=f"h-{i}") for i in range(count)]
    assert store.ingest_many([WebhookBatch(events=events)])[0].reconciled == count
    with store.engine.connect() as conn:
        left = conn.execute(select(schema.ledger.c.idempotency_key).where(schema.ledger.c.message_id.is_(None)))
        assert left.all() == []


def test_a_value_the_conversion_refuses_is_sqlalchemys_statement_error(store_url):
    store = StatusStore(store_url)
    with pytest.raises(sa_exc.StatementError) as raised:
        store.ingest_many([WebhookBatch(events=[event("m1", "delivered", billable="yes")])])
    assert not is_transient(raised.value)  # what the store refuses: the item becomes a dead letter


def test_more_events_in_one_commit_than_one_insert_holds(store_url):
    """PostgreSQL pages a multi-row INSERT (1,000 rows): every page's RETURNING counts."""
    store = StatusStore(store_url)
    events = [event(f"m{index}", "sent") for index in range(2_500)]
    first = store.ingest_many([WebhookBatch(events=events)])[0]
    again = store.ingest_many([WebhookBatch(events=[*events[1_200:], event("m-new", "sent")])])[0]
    assert (first.accepted, first.duplicates) == (2_500, 0)
    assert (again.accepted, again.duplicates) == (1, 1_300)
    assert store.count_rows("pepipost_events") == 2_501


def test_one_process_ingests_through_psycopg2_then_psycopg(postgres_url):
    """Two drivers of one dialect: a statement made for psycopg2's execute_values must not be given
    to psycopg (version 3), which would turn every event into a dead letter."""
    pytest.importorskip("psycopg")
    from sqlalchemy.engine import make_url

    assert make_url(postgres_url).get_driver_name() == "psycopg2"
    psycopg3_url = make_url(postgres_url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    first = StatusStore(postgres_url).ingest_many([WebhookBatch(events=[event("m1", "sent")])])[0]
    try:
        second = StatusStore(psycopg3_url).ingest_many([WebhookBatch(events=[event("m2", "read")])])[0]
    finally:
        engines.dispose_engine(psycopg3_url)
    assert (first.accepted, second.accepted) == (1, 1)
    assert StatusStore(postgres_url).count_rows("pepipost_events") == 2


def test_a_statement_psycopg2_cannot_run_as_compiled_stays_with_sqlalchemy():
    """An expanding IN gets its marks per call, and a literal '%(x)s' is no mark."""
    from types import SimpleNamespace

    from sqlalchemy import bindparam, literal_column
    from sqlalchemy.dialects.postgresql import psycopg2

    on_psycopg2 = SimpleNamespace(dialect=psycopg2.dialect())
    led = schema.ledger
    expanding = select(led.c.idempotency_key).where(led.c.api_header.in_(bindparam("headers", expanding=True)))
    assert engines._compile_for_driver(on_psycopg2, expanding, ("headers",)) is None
    quoted = select(led.c.idempotency_key).where(
        led.c.api_header == bindparam("header"), led.c.recipient != literal_column("'%(x)s'")
    )
    statement = engines._compile_for_driver(on_psycopg2, quoted, ("header",))
    assert statement.values({"header": "h"}) == ("h",)
    assert statement.sql.count("%s") == 1 and "%%(x)s" in statement.sql
