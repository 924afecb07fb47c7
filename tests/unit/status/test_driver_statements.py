"""The receiver's commits run their statements on the driver's own cursor (``engines.on_driver``;
every one on SQLite, the inserts and the look-up of unknown sends on psycopg2): the same rows, the
same errors, and the look-ups by index.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import insert, select
from sqlalchemy.engine import make_url

from airflow_provider_pepipost.status import engines, ingest, schema
from airflow_provider_pepipost.status import ledger as ledger_module
from airflow_provider_pepipost.status.inbound import InboundMessage, WebhookBatch
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.batching import is_transient


@pytest.fixture(autouse=True)
def nothing_compiled_yet(monkeypatch):
    monkeypatch.setattr(engines, "_PREBUILT", {})
    monkeypatch.setattr(engines, "_ON_DRIVER", {})
    monkeypatch.setattr(ingest, "_ONE_STATEMENTS", {})


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


LEDGER_ROW = dict(recipient="919800000000", dag_id="d", run_id="r", task_id="t", map_index=-1, sent_at=1.0,
                  updated_at=1.0)  # fmt: skip


def unknown_sends(store: StatusStore, *rows: tuple[str, str | None, str]) -> None:
    """Ledger rows (idempotency key, x-apiheader, state), as a send task leaves them."""
    with store.engine.begin() as conn:
        conn.execute(
            insert(schema.ledger),
            [
                dict(idempotency_key=key, api_header=header, state=state, row_index=index, **LEDGER_ROW)
                for index, (key, header, state) in enumerate(rows)
            ],
        )


def never_one_by_one(monkeypatch) -> None:
    def one_by_one(*args, **kwargs):
        raise AssertionError("filed one statement at a time")

    for name in ("_insert_new_events", "_raise_statuses", "_reconcile", "_waiting_sends_for"):
        monkeypatch.setattr(ingest, name, one_by_one)


def ledger_message_ids(store: StatusStore) -> dict[str, str | None]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(schema.ledger.c.idempotency_key, schema.ledger.c.message_id)).all())


def test_delivery_reports_alone_on_postgresql_are_one_statement_and_its_own_transaction(postgres_url, monkeypatch):
    """One round trip a commit (a commit of a few reports was mostly round trips): no transaction is
    opened around it, nothing is filed one statement at a time, and every count and row is as then."""
    store = StatusStore(postgres_url)
    unknown_sends(store, ("u", "h-u", "unknown"))
    never_one_by_one(monkeypatch)
    monkeypatch.setattr(ingest, "ingest_many", lambda *args: pytest.fail("a transaction was opened"))
    first, second = store.ingest_many(
        [
            WebhookBatch(events=[event("m-u", "delivered", api_header="h-u", reported_at=5.0), event("m2", "sent")]),
            WebhookBatch(events=[event("m2", "sent"), event("m2", "read", reported_at=9.0)]),
        ]
    )
    assert (first.accepted, first.duplicates, first.reconciled) == (2, 0, 1)
    assert (second.accepted, second.duplicates, second.reconciled) == (1, 1, 0)
    with store.engine.connect() as conn:
        statuses = dict(conn.execute(select(schema.message_status.c.message_id, schema.message_status.c.status)).all())
        state = conn.execute(select(schema.ledger.c.state).where(schema.ledger.c.idempotency_key == "u")).scalar()
    assert statuses == {"m-u": "delivered", "m2": "read"}
    assert (ledger_message_ids(store), state) == ({"u": "m-u"}, "accepted")
    assert store.count_rows("pepipost_events") == 3
    with store.engine.connect() as conn:  # the pooled connection is back to transactions
        assert conn.connection.dbapi_connection.autocommit is False


def test_reports_beside_a_customer_message_are_one_statement_in_the_commits_transaction(postgres_url, monkeypatch):
    store = StatusStore(postgres_url)
    unknown_sends(store, ("u", "h-u", "unknown"))
    never_one_by_one(monkeypatch)
    reply = InboundMessage("text", "919800000001", None, '{"from":"919800000001","text":"hi"}')
    [result] = store.ingest_many([WebhookBatch(events=[event("m-u", "read", api_header="h-u")], inbound=[reply])])
    assert (result.accepted, result.reconciled, result.inbound) == (1, 1, 1)
    assert ledger_message_ids(store) == {"u": "m-u"}


def test_one_statement_reconciles_only_the_rows_one_by_one_would(postgres_url):
    """A header two waiting rows sent cannot tell them apart; a message id a row already has is not
    given again; a row no longer waiting (refused) keeps none."""
    store = StatusStore(postgres_url)
    unknown_sends(
        store,
        ("shared-1", "h-shared", "unknown"),
        ("shared-2", "h-shared", "unknown"),
        ("taken", "h-taken", "unknown"),
        ("refused", "h-refused", "rejected"),
        ("sending", "h-sending", "sending"),
    )
    with store.engine.begin() as conn:
        conn.execute(insert(schema.ledger), [dict(idempotency_key="holder", api_header="h-holder", state="accepted",
                                                  message_id="m-taken", row_index=9, **LEDGER_ROW)])  # fmt: skip
    reports = [
        event("m-shared", "sent", api_header="h-shared"),
        event("m-taken", "sent", api_header="h-taken"),
        event("m-refused", "sent", api_header="h-refused"),
        event("m-sending", "sent", api_header="h-sending"),
    ]
    [result] = store.ingest_many([WebhookBatch(events=reports)])
    assert result.reconciled == 1
    assert ledger_message_ids(store) == {
        "shared-1": None, "shared-2": None, "taken": None, "refused": None, "sending": "m-sending", "holder": "m-taken"
    }  # fmt: skip


def test_two_headers_giving_one_message_id_are_reconciled_as_one_by_one(postgres_url):
    """One by one, the first header (in header order) takes the message id and the second finds it
    taken; one statement cannot see its own update, so such a commit is filed one by one."""
    store = StatusStore(postgres_url)
    unknown_sends(store, ("a", "h-a", "unknown"), ("b", "h-b", "unknown"))
    [result] = store.ingest_many(
        [WebhookBatch(events=[event("m-1", "sent", api_header="h-b"), event("m-1", "read", api_header="h-a")])]
    )
    assert result.reconciled == 1
    assert ledger_message_ids(store) == {"a": "m-1", "b": None}


def test_the_one_statements_reconcile_looks_rows_up_by_header(postgres_url):
    """Every refused or suppressed send of every campaign has no message id: the statement finds the
    waiting rows by the header's index, not by walking those."""
    store = StatusStore(postgres_url)
    unknown_sends(store, *((f"k{i}", f"x{i}", "rejected") for i in range(20_000)))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE pepipost_ledger")
    with store.engine.connect() as conn, engines.driver_cursor(conn, engines.DriverStatement("", ())) as cursor:
        waiting = list(ledger_module.IN_FLIGHT_STATES)
        values = (["x1", "x2"], ["m1", "m2"], waiting, waiting, "accepted", 1.0, 1.0, waiting)
        cursor.execute(b"EXPLAIN WITH " + cursor.mogrify(ingest._RECONCILE_SQL, values) + b" SELECT * FROM reconciled")
        plan = " ".join(line for (line,) in cursor.fetchall())
    assert "ix_pepipost_ledger_api_header" in plan, plan


def test_a_report_the_database_refuses_leaves_nothing_stored_and_the_connection_as_it_was(postgres_url):
    """The one statement is all or nothing: the poison path (the receiver's store_apart) then finds
    the item; the pooled connection is back to transactions."""
    store = StatusStore(postgres_url)
    too_long = "m" * 1000  # longer than the column: PostgreSQL refuses it, not the conversion
    with pytest.raises(sa_exc.DBAPIError) as raised:
        store.ingest_many([WebhookBatch(events=[event("m-fine", "sent"), event(too_long, "sent")])])
    assert not is_transient(raised.value)
    assert store.count_rows("pepipost_events") == 0
    with store.engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False
    assert store.ingest_many([WebhookBatch(events=[event("m-fine", "sent")])])[0].accepted == 1


def test_texts_and_times_in_the_one_statement_are_stored_as_sent(postgres_url):
    """The rows go to the server as JSON text: quotes, percent signs (never read as the driver's
    marks), backslashes, control characters, JSON's own syntax, a text that reads NULL, characters
    beyond the BMP and a time's every digit come back as they went in."""
    store = StatusStore(postgres_url)
    remark = (
        '50% off %s %(name)s %% \'quoted\' "double" back\\slash \\u0041 -- ; DROP TABLE x\n\t\x01 {"a": [1, null]} 😀'
    )
    events = [
        event("m'1%s", "failed", remark=remark, api_header="h%'1", reported_at=1733571234.1234567),
        event("NULL", "sent", remark="NULL", api_header="null", reported_at=0.1 + 0.2),
    ]
    store.ingest_many([WebhookBatch(events=events)])
    events_table, statuses = schema.events, schema.message_status
    with store.engine.connect() as conn:
        stored = conn.execute(
            select(events_table.c.message_id, events_table.c.remark, events_table.c.api_header,
                   events_table.c.reported_at).order_by(events_table.c.message_id)
        ).all()  # fmt: skip
        status_remarks = dict(conn.execute(select(statuses.c.message_id, statuses.c.remark)).all())
    assert [tuple(row) for row in stored] == [
        ("NULL", "NULL", "null", 0.1 + 0.2),
        ("m'1%s", remark, "h%'1", 1733571234.1234567),
    ]
    assert status_remarks == {"m'1%s": remark, "NULL": "NULL"}


def test_rows_missing_a_column_are_refused_not_stored_as_null():
    statement = engines.DriverStatement("INSERT INTO t (a, b) VALUES %s", (("a", None), ("b", None)), "(%s, %s)")
    assert engines.rows_json(statement, [{"a": 1, "b": None}]) == '[{"a": 1, "b": null}]'
    with pytest.raises(ValueError, match="exactly the keys"):
        engines.rows_json(statement, [{"a": 1}])


def test_an_insert_whose_sql_holds_another_percent_sign_is_not_rewritten():
    statement = engines.DriverStatement("INSERT INTO t (a) VALUES %s -- 5%", (("a", None),), "(%s)")
    with pytest.raises(ValueError, match="no other '%'"):
        engines.recordset_insert(statement, schema.events)


def test_the_one_statement_writes_events_then_statuses_then_the_ledger_as_one_by_one(postgres_url):
    """Two commits at once never wait on each other in a cycle (a deadlock) when they take their
    locks in one order: the table order of one by one, whichever way each commit is filed. PostgreSQL
    runs a WITH as the SELECT reads it: the plan reads them in that order."""
    store = StatusStore(postgres_url)
    reports = ingest.DeliveryReports([WebhookBatch(events=[event("m1", "read", api_header="h1")])], 1.0)
    with store.engine.connect() as conn, engines.driver_cursor(conn, ingest._ONE_STATEMENT) as cursor:
        statement = ingest._one_statement(conn)
        cursor.execute("EXPLAIN " + statement.inline_sql, reports.values(conn))
        plan = [line for (line,) in cursor.fetchall()]
    scans = [line.split("CTE Scan on ")[1].split()[0] for line in plan if "CTE Scan on " in line]
    read_by_the_select = [name for name in scans if name in ("new_events", "raised", "reconciled")]
    assert read_by_the_select == ["new_events", "raised", "reconciled"], plan


def test_a_failure_of_the_one_statement_names_it_without_its_values(postgres_url):
    store = StatusStore(postgres_url)
    with pytest.raises(sa_exc.DBAPIError) as raised:
        store.ingest_many([WebhookBatch(events=[event("m" * 1000, "sent", recipient="919833078369")])])
    assert "ingest._one_statement" in str(raised.value)
    assert "919833078369" not in str(raised.value) and "mmmmmmmm" not in str(raised.value)


def test_the_one_statement_locks_the_sends_it_reconciles_in_header_order(postgres_url):
    """As one by one does, whatever join PostgreSQL picks: here one that reads the ledger in the
    order the rows were written, the reverse of their headers'. While the commit waits for the
    row of a header in the middle (another writer holds it), it holds the rows of the headers
    before it and none after."""
    headers = [f"h{i:04}" for i in range(100, 2_000, 100)]
    free = _free_while_the_commit_waits(postgres_url, [f"h{i:04}" for i in range(2_000)], headers, "h1000")
    assert free == [header for header in headers if header > "h1000"]


@pytest.fixture
def en_us_postgres_url(postgres_server_url: str):
    """A database whose texts sort as en-US does (ICU), not by code point; skipped where the server
    has no ICU (PostgreSQL before 15, or built without it)."""
    import sqlalchemy

    from tests.conftest import database_name

    name = database_name("test")
    admin = sqlalchemy.create_engine(postgres_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(
                f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
            )
    except sa_exc.DBAPIError as err:
        admin.dispose()
        pytest.skip(f"this PostgreSQL cannot create a database sorting as en-US: {err.orig}")
    url = make_url(postgres_server_url).set(database=name).render_as_string(hide_password=False)
    yield url
    engines.dispose_engine(url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_the_sends_are_locked_in_code_point_order_whatever_the_databases_collation(en_us_postgres_url):
    """One by one sorts the headers as Python does, by code point (every "H..." before every
    "h..."); en-US sorts them by letter first (H0100 < h0200 < H0300). Locked in the database's
    order, a commit of one statement and one filed one by one could each wait on the other."""
    headers = sorted([f"H{i:04}" for i in range(100, 2_000, 200)] + [f"h{i:04}" for i in range(200, 2_001, 200)])
    everyone = [f"{case}{i:04}" for case in "Hh" for i in range(2_001)]
    free = _free_while_the_commit_waits(en_us_postgres_url, everyone, headers, "h1000")
    assert free == [header for header in headers if header > "h1000"], free  # every "H..." held


def _free_while_the_commit_waits(url: str, ledger_headers: list[str], headers: list[str], held: str) -> list[str]:
    """A commit of reports reconciling the unknown sends of ``headers`` (among rows for every one of
    ``ledger_headers``, written in reverse, hash joins only), while another writer holds the row of
    ``held``: which of the commit's rows nobody holds once it waits for that one."""
    import threading

    import psycopg2

    store = StatusStore(url)
    unknown_sends(store, *((f"k-{header}", header, "unknown") for header in reversed(ledger_headers)))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE pepipost_ledger")
    hash_joins_only = {"options": "-c enable_nestloop=off -c enable_mergejoin=off"}
    hashed_url = make_url(url).update_query_dict(hash_joins_only).render_as_string(hide_password=False)
    dsn = make_url(url)
    connect = dict(dbname=dsn.database, user=dsn.username, host=dsn.host, port=dsn.port or 5432)
    blocker, prober = psycopg2.connect(**connect), psycopg2.connect(**connect)
    blocker.cursor().execute("SELECT 1 FROM pepipost_ledger WHERE api_header = %s FOR UPDATE", (held,))
    outcome: list = []

    def commit() -> None:
        try:
            events = [event(f"m-{header}", "sent", api_header=header) for header in headers]
            outcome.append(StatusStore(hashed_url).ingest_many([WebhookBatch(events=events)])[0])
        except Exception as err:  # reported below
            outcome.append(err)

    writer = threading.Thread(target=commit)
    writer.start()
    try:
        deadline = time.monotonic() + 30
        while not _waiting_on_a_lock(prober, dsn.database):
            assert time.monotonic() < deadline, "the commit never waited for the row held"
            time.sleep(0.05)
        cursor = prober.cursor()  # the rows nobody holds, without waiting and let go at once
        cursor.execute("SELECT api_header FROM pepipost_ledger WHERE api_header = ANY(%s) FOR UPDATE SKIP LOCKED",
                       (headers,))  # fmt: skip
        free = sorted(header for (header,) in cursor.fetchall())
        prober.rollback()
    finally:
        blocker.rollback()
        writer.join(60)
        blocker.close()
        prober.close()
        engines.dispose_engine(hashed_url)
    assert [result.reconciled for result in outcome] == [len(headers)], outcome
    return free


def _waiting_on_a_lock(conn, database: str) -> bool:
    cursor = conn.cursor()
    cursor.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = %s AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
        (database,),
    )
    waiting = cursor.fetchone()[0] > 0
    conn.rollback()
    return waiting


# -- the one statement, prepared once a connection ---------------------------------------------


def commits_of_one_report(store: StatusStore, count: int, prefix: str = "p") -> None:
    for number in range(count):
        [result] = store.ingest_many([WebhookBatch(events=[event(f"{prefix}{number}", "sent")])])
        assert result.accepted == 1


def prepared_here(conn) -> list[tuple]:
    """This connection's prepared statements: (name, generic plans, custom plans)."""
    return conn.exec_driver_sql("SELECT name, generic_plans, custom_plans FROM pg_prepared_statements").all()


def generic_plan(store: StatusStore) -> str:
    """The plan the store's pooled connection keeps for the one statement."""
    reports = ingest.DeliveryReports([WebhookBatch(events=[event("m1", "sent", api_header="x1")])], 1.0)
    with store.engine.connect() as conn, engines.driver_cursor(conn, ingest._ONE_STATEMENT) as cursor:
        cursor.execute(engines.ONE_PLAN)  # as the commits run it: the generic plan, not one for these values
        cursor.execute("EXPLAIN " + ingest._one_statement(conn).execute_sql, reports.values(conn))
        return " ".join(line for (line,) in cursor.fetchall())


def test_the_one_statement_is_planned_once_a_connection_and_reads_the_ledger_by_header(postgres_url, monkeypatch):
    """The server parses and plans it once a connection (one generic plan), a plan that still finds
    the waiting sends by the header's index."""
    monkeypatch.setattr(engines, "REPLAN_AFTER", 3600.0)  # its plan counts: however slow the machine
    store = StatusStore(postgres_url)
    unknown_sends(store, *((f"k{i}", f"x{i}", "rejected") for i in range(20_000)))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE pepipost_ledger")
    commits_of_one_report(store, 12)
    with store.engine.connect() as conn:
        [(name, generic, custom)] = prepared_here(conn)
        assert (name, generic, custom) == (ingest._one_statement(conn).name, 12, 0)
        # for those runs alone: the connection plans anything else as it would have
        assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar() == "auto"
    assert "ix_pepipost_ledger_api_header" in generic_plan(store)


def test_a_plan_made_on_a_small_ledger_is_made_again_once_it_has_grown(postgres_url, monkeypatch):
    """A plan is made from the tables' sizes at the time and kept: one made on a new store's few
    ledger rows scans the whole ledger, which a campaign then fills (autovacuum's ANALYZE, which
    makes PostgreSQL plan again, comes when it comes, and never where it is off). The statement is
    planned again every REPLAN_AFTER seconds, by the ledger's indexes once it has grown."""
    monkeypatch.setattr(engines, "REPLAN_AFTER", 3600.0)
    store = StatusStore(postgres_url)
    unknown_sends(store, *((f"k{i}", f"x{i}", "rejected") for i in range(50)))
    with store.engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE pepipost_ledger")

    def commit_and_plan(conn, message_id: str) -> str:
        """A commit of one report on ``conn`` (as the receiver's), then the plan ``conn`` keeps."""
        reports = ingest.reports_alone([WebhookBatch(events=[event(message_id, "sent", api_header="x1")])], 1.0)
        assert ingest.ingest_reports_alone(conn, reports)[0].accepted == 1
        with engines.driver_cursor(conn, ingest._ONE_STATEMENT) as cursor:
            cursor.execute(engines.ONE_PLAN)  # as the commits run it: the generic plan
            cursor.execute("EXPLAIN " + ingest._one_statement(conn).execute_sql, reports.values(conn))
            plan = " ".join(line for (line,) in cursor.fetchall())
        conn.connection.dbapi_connection.rollback()  # the EXPLAIN's transaction, which SQLAlchemy did not open
        return plan

    with store.engine.connect() as conn:
        assert "Seq Scan on pepipost_ledger" in commit_and_plan(conn, "small")  # the plan of a small ledger
        unknown_sends(store, *((f"big{i}", f"y{i}", "rejected") for i in range(20_000)))  # not analyzed
        assert "Seq Scan on pepipost_ledger" in commit_and_plan(conn, "within")  # kept within REPLAN_AFTER
        monkeypatch.setattr(engines, "REPLAN_AFTER", 0.0)  # as once that time has passed
        plan = commit_and_plan(conn, "after")
        [(_, generic, custom)] = prepared_here(conn)
    assert "Seq Scan on pepipost_ledger" not in plan and "ix_pepipost_ledger_api_header" in plan, plan
    assert (generic, custom) == (2, 0)  # the new plan: made by the commit, read again by the EXPLAIN


def test_a_prepared_statement_the_server_forgot_runs_with_its_values_written_in(postgres_url, caplog):
    """A pooler in transaction mode (PgBouncer) hands each statement to another server session,
    which never saw the PREPARE: the commit still stores its reports, once, and says why it is slower."""
    store = StatusStore(postgres_url)
    commits_of_one_report(store, 2, "before")
    with store.engine.connect() as conn:
        conn.exec_driver_sql("DEALLOCATE ALL")  # what another server session looks like
        conn.commit()
    with caplog.at_level("WARNING", logger=engines.__name__):
        commits_of_one_report(store, 3, "after")
    assert store.count_rows("pepipost_events") == 5
    forgot = [
        record.getMessage() for record in caplog.records if "forgot the prepared statement" in record.getMessage()
    ]
    assert len(forgot) == 1 and "pooler in transaction mode" in forgot[0], forgot
    with store.engine.connect() as conn:
        assert prepared_here(conn) == []  # not prepared again on that connection


def test_a_statement_the_servers_session_already_holds_is_run_by_name(postgres_url, monkeypatch):
    """A pooler may hand a new client a server session where it was prepared: PREPARE says it
    exists, and the commit runs it."""
    monkeypatch.setattr(engines, "REPLAN_AFTER", 3600.0)  # its plan counts: however slow the machine
    store = StatusStore(postgres_url)
    commits_of_one_report(store, 1, "first")
    with store.engine.connect() as conn:
        conn.connection.info.pop(ingest._one_statement(conn).name)
    commits_of_one_report(store, 2, "then")
    with store.engine.connect() as conn:
        [(_, generic, custom)] = prepared_here(conn)
    assert generic + custom == 3 and store.count_rows("pepipost_events") == 3


def test_a_new_connection_prepares_it_again(postgres_url, monkeypatch):
    monkeypatch.setattr(engines, "REPLAN_AFTER", 3600.0)  # its plan counts: however slow the machine
    store = StatusStore(postgres_url)
    commits_of_one_report(store, 2, "old")
    with store.engine.connect() as conn:
        conn.invalidate()  # as after a lost connection
    commits_of_one_report(store, 1, "new")
    with store.engine.connect() as conn:
        [(_, generic, custom)] = prepared_here(conn)
    assert generic + custom == 1


def test_a_value_longer_than_its_column_is_refused_not_cut(postgres_url):
    """As by VALUES: a cast to VARCHAR(n) would have cut it."""
    store = StatusStore(postgres_url)
    with pytest.raises(sa_exc.DBAPIError, match="too long"):
        store.ingest_many([WebhookBatch(events=[event("m1", "sent", api_header="h" * 5000)])])
    assert store.count_rows("pepipost_events") == 0


def test_a_server_without_one_plan_a_statement_still_runs_it_prepared(postgres_url, monkeypatch):
    """Before PostgreSQL 12 there is no plan_cache_mode: the statement is planned run by run, and
    the commits go on."""
    monkeypatch.setattr(engines, "ONE_PLAN_SINCE", 10**9)  # as if this server were older than that
    monkeypatch.setattr(engines, "REPLAN_AFTER", 3600.0)  # its plan counts: however slow the machine
    store = StatusStore(postgres_url)
    commits_of_one_report(store, 7)
    with store.engine.connect() as conn:
        [(_, generic, custom)] = prepared_here(conn)
    assert generic + custom == 7 and custom >= 5


def test_a_nul_is_refused_without_the_values_around_it_in_the_error(postgres_url):
    """PostgreSQL's own refusal of a NUL in JSON quotes the text before it (a phone number)."""
    store = StatusStore(postgres_url)
    with pytest.raises(sa_exc.StatementError) as raised:
        store.ingest_many([WebhookBatch(events=[event("m1", "sent", recipient="919833078369", raw="x\x00y")])])
    assert "NUL" in str(raised.value) and "919833078369" not in str(raised.value)
    assert store.count_rows("pepipost_events") == 0
    assert "\\u0000" in engines.rows_json(  # a text that only reads like one is no NUL
        engines.DriverStatement("INSERT INTO t (a) VALUES %s", (("a", None),), "(%s)"), [{"a": "\\u0000"}]
    )


def test_a_plan_that_fails_to_be_made_again_is_made_at_the_next_commit(postgres_url, monkeypatch, caplog):
    """DEALLOCATE and PREPARE are one query, and a prepared statement is not undone with it: should
    the PREPARE fail (here it waits too long for a lock), the next commit prepares it anew rather
    than take the connection for one whose server forgets."""
    import psycopg2

    monkeypatch.setattr(engines, "REPLAN_AFTER", 0.0)
    impatient = make_url(postgres_url).update_query_dict({"options": "-c lock_timeout=200"})
    url = impatient.render_as_string(hide_password=False)
    store = StatusStore(url)
    commits_of_one_report(store, 1, "before")
    dsn = make_url(postgres_url)
    holder = psycopg2.connect(dbname=dsn.database, user=dsn.username, host=dsn.host, port=dsn.port or 5432)
    try:
        holder.cursor().execute("LOCK TABLE pepipost_events IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(sa_exc.OperationalError, match="lock timeout"):
            store.ingest_many([WebhookBatch(events=[event("during", "sent")])])
    finally:
        holder.rollback()
        holder.close()
    with caplog.at_level("WARNING", logger=engines.__name__):
        commits_of_one_report(store, 2, "after")
    assert not [record for record in caplog.records if "forgot" in record.getMessage()]
    with store.engine.connect() as conn:
        assert [name for name, _, _ in prepared_here(conn)] == [ingest._one_statement(conn).name]
    engines.dispose_engine(url)
