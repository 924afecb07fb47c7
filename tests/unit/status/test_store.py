"""The status store on SQLite and PostgreSQL: ledger, monotonic statuses, dedupe, reconciliation, summaries."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
from sqlalchemy import select

from airflow_provider_pepipost.operators.xcom import ledger_ref, parse_message_targets
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.inbound import DeadLetter, InboundMessage, WebhookBatch
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent, normalize_status
from airflow_provider_pepipost.status.store import StatusStore
from tests.store_reads import current_status, dead_letters

TASK = TaskKey("dag", "run-1", "send", -1)


def granted(answers) -> list[bool]:
    return [answer.granted for answer in answers]


def event(
    message_id: str, status: str, at: float = 1000.0, header: str | None = None, remark: str = ""
) -> DeliveryEvent:
    return DeliveryEvent(message_id, normalize_status(status), status, at, remark, header, "919833078369", "{}")


def sent(store: StatusStore, key: str, message_id: str | None, row: int = 0, state: str = "accepted", header=None):
    assert store.claim_for_sending(TASK, key, header or key, "919833078369", row)
    store.record_outcome(key, state, message_id=message_id)


def test_schema_is_created_and_versioned(store_url):
    store = StatusStore(store_url)
    assert store.schema_version() == schema.SCHEMA_VERSION
    StatusStore(store_url).ensure_schema()  # a second start changes nothing
    assert store.count_rows("pepipost_schema_version") == 1


def test_status_only_moves_up_and_failed_is_terminal(store_url):
    store = StatusStore(store_url)
    store.ingest([event("m1", "read", 3)])
    store.ingest([event("m1", "delivered", 2)])
    assert current_status(store, "m1") == "read"
    store.ingest([event("m2", "sent"), event("m2", "FAILED", 5, remark="unreachable")])
    store.ingest([event("m2", "read", 6)])
    assert current_status(store, "m2") == "failed"
    store.ingest([event("m3", "mystery")])
    assert current_status(store, "m3") == "mystery"  # an unknown value is kept...
    store.ingest([event("m3", "delivered")])
    assert current_status(store, "m3") == "delivered"  # ...and never holds a known one back


def test_duplicates_are_stored_once_and_every_event_is_kept(store_url):
    store = StatusStore(store_url)
    first = store.ingest([event("m1", "sent", 1), event("m1", "sent", 1), event("m1", "delivered", 2)])
    assert (first.accepted, first.duplicates) == (2, 1)
    again = store.ingest([event("m1", "sent", 1), event("m1", "delivered", 2)])
    assert (again.accepted, again.duplicates) == (0, 2)
    assert store.count_rows("pepipost_events") == 2


def test_out_of_order_in_one_batch(store_url):
    store = StatusStore(store_url)
    store.ingest([event("m1", "read", 3), event("m1", "sent", 1), event("m1", "delivered", 2)])
    assert current_status(store, "m1") == "read"


def test_reports_before_the_ledger_row_still_count(store_url):
    store = StatusStore(store_url)
    store.ingest([event("m1", "delivered")])
    sent(store, "k1", "m1")
    summary = store.summarize_task(TASK)
    assert summary.counts == {"delivered": 1} and summary.pending == 0


def test_claim_once_and_rejected_rows_can_be_claimed_again(store_url):
    store = StatusStore(store_url)
    assert store.claim_for_sending(TASK, "k1", "k1", "919833078369", 0)
    assert not store.claim_for_sending(TASK, "k1", "k1", "919833078369", 0)  # in flight
    store.record_outcome("k1", "rejected", error_code="8003", error_message="no contact")
    assert store.claim_for_sending(TASK, "k1", "k1", "919833078369", 0)
    store.record_outcome("k1", "accepted", message_id="m1")
    assert not store.claim_for_sending(TASK, "k1", "k1", "919833078369", 0)


def test_a_claim_given_back_unsent_is_sent_by_the_next_try_only(store_url):
    store = StatusStore(store_url)
    first_try = store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-1")
    assert granted(first_try) == [True]
    store.write_ledger(TASK, outcomes=[Outcome("k1", "not_sent")])  # the campaign stopped before it went out
    entry = store.open_ledger(TASK)["k1"]
    assert (entry.state, entry.message_id) == ("not_sent", None)  # not turned into 'unknown' like a lost send
    # The same try (a duplicate row) may not take it again; another try may.
    assert granted(store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 5)], attempt="try-1")) == [False]
    assert granted(store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-2")) == [True]


def test_tries_are_told_apart_without_clocks(store_url):
    """A retry on a worker whose clock is behind still sends what the first try did not."""
    store = StatusStore(store_url)
    store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-1")
    store.write_ledger(TASK, outcomes=[Outcome("k1", "rejected", error_code="8005")])
    # The row's sent_at is in the future of the next try's clock: no matter.
    with store.engine.begin() as conn:
        conn.execute(schema.ledger.update().values(sent_at=time.time() + 120, updated_at=time.time() + 120))
    assert granted(store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-2")) == [True]


def test_unknown_rows_are_claimed_again_only_when_asked(store_url):
    store = StatusStore(store_url)
    store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-1")
    store.write_ledger(TASK, outcomes=[Outcome("k1", "unknown", error_message="read timeout")])
    assert granted(store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-2")) == [False]
    answers = store.write_ledger(TASK, [Claim("k1", "k1", "919833078369", 0)], attempt="try-3", resend_unknown=True)
    assert granted(answers) == [True]


def test_a_store_of_schema_version_1_is_migrated(sqlite_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(sqlite_url)
    with engine.begin() as conn:  # the v1 ledger: no attempt column
        conn.execute(sqlalchemy.text(
            "CREATE TABLE pepipost_ledger (idempotency_key VARCHAR(64) PRIMARY KEY, api_header VARCHAR(512) NOT NULL,"
            " message_id VARCHAR(128), recipient VARCHAR(64) NOT NULL, dag_id VARCHAR(250) NOT NULL,"
            " run_id VARCHAR(250) NOT NULL, task_id VARCHAR(250) NOT NULL, map_index INTEGER NOT NULL,"
            " row_index INTEGER NOT NULL, state VARCHAR(16) NOT NULL, error_code VARCHAR(32), error_message TEXT,"
            " sent_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, reconciled_at FLOAT)"
        ))  # fmt: skip
        conn.execute(
            sqlalchemy.text("CREATE TABLE pepipost_schema_version (version INTEGER PRIMARY KEY, applied_at FLOAT)")
        )
        conn.execute(sqlalchemy.text("INSERT INTO pepipost_schema_version VALUES (1, 0)"))
        conn.execute(sqlalchemy.text(
            "INSERT INTO pepipost_ledger VALUES ('k1', 'k1', NULL, '919833078369', 'd', 'r', 't', -1, 0, 'rejected',"
            " '8005', NULL, 1, 1, NULL)"
        ))  # fmt: skip
    engine.dispose()
    store = StatusStore(sqlite_url)
    assert store.schema_version() == schema.SCHEMA_VERSION
    # A row from before the migration counts as another try's.
    assert granted(store.write_ledger(TaskKey("d", "r", "t"), [Claim("k1", "k1", "919833078369", 0)], attempt="a")) == [
        True
    ]


def test_many_claims_in_one_transaction_each_get_their_answer(store_url):
    store = StatusStore(store_url)
    store.write_ledger(TASK, [Claim("k0", "k0", "919833078369", 0), Claim("k1", "k1", "919833078369", 1)], attempt="1")
    store.write_ledger(TASK, outcomes=[Outcome("k0", "rejected", error_code="8003"), Outcome("k1", "accepted", "m1")])
    claims = [Claim(key, key, "919833078369", row) for row, key in enumerate(["k0", "k1", "k2", "k2", "k3"])]
    # k0 was rejected by an earlier try, k1 accepted, k2 comes twice in this batch, k3 is new.
    answers = store.write_ledger(TASK, claims, attempt="2")
    assert granted(answers) == [True, False, True, False, True]
    ledger = store.open_ledger(TASK)
    assert {key: ledger[key].state for key in ledger} == {
        "k0": "unknown",
        "k1": "accepted",
        "k2": "unknown",
        "k3": "unknown",
    }
    assert ledger["k2"].row_index == 2  # the first of the two rows holds the claim


def test_open_ledger_turns_rows_left_in_flight_into_unknown(store_url):
    store = StatusStore(store_url)
    store.claim_for_sending(TASK, "k1", "h1", "919833078369", 0)  # the try died here
    sent(store, "k2", "m2", row=1)
    ledger = store.open_ledger(TASK)
    assert ledger["k1"].state == "unknown" and ledger["k2"].message_id == "m2"
    assert store.open_ledger(TaskKey("dag", "run-2", "send")) == {}


def test_a_report_before_the_answer_does_not_make_the_row_count_twice(store_url):
    """A fast report can reconcile a row whose own 'accepted' answer is still being written."""
    store = StatusStore(store_url)
    assert store.claim_for_sending(TASK, "k1", "h1", "919833078369", 0)
    store.ingest([event("m1", "delivered", header="h1")])  # reconciles the row still 'sending'
    assert store.open_ledger(TASK)["k1"].reconciled
    store.record_outcome("k1", "accepted", message_id="m1")  # the send's own answer lands
    assert not store.open_ledger(TASK)["k1"].reconciled
    listed = ["m1", dataclasses.replace(TASK, only_unknown=True)]  # what the XCom would carry
    summary = store.summarize(listed)
    assert summary.total == 1 and summary.counts == {"delivered": 1}


def test_unknown_sends_are_reconciled_from_reports_that_echo_the_header(store_url):
    store = StatusStore(store_url)
    sent(store, "k1", None, state="unknown", header="hdr-1")
    assert store.summarize_task(TASK).unknown == 1
    result = store.ingest([event("m9", "delivered", header="hdr-1"), event("m8", "sent", header="other")])
    assert result.reconciled == 1
    assert store.ledger_message_ids(TASK) == ["m9"]
    summary = store.summarize_task(TASK)
    assert (summary.unknown, summary.counts) == (0, {"delivered": 1})


def test_summaries_by_ids_and_by_task(store_url):
    store = StatusStore(store_url)
    for i in range(6):
        sent(store, f"k{i}", f"m{i}", row=i)
    store.ingest(
        [event("m0", "read"), event("m1", "delivered"), event("m2", "sent"), event("m3", "failed", remark="bad media")]
    )
    by_ids = store.summarize_ids([f"m{i}" for i in range(6)] + ["m0"])
    assert by_ids.total == 6
    assert by_ids.counts == {"read": 1, "delivered": 1, "sent": 1, "failed": 1}
    assert by_ids.pending == 2
    assert by_ids.failed == [{"message_id": "m3", "remark": "bad media"}]
    assert by_ids.reached("delivered") == 2
    by_task = store.summarize_task(TASK)
    assert by_task.to_dict() == by_ids.to_dict()
    both = store.summarize([*("m0", "m1"), TASK])
    assert both.total == 8


@pytest.mark.parametrize("chunked", [False, True], ids=["one-parameter", "chunked"])
def test_summaries_over_more_ids_than_one_query_binds(store_url, chunked):
    store = StatusStore(store_url)
    ids = [f"m{i}" for i in range(12_000)]
    store.ingest([event(mid, "delivered") for mid in ids[:11_000]])
    store.ingest([event(mid, "failed", remark="gone") for mid in ids[10_990:11_000]])
    summary = store.summarize_ids(ids, chunked=chunked)
    assert (summary.total, summary.counts, summary.pending) == (12_000, {"delivered": 10_990, "failed": 10}, 1_000)
    assert summary.failed == [{"message_id": f"m{i}", "remark": "gone"} for i in range(10_990, 11_000)]


def test_summaries_take_ids_with_any_character(store_url):
    # PostgreSQL gets the ids joined by a newline; an id holding one must still match exactly.
    store = StatusStore(store_url)
    odd = ["m\n1", "m,2", 'm"3', "m{4}", "m 5", "m\\6"]
    store.ingest([event(mid, "delivered") for mid in odd])
    for ids in (odd, odd[1:]):
        summary = store.summarize_ids([*ids, "m"])
        assert (summary.counts, summary.pending) == ({"delivered": len(ids)}, 1)


def test_dead_letters_and_inbound_are_kept_apart(store_url):
    store = StatusStore(store_url)
    result = store.ingest(
        [], dead_letters=[DeadLetter("bad item", "{}")], inbound=[InboundMessage("text", "9199", None, '{"a":1}')]
    )
    assert (result.dead_letters, result.inbound) == (1, 1)
    assert dead_letters(store) == [("bad item", "{}")]
    assert store.count_rows("pepipost_inbound_messages") == 1
    assert store.count_rows("pepipost_events") == 0


def test_concurrent_writers_lose_and_double_nothing(store_url):
    store = StatusStore(store_url)
    batches = [
        [event(f"m{w}-{i}", s, float(n)) for i in range(50) for n, s in enumerate(("sent", "delivered"))]
        for w in range(8)
    ]
    errors: list[BaseException] = []

    def write(batch):
        try:
            for _ in range(3):  # every batch three times: the vendor resends
                StatusStore(store_url).ingest(batch)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert store.count_rows("pepipost_events") == 8 * 50 * 2
    with store.engine.connect() as conn:
        statuses = set(conn.execute(select(schema.message_status.c.status)).scalars())
    assert statuses == {"delivered"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], ["a", "b"]),
        ([["a"], ["b", "c"]], ["a", "b", "c"]),
        ('["a", "b"]', ["a", "b"]),
        ("a", ["a"]),
        (None, []),
        (ledger_ref(TASK), [TASK]),
        ([ledger_ref(TASK), ["x"]], [TASK, "x"]),
    ],
)
def test_message_targets_are_flattened(value, expected):
    assert parse_message_targets(value) == expected


def test_a_plain_dict_is_not_a_target():
    with pytest.raises(ValueError, match="ledger reference"):
        parse_message_targets({"ids": ["a"]})


def test_several_batches_in_one_transaction_keep_their_own_counts(store_url):
    store = StatusStore(store_url)
    sent(store, "k1", None, state="unknown", header="hdr-1")
    first = [event("m1", "sent", 1), event("m2", "read", 1, header="hdr-1")]
    second = [event("m1", "sent", 1), event("m3", "read", 1)]
    results = store.ingest_many([WebhookBatch(first), WebhookBatch(second, [DeadLetter("bad", "{}")])])
    assert [(r.accepted, r.duplicates, r.reconciled, r.dead_letters) for r in results] == [(2, 0, 1, 0), (1, 1, 0, 1)]
    assert store.count_rows("pepipost_events") == 3


def test_an_erased_replys_id_is_never_given_again_also_after_the_v11_upgrade(sqlite_url):
    """SQLite reused the id of the newest row once it was deleted (erasure, a purge): a reply feed's
    cursor would skip the next reply, and a claim on the old id would send to the new sender."""
    import json

    import sqlalchemy

    from airflow_provider_pepipost.status import store as store_module
    from airflow_provider_pepipost.status.inbound import TextReply

    def reply(n: int) -> TextReply:
        return TextReply("text", f"9198000000{n:02d}", None, json.dumps({"n": n}), text="hi")

    store = StatusStore(sqlite_url)
    with store.engine.begin() as conn:  # the table as v10 made it: ids reused
        ddl = conn.execute(sqlalchemy.text("SELECT sql FROM sqlite_master WHERE name = 'pepipost_inbound_messages'"))
        old_ddl = ddl.scalar().replace("AUTOINCREMENT", "")
        conn.execute(sqlalchemy.text("DROP TABLE pepipost_inbound_messages"))
        conn.execute(sqlalchemy.text(old_ddl))
        for index in schema.inbound_messages.indexes:
            index.create(conn)
        conn.execute(sqlalchemy.text("DELETE FROM pepipost_schema_version"))
        conn.execute(sqlalchemy.text("INSERT INTO pepipost_schema_version VALUES (10, 0)"))
    store.ingest([], inbound=[reply(1), reply(2)])
    with store.engine.begin() as conn:
        conn.execute(sqlalchemy.text("DELETE FROM pepipost_inbound_messages WHERE id = 2"))
    store_module._SCHEMA_READY.discard(sqlite_url)

    upgraded = StatusStore(sqlite_url)  # migrates to v11
    assert upgraded.schema_version() == schema.SCHEMA_VERSION
    assert [r.inbound_id for r in upgraded.replies_after(0, 10)] == [1]  # the rows kept, with their ids
    # Id 2, deleted before the upgrade, may come again: no cursor or claim could name it (v11 made them).
    upgraded.ingest([], inbound=[reply(3)])
    newest = max(r.inbound_id for r in upgraded.replies_after(0, 10))
    upgraded.erase("919800000003", key="test-erasure-key")  # the newest row goes
    upgraded.ingest([], inbound=[reply(4)])
    assert [r.inbound_id for r in upgraded.replies_after(0, 10)] == [1, newest + 1]


def test_erasure_takes_the_number_out_of_every_approval_request(store_url):
    store = StatusStore(store_url)
    options = {"Approve": "Approve", "Reject": "Reject"}
    store.record_approval_request("req-1", ("d", "r", "approve", -1, 1), options, {"919900000001", "919900000002"})
    assert store.erase("+91 99000 00001", key="test-erasure-key").approval_requests == 1
    with store.engine.connect() as conn:
        (approvers,) = conn.execute(schema.approval_requests.select().with_only_columns(
            schema.approval_requests.c.approvers)).scalars().all()  # fmt: skip
    assert approvers == '["919900000002"]'


def test_processes_opening_a_new_postgresql_store_at_once_take_turns(postgres_url):
    """Receivers starting together on a new database: without the schema lock, the second
    CREATE TABLE failed on PostgreSQL's catalogue (a duplicate type)."""
    import threading

    from airflow_provider_pepipost.status import store as store_module

    errors: list[BaseException] = []
    for _ in range(5):
        with StatusStore(postgres_url).engine.begin() as conn:  # a new, empty database again
            schema.metadata.drop_all(conn)
        store_module._SCHEMA_READY.discard(postgres_url)
        start = threading.Barrier(4)

        def open_store(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                StatusStore(postgres_url)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=open_store) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        store_module._SCHEMA_READY.discard(postgres_url)
    assert errors == []
    assert StatusStore(postgres_url).schema_version() == schema.SCHEMA_VERSION
