"""WhatsAppReplySensor on a real store (SQLite and PostgreSQL): who replied, by the filters; poke
and the deferrable wait in its trigger; bad input."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from airflow_provider_pepipost.operators.xcom import ledger_ref
from airflow_provider_pepipost.sensors.whatsapp import WhatsAppReplySensor
from airflow_provider_pepipost.status.inbound import ButtonReply, TextReply
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.triggers.replies import WhatsAppReplySensorTrigger
from airflow_provider_pepipost.version_compat import AirflowFailException, AirflowSensorTimeout, TaskDeferred

SEND = TaskKey("offers", "run-1", "send_offer", -1)
NUMBERS = [f"9198000001{i:02d}" for i in range(4)]
IDS = [f"sent-{i}" for i in range(4)]


@pytest.fixture
def conn_id(store_url: str, use_store) -> str:
    store = StatusStore(store_url)
    claims = [Claim(f"k{i}", f"k{i}", NUMBERS[i], i) for i in range(4)]
    outcomes = [Outcome(f"k{i}", "accepted", message_id=IDS[i]) for i in range(4)]
    store.write_ledger(SEND, claims, outcomes, attempt="a")
    return use_store(store_url)


def reply_from(store_url: str, n: int, *, payload: str | None = None, words: str | None = None) -> None:
    raw = json.dumps({"n": n, "payload": payload, "words": words, "at": time.time_ns()})
    if payload:
        item = ButtonReply("button", NUMBERS[n], IDS[n], raw, payload=payload, text=payload.title())
    else:
        item = TextReply("text", NUMBERS[n], IDS[n], raw, text=words)
    StatusStore(store_url).ingest([], inbound=[item])


def sensor(conn_id: str, message_ids=IDS, **kwargs) -> WhatsAppReplySensor:
    return WhatsAppReplySensor(task_id="wait", message_ids=message_ids, status_store_conn_id=conn_id, timeout=60,
                               **kwargs)  # fmt: skip


def test_it_counts_recipients_not_replies_and_returns_the_matching_ids(conn_id, store_url):
    wait = sensor(conn_id, min_replies=2, kinds=["button"])
    assert not wait.poke({}).is_done
    reply_from(store_url, 0, payload="YES")
    reply_from(store_url, 0, payload="YES")  # the same person again: still one
    reply_from(store_url, 1, words="yes")  # not a button
    assert not wait.poke({}).is_done
    reply_from(store_url, 2, payload="NO")
    done = wait.poke({})
    assert done.is_done
    assert done.xcom_value["recipients"] == 4 and done.xcom_value["repliers"] == 2
    assert len(done.xcom_value["inbound_ids"]) == 3
    assert NUMBERS[0] not in json.dumps(done.xcom_value)


def test_a_ratio_and_the_payload_and_keyword_filters(conn_id, store_url):
    reply_from(store_url, 0, payload="YES")
    reply_from(store_url, 1, words=" Yes! ")
    reply_from(store_url, 2, words="no thanks")
    assert sensor(conn_id, min_ratio=0.5, keywords=["yes"]).poke({}).is_done  # the button's text "Yes" too
    assert not sensor(conn_id, min_ratio=0.5, button_payloads=["YES"]).poke({}).is_done
    assert sensor(conn_id, min_ratio=0.75).poke({}).is_done
    assert not sensor(conn_id).poke({}).is_done  # every recipient, by default


def test_a_ledger_reference_waits_on_every_message_the_task_sent(conn_id, store_url):
    reply_from(store_url, 3, words="hello")
    assert sensor(conn_id, message_ids=ledger_ref(SEND), min_replies=1).poke({}).is_done


def test_a_condition_that_can_never_be_met_fails_at_once(conn_id):
    with pytest.raises(AirflowFailException, match="only 4 message"):
        sensor(conn_id, min_replies=5).poke({})
    with pytest.raises(AirflowFailException, match="no messages whose replies"):
        sensor(conn_id, message_ids=[]).poke({})


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"min_replies": 0}, "min_replies"), ({"min_ratio": 1.5}, "min_ratio"), ({"min_replies": 1, "min_ratio": 0.5},
     "not both"), ({"keywords": [""]}, "keywords")],
)  # fmt: skip
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        sensor("any", **kwargs)


def test_the_deferrable_wait_defers_then_its_trigger_fires_once_enough_replied(conn_id, store_url):
    wait = sensor(conn_id, min_replies=1, button_payloads=["YES"], deferrable=True, poke_interval=0.1)
    with pytest.raises(TaskDeferred) as deferred:
        wait.execute({})
    trigger = deferred.value.trigger
    assert isinstance(trigger, WhatsAppReplySensorTrigger) and trigger.needed == 1

    async def first_event():
        async for event in trigger.run():
            return event.payload

    reply_from(store_url, 1, words="YES")  # words, not the button: does not count
    reply_from(store_url, 2, payload="YES")
    event = asyncio.run(asyncio.wait_for(first_event(), 20))
    assert event["status"] == "success" and event["tally"]["repliers"] == 1
    assert wait.execute_complete({}, event)["repliers"] == 1


def test_the_trigger_times_out_at_its_deadline_and_the_sensor_says_how_far_it_got(conn_id):
    trigger = WhatsAppReplySensorTrigger(IDS, 3, status_store_conn_id=conn_id, poll_interval=0.05,
                                         deadline=time.time() + 0.3)  # fmt: skip

    async def first_event():
        async for event in trigger.run():
            return event.payload

    event = asyncio.run(asyncio.wait_for(first_event(), 20))
    assert event["status"] == "timeout"
    with pytest.raises(AirflowSensorTimeout, match="0 of 4 recipients replied as asked, 3 needed"):
        sensor(conn_id, min_replies=3).execute_complete({}, event)


@pytest.mark.parametrize(("ratio", "recipients", "needed"), [(0.07, 100, 7), (0.9, 10, 9), (0.29, 100, 29),
                                                            (0.5, 3, 2), (1.0, 4, 4), (0.01, 10, 1)])  # fmt: skip
def test_a_ratio_asks_for_no_replier_more_than_it_says(ratio, recipients, needed):
    from airflow_provider_pepipost.reply_filters import needed_repliers

    assert needed_repliers(recipients, None, ratio) == needed
