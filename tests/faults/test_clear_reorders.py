"""A clear never sends twice: the default campaign does not depend on which map index a row landed in.

The operators run as a mapped task's instances would, against the sandbox on loopback, on SQLite
and PostgreSQL; ``tests/system/test_clear_reorders.py`` does the same through Airflow's own clear
under the real scheduler.
"""

from __future__ import annotations

from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from tests.helpers import StandInTaskInstance, run_operator

NUMBERS = [f"9198{i:08d}" for i in range(40)]
SEGMENTS = [NUMBERS[:10], NUMBERS[10:20], NUMBERS[20:30]]


def send_segments(segments: list[list[str]], clear_number: int, run_id: str = "run-1") -> list[tuple[object, object]]:
    """Each segment to the map index it lands in, as one run of a mapped send task does."""
    return [
        run_operator(
            rows, StandInTaskInstance(run_id=run_id, map_index=index), clear_number=clear_number, xcom_full_numbers=True
        )
        for index, rows in enumerate(segments)
    ]


def test_a_clear_whose_upstream_reorders_the_segments_sends_nothing_twice(store_url, pepipost_conn, sandbox):
    pepipost_conn(sandbox.url, store_url)
    first = send_segments(SEGMENTS, clear_number=0)
    ids_by_number = {}
    for ids, ti in first:
        assert not isinstance(ids, Exception), ids
        ids_by_number.update({m["recipient"]: m["message_id"] for m in ti.xcom["messages"]})

    # Cleared: the upstream lists the segments in another order (a file listing, a set, a query).
    again = send_segments([SEGMENTS[2], SEGMENTS[0], SEGMENTS[1]], clear_number=1)
    for index, (ids, ti) in enumerate(again):
        assert not isinstance(ids, Exception), ids  # green: what it holds was sent, once
        summary = ti.xcom["send_summary"]
        assert (summary["accepted"], summary["reused_from_earlier_try"], summary["duplicate"]) == (10, 10, 0)
        assert {m["recipient"]: m["message_id"] for m in ti.xcom["messages"]} == {
            n: ids_by_number[n] for n in [SEGMENTS[2], SEGMENTS[0], SEGMENTS[1]][index]
        }
    assert sandbox.state.accepted_count == 30
    assert max(sandbox.state.accepted_by_recipient.values()) == 1
    # Each row now belongs to the map index that holds it: summaries and the page count it once.
    store = StatusStore(store_url)
    for index in range(3):
        task = TaskKey("faults", "run-1", "send", index).of_campaign("faults/run-1/send")
        assert store.summarize_task(task).total == 10


def test_a_recipient_in_two_segments_of_one_run_is_one_message(store_url, pepipost_conn, sandbox):
    pepipost_conn(sandbox.url, store_url)
    results = send_segments([NUMBERS[:6], NUMBERS[4:10]], clear_number=0)
    (_, first), (_, second) = results
    assert first.xcom["send_summary"]["accepted"] == 6
    assert [m["state"] for m in second.xcom["messages"]] == ["duplicate", "duplicate"] + ["accepted"] * 4
    assert max(sandbox.state.accepted_by_recipient.values()) == 1
    # A retry of the second map index (the same clear) still sees them as duplicates, not its own.
    _, retry = run_operator(NUMBERS[4:10], StandInTaskInstance(run_id="run-1", map_index=1))
    assert [m["state"] for m in retry.xcom["messages"]][:2] == ["duplicate", "duplicate"]
    assert sandbox.state.accepted_count == 10


def test_a_row_left_in_flight_by_a_cleared_try_is_never_resent(store_url, pepipost_conn, sandbox):
    """The cleared try died mid-send: the row it was sending moves to its new map index as unknown."""
    pepipost_conn(sandbox.url, store_url)
    store = StatusStore(store_url)
    task = TaskKey("faults", "run-1", "send", 0)
    # What a killed try leaves: claimed with the key the engine derives, never answered.
    from airflow_provider_pepipost.messages import MessageDefaults, build_message, idempotency_key

    message, _ = build_message(NUMBERS[0], MessageDefaults(source="sandbox-source", attachment_id="media-1"), 0)
    key = idempotency_key("faults/run-1/send", message.recipient, message.identity())
    store.write_ledger(task, [_claim(key, message.recipient)], attempt="killed", generation=0)
    _, ti = run_operator(NUMBERS[:1], StandInTaskInstance(run_id="run-1", map_index=1), clear_number=1)
    assert ti.xcom["messages"][0]["state"] == "unknown"
    assert sandbox.state.accepted_count == 0


def test_a_ledger_written_before_the_upgrade_is_found_by_a_retry_after_it(store_url, pepipost_conn, sandbox):
    """Stores of schema < 7 keyed rows by a campaign that named the map index: a retry after the
    upgrade finds them, and counts them in this campaign."""
    from airflow_provider_pepipost.messages import MessageDefaults, build_message, idempotency_key
    from airflow_provider_pepipost.status.ledger import Outcome

    pepipost_conn(sandbox.url, store_url)
    store = StatusStore(store_url)
    task = TaskKey("faults", "run-1", "send", 2)
    message, _ = build_message(NUMBERS[0], MessageDefaults(source="sandbox-source", attachment_id="media-1"), 0)
    key = idempotency_key("faults/run-1/send/2", message.recipient, message.identity())
    store.write_ledger(task, [_claim(key, message.recipient)], attempt="old", campaign="faults/run-1/send/2")
    store.write_ledger(None, outcomes=[Outcome(key, "accepted", "m-old")])
    ids, ti = run_operator(NUMBERS[:2], StandInTaskInstance(run_id="run-1", map_index=2))
    assert not isinstance(ids, Exception), ids
    assert ti.xcom["messages"][0]["message_id"] == "m-old"
    assert sandbox.state.accepted_count == 1  # only the new row
    assert store.summarize_task(task.of_campaign("faults/run-1/send")).total == 2


def _claim(key: str, recipient: str):
    from airflow_provider_pepipost.status.ledger import Claim

    return Claim(key, key, recipient, 0)
