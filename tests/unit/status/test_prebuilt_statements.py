"""Statements built once per dialect (engines.prebuilt) carry no call's values into another call.

The send loop's claim, outcome and row statements are built on first use and kept for the process
(bench/send_limit.py: their building was a tenth of a campaign's client CPU). Each test starts as a
new process does, with nothing built yet.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from airflow_provider_pepipost.status import engines, schema
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.store import StatusStore

TASK = TaskKey("dag", "run-1", "send", -1)
NUMBER = "919833078369"


@pytest.fixture(autouse=True)
def nothing_built_yet(monkeypatch):
    monkeypatch.setattr(engines, "_PREBUILT", {})


def granted(answers) -> list[bool]:
    return [answer.granted for answer in answers]


def left_unknown(store: StatusStore, key: str, resend_unknown: object = False) -> None:
    store.write_ledger(TASK, [Claim(key, key, NUMBER, 0)], attempt="try-1", resend_unknown=resend_unknown)
    store.write_ledger(TASK, outcomes=[Outcome(key, "unknown", error_message="read timeout")])


def test_a_truthy_flag_built_first_does_not_make_a_later_false_send_an_unknown_row_again(store_url):
    """A caller passed resend_unknown="False" (truthy) first; a later resend_unknown=False in the
    same process must hold its unknown row: granting it would send the message twice."""
    store = StatusStore(store_url)
    left_unknown(store, "k1", resend_unknown="False")
    answers = store.write_ledger(TASK, [Claim("k1", "k1", NUMBER, 0)], attempt="try-3", resend_unknown=False)
    assert granted(answers) == [False]


@pytest.mark.parametrize("first", [True, False])
def test_resend_unknown_true_and_false_alternate_in_one_process(store_url, first):
    store = StatusStore(store_url)
    for index, flag in enumerate([first, not first, first, not first]):
        key = f"k{index}"
        left_unknown(store, key)
        answers = store.write_ledger(TASK, [Claim(key, key, NUMBER, index)], attempt=f"t{index}", resend_unknown=flag)
        assert granted(answers) == [flag]


def test_each_outcome_write_has_its_own_time(store_url):
    store = StatusStore(store_url)
    for key in ("a", "b"):
        store.write_ledger(TASK, [Claim(key, key, NUMBER, 0)], attempt="try-1")
    store.write_ledger(TASK, outcomes=[Outcome("a", "accepted", "m-a")])
    time.sleep(0.05)
    store.write_ledger(TASK, outcomes=[Outcome("b", "accepted", "m-b")])
    with store.engine.connect() as conn:
        times = dict(conn.execute(select(schema.ledger.c.idempotency_key, schema.ledger.c.updated_at)).all())
    assert times["b"] > times["a"]


def test_claims_from_many_threads_grant_each_key_once(store_url):
    store = StatusStore(store_url)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def claimer(thread: int) -> None:
        try:
            for index in range(20):
                key = f"k{index}"
                claim = [Claim(key, key, NUMBER, index)]
                answers = store.write_ledger(TASK, claim, attempt=f"try-{thread}", resend_unknown=bool(thread % 2))
                results.append((key, answers[0].granted))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=claimer, args=(thread,)) for thread in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    won = [key for key, ok in results if ok]
    assert sorted(won) == sorted({key for key, _ in results})
