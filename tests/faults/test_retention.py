"""The store over time, on SQLite and PostgreSQL: erasing a person (nothing of the number left but
the suppression hash, and never messaged again), purging under ingest load (no acknowledged report
newer than the cut-off lost, no report refused), the size per table, and the command and operator."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy
from sqlalchemy import insert, select

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.numbers import canonical_number, number_hash
from airflow_provider_pepipost.operators.maintenance import PurgeStatusStoreOperator
from airflow_provider_pepipost.sandbox import SandboxServer, Scenario
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.consent import raced_key
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.version_compat import AirflowFailException
from tests.conftest import WEBHOOK_TOKEN
from tests.helpers import StandInTaskInstance, run_operator, wait_until

KEY = "erasure-key-for-tests-9f2c"
NUMBERS = [f"9198{i:08d}" for i in range(20)]
PERSON = NUMBERS[7]
HEADERS = {"X-Pepipost-Token": WEBHOOK_TOKEN}
DAY = 86_400.0


def dump(store: StatusStore) -> str:
    """Every value of every table of the database, as text: what a dump would hold."""
    with store.engine.connect() as conn:
        if store.is_sqlite:
            return "\n".join(conn.connection.driver_connection.iterdump())
        tables = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        names = list(conn.execute(sqlalchemy.text(tables)).scalars())
        rows = [conn.execute(sqlalchemy.text(f'SELECT row_to_json(t)::text FROM "{name}" t')).all() for name in names]
        return "\n".join(row[0] for table in rows for row in table)


def spellings_of(number: str, text: str) -> list[str]:
    """Every way ``text`` spells ``number``: the digits, or digits with separators, +, 00, brackets."""
    runs = re.findall(r"\+?\(?\d[\d\s().\-]{8,30}\d", text)
    return [run for run in runs if canonical_number(run).endswith(number[2:]) and number[2:] in canonical_number(run)]


def post(receiver, body: dict) -> requests.Response:
    return requests.post(receiver.webhook_url, json=body, headers=HEADERS, timeout=10)


def test_an_erased_number_is_nowhere_but_its_hash_and_is_never_messaged_again(
    receiver, store_url, pepipost_conn, monkeypatch
):
    monkeypatch.setenv("PEPIPOST_ERASURE_KEY", KEY)
    reports_to = {"webhook_url": receiver.webhook_url, "webhook_headers": HEADERS}
    with SandboxServer(Scenario(status_delay=0.01), **reports_to) as vendor:
        pepipost_conn(vendor.url, store_url)
        ids, ti = run_operator(NUMBERS[:10], caption=f"Hi, your number {PERSON[:2]} {PERSON[2:]}")
        assert not isinstance(ids, Exception), ids
        assert wait_until(lambda: vendor.reports.pending() == 0, timeout=30)
    # Replies, a STOP among them, and junk that quotes the number in other spellings.
    replies = [
        {"message_id": "in-1", "from": f"+91 {PERSON[2:7]} {PERSON[7:]}", "received_at": "1700000000",
         "message_type": "TEXT", "text_type": {"text": "STOP"}, "context": {"ncmessage_id": ids[7]}},
        {"message_id": "in-2", "from": NUMBERS[3], "received_at": "1700000000", "message_type": "TEXT",
         "text_type": {"text": f"my friend is 00{PERSON}"}, "context": {}},
    ]  # fmt: skip
    assert post(receiver, {"incoming_message": replies}).json()["opt_outs"] == 1
    assert post(receiver, {"delivery_status": [{"ncmessage_id": "x", "recipient": f"+{PERSON}"}]}).status_code == 200
    store = StatusStore(store_url)
    assert spellings_of(PERSON, dump(store)), "the test must start from a store that holds the number"

    erased = store.erase(f"+91-{PERSON[2:]}")
    assert erased.ledger_rows == 1 and erased.events >= 1 and erased.inbound == 2 and erased.dead_letters >= 1
    whole = dump(store)
    assert spellings_of(PERSON, whole) == [], spellings_of(PERSON, whole)
    assert number_hash(PERSON, KEY) in whole  # the only trace: the suppression list's keyed hash
    assert any(n in whole for n in NUMBERS[:7])  # everybody else is still there

    # A campaign that includes the number sends it nothing: it is suppressed.
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, store_url)
        _, ti = run_operator([PERSON, NUMBERS[12]], StandInTaskInstance(run_id="after-erasure"))
        assert [m["state"] for m in ti.xcom["messages"]] == ["suppressed", "accepted"]
        assert vendor.state.accepted_by_recipient[PERSON] == 0


def seed_mentions(store: StatusStore, number: str) -> list[str]:
    """Rows that name ``number`` the ways vendors, gateways and people write it, in every table that
    keeps free text; returns the ledger's idempotency keys of the number (hashes of it)."""
    national, tag = number[2:], number[-4:]
    pairs = " ".join(national[i : i + 2] for i in range(0, len(national), 2))
    now = time.time()
    keys = [f"af-{tag}{i:028x}" for i in range(2)]
    ledger_row = {"api_header": "h", "recipient": number, "dag_id": "d", "run_id": "r", "task_id": "t",
                  "map_index": -1, "row_index": 0, "sent_at": now, "updated_at": now}  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(schema.ledger).values(
            **ledger_row, idempotency_key=keys[0], message_id=f"pm-{tag}", state="accepted"
        ))  # fmt: skip
        conn.execute(insert(schema.ledger).values(
            **ledger_row, idempotency_key=keys[1], state="rejected", error_message=f"0{national} is not on WhatsApp"
        ))  # fmt: skip
        conn.execute(insert(schema.campaign_rows).values(
            dag_id="d", run_id="r", task_id="t", map_index=-1, row_index=int(tag), state="accepted", recipient=number,
            ledger_key=keys[0], message_id=f"pm-{tag}", updated_at=now,
        ))  # fmt: skip
        conn.execute(insert(schema.message_status).values(
            message_id=f"other-{tag}", status="failed", rank=9, remark=f"Phone {national[:5]} {national[5:]} blocked",
            updated_at=now,
        ))  # fmt: skip
        conn.execute(insert(schema.dead_letters).values(
            received_at=now, reason="bad item", raw=f'{{"recipient": "+{number[:2]} {pairs}"}}', letter_key=f"dl-{tag}"
        ))  # fmt: skip
        conn.execute(insert(schema.consent_batches).values(
            batch_key=f"cb-{tag}", dag_id="d", run_id="r", task_id="c", map_index=-1, kind="optin", rows=1,
            state="refused", error_code="8006", error_message=f"invalid +{number[:2]} {national}", updated_at=now,
        ))  # fmt: skip
        # A STOP of the number that raced a confirmed opt-in, kept beside its batch (its key hashes the number).
        conn.execute(insert(schema.consent_batches).values(
            batch_key=raced_key(f"cb-{tag}", number), dag_id="d", run_id="r", task_id="c", map_index=-1,
            kind="optin", rows=1, state="raced", updated_at=now,
        ))  # fmt: skip
    return [*keys, raced_key(f"cb-{tag}", number)]


def test_erasure_finds_the_number_however_it_is_written_and_its_hashes_too(store_url, monkeypatch):
    """National forms (a trunk 0 too), digits in pairs, a consent call's error, a status remark of
    another message, and the ledger's idempotency keys, which an unkeyed hash of the number would
    let anyone with a list of numbers find again."""
    monkeypatch.setenv("PEPIPOST_ERASURE_KEY", KEY)
    store = StatusStore(store_url)
    keys = seed_mentions(store, PERSON)
    seed_mentions(store, NUMBERS[3])  # somebody else, who stays
    before = dump(store)
    assert len(spellings_of(PERSON, before)) >= 5 and all(key in before for key in keys)
    erased = store.erase(PERSON)
    assert (erased.ledger_rows, erased.campaign_rows, erased.consent_batches) == (2, 1, 2)
    whole = dump(store)
    assert spellings_of(PERSON, whole) == [], spellings_of(PERSON, whole)
    assert not any(key in whole for key in keys)  # the keys are keyed hashes of themselves now
    assert len(spellings_of(NUMBERS[3], whole)) >= 5


@pytest.fixture
def erased(store_url, monkeypatch) -> StatusStore:
    """The store after PERSON said STOP and was then erased, the erasure key set."""
    monkeypatch.setenv("PEPIPOST_ERASURE_KEY", KEY)
    store = StatusStore(store_url)
    store.record_opt_outs([PERSON], via="reply", detail="replied 'STOP'")
    store.erase(PERSON)
    return store


def test_a_store_with_erased_numbers_sends_nothing_without_the_key_it_erased_them_with(
    erased, store_url, pepipost_conn, monkeypatch
):
    store = erased
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, store_url)
        for key, run in ((None, "no-key"), ("another-key", "other-key")):
            if key is None:
                monkeypatch.delenv("PEPIPOST_ERASURE_KEY")
            else:
                monkeypatch.setenv("PEPIPOST_ERASURE_KEY", key)
            error, _ = run_operator([PERSON, NUMBERS[12]], StandInTaskInstance(run_id=run))
            assert isinstance(error, AirflowFailException) and "erasure key" in str(error), error
            assert vendor.state.requests == 0  # not the erased person, and nobody else either
        with pytest.raises(PepipostConfigError, match="not the one"):
            store.erase(NUMBERS[4])  # another key would leave the numbers erased before unrecognised
        monkeypatch.setenv("PEPIPOST_ERASURE_KEY", KEY)
        _, ti = run_operator([PERSON, NUMBERS[12]], StandInTaskInstance(run_id="the-key"))
        assert [m["state"] for m in ti.xcom["messages"]] == ["suppressed", "accepted"]


def test_a_consent_task_does_not_opt_an_erased_number_back_in_at_the_vendor(erased, store_url, pepipost_conn):
    from airflow_provider_pepipost.operators.consent import WhatsAppConsentOperator

    store = erased
    with SandboxServer(Scenario()) as vendor:
        pepipost_conn(vendor.url, store_url)
        operator = WhatsAppConsentOperator(task_id="opt_in", recipients=[PERSON, NUMBERS[12]], source="WEB")
        result = operator.execute({"ti": StandInTaskInstance(task_id="opt_in")})
        assert (result["skipped_opted_out"], result["confirmed"]) == (1, 1)
        assert [call["recipients"] for call in vendor.state.consent_calls] == [[NUMBERS[12]]]
    assert PERSON not in dump(store)


def test_erasing_needs_the_deployments_key(store_url, monkeypatch):
    monkeypatch.delenv("PEPIPOST_ERASURE_KEY", raising=False)
    with pytest.raises(PepipostConfigError, match="PEPIPOST_ERASURE_KEY"):
        StatusStore(store_url).erase(PERSON)


def old_events(store: StatusStore, count: int, age_days: float) -> None:
    """``count`` stored reports, received ``age_days`` ago."""
    with store.engine.begin() as conn:
        conn.execute(insert(schema.events), [
            {"event_key": f"old-{age_days}-{i}", "message_id": f"old-{i}", "status": "read", "raw_status": "read",
             "remark": "", "reported_at": None, "received_at": time.time() - age_days * DAY, "raw": "{}"}
            for i in range(count)
        ])  # fmt: skip


def test_a_purge_under_ingest_load_refuses_nothing_and_loses_nothing_newer(receiver, store_url):
    store = StatusStore(store_url)
    old_events(store, 20_000, age_days=40)
    store.record_opt_outs([PERSON], via="reply", detail="replied 'STOP'")
    with store.engine.begin() as conn:  # an old STOP: kept however old
        conn.execute(schema.suppressions.update().values(changed_at=time.time() - 400 * DAY))
    answers: list[int] = []
    posted: list[str] = []
    stop = threading.Event()

    def client() -> None:
        for i in range(100_000):  # bounded by count, and by the purge's end
            if stop.is_set():
                return
            message_id = f"new-{i}"
            body = {"delivery_status": [{"ncmessage_id": message_id, "status": "delivered", "received_at": 1.7e9}]}
            answer = post(receiver, body)
            answers.append(answer.status_code)
            if answer.status_code == 200:
                posted.append(message_id)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        assert wait_until(lambda: len(posted) >= 5, timeout=20)
        deleted = store.purge(30, batch_size=500)
        assert wait_until(lambda: len(posted) >= len(answers) and len(posted) > 20, timeout=20)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert deleted["pepipost_events"] == 20_000
    assert set(answers) == {200}, set(answers)  # the receiver never refused a report meanwhile
    with store.engine.connect() as conn:
        kept = set(
            conn.execute(select(schema.events.c.message_id).where(schema.events.c.message_id.like("new-%"))).scalars()
        )
    assert kept == set(posted)  # every acknowledged report newer than the cut-off is there
    assert store.suppressed([PERSON]) == {PERSON}


def test_a_purge_deletes_in_short_batches_every_kind_of_old_row_but_rows_in_flight(store_url):
    store = StatusStore(store_url)
    old = time.time() - 40 * DAY
    old_events(store, 25, age_days=40)
    led = {"api_header": "h", "recipient": NUMBERS[1], "dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1,
           "row_index": 0, "sent_at": old, "updated_at": old}  # fmt: skip
    with store.engine.begin() as conn:
        conn.execute(insert(schema.inbound_messages), [
            {"inbound_key": f"in-{i}", "sender": NUMBERS[2], "received_at": old, "raw": "{}"} for i in range(7)
        ])  # fmt: skip
        conn.execute(insert(schema.dead_letters), [
            {"received_at": old, "reason": "bad", "raw": "{}", "letter_key": f"dl-{i}"} for i in range(5)
        ])  # fmt: skip
        for i, state in enumerate(["accepted", "rejected", "suppressed", "sending", "unknown"]):
            conn.execute(insert(schema.ledger).values(**led, idempotency_key=f"k{i}", state=state))
    deletes: list[str] = []  # the DELETE statements, each in a transaction of its own

    def note(_conn, _cursor, statement: str, *_args) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement.split()[2])  # the table

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", note)
    deleted = store.purge(30, batch_size=10)
    assert (deleted["pepipost_events"], deleted["pepipost_inbound_messages"], deleted["pepipost_dead_letters"]) == (
        25, 7, 5
    )  # fmt: skip
    assert deleted["pepipost_ledger"] == 3  # a row in flight (sending, unknown) may be a try's to come back to
    with store.engine.connect() as conn:
        kept = set(conn.execute(select(schema.ledger.c.state)).scalars())
    assert kept == {"sending", "unknown"}
    # 25 events 10 at a time are three deletes, never one: a receiver waits for one batch at most.
    assert deletes.count("pepipost_events") == 3, deletes


def test_a_dry_run_counts_what_a_purge_deletes(store_url):
    store = StatusStore(store_url)
    old_events(store, 30, age_days=10)
    old_events(store, 20, age_days=1)
    store.ingest([DeliveryEvent("fresh", "sent", "sent", 1.7e9, raw="{}")])
    would = store.purge(5, dry_run=True)
    assert would["pepipost_events"] == 30
    assert store.count_rows("pepipost_events") == 51  # nothing deleted
    assert store.purge(5, batch_size=7)["pepipost_events"] == 30
    assert store.count_rows("pepipost_events") == 21


def test_stats_tell_rows_bytes_and_the_oldest_row(store_url):
    store = StatusStore(store_url)
    old_events(store, 500, age_days=3)
    by_table = {table.table: table for table in store.stats()}
    events = by_table["pepipost_events"]
    assert events.rows == 500 and events.bytes and events.bytes > 500 * 50
    assert abs(events.oldest - (time.time() - 3 * DAY)) < 60
    assert by_table["pepipost_suppressions"].rows == 0 and by_table["pepipost_suppressions"].oldest is None


def test_the_command_and_the_operator(store_url, use_store, monkeypatch, tmp_path):
    store = StatusStore(store_url)
    old_events(store, 40, age_days=100)
    command = [str(Path(sys.executable).parent / "pepipost-store"), "--store-url", store_url]
    dry = subprocess.run([*command, "purge", "--older-than", "90", "--dry-run"], capture_output=True, text=True)
    assert dry.returncode == 0 and "would delete 40 rows older than 90 days" in dry.stdout, dry.stderr
    stats = json.loads(subprocess.run([*command, "--json", "stats"], capture_output=True, text=True, check=True).stdout)
    assert {t["table"]: t["rows"] for t in stats["tables"]}["pepipost_events"] == 40
    refused = subprocess.run([*command, "erase", PERSON], capture_output=True, text=True, env={"PATH": "/usr/bin"})
    assert refused.returncode == 2 and "PEPIPOST_ERASURE_KEY" in refused.stderr
    operator = PurgeStatusStoreOperator(task_id="purge", older_than_days=90, status_store_conn_id=use_store(store_url))
    assert operator.execute({"ti": StandInTaskInstance()})["pepipost_events"] == 40
    assert store.count_rows("pepipost_events") == 0
