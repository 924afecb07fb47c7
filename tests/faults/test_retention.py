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
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
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
