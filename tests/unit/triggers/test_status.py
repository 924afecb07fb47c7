"""WhatsAppMessageStatusTrigger: serialization round trip and the async wait on a real store."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import threading
import time

import pytest

from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.triggers.status import WhatsAppMessageStatusTrigger


def ev(message_id: str, status: str, remark: str = "") -> DeliveryEvent:
    return DeliveryEvent(message_id, status, status, time.time(), remark, None, None, "{}")


def first_event(trigger: WhatsAppMessageStatusTrigger, timeout: float = 20.0):
    async def take():
        async for event in trigger.run():
            return event.payload

    return asyncio.run(asyncio.wait_for(take(), timeout))


def test_serialize_round_trip():
    trigger = WhatsAppMessageStatusTrigger(
        ["m1"], "pepipost_status_store", "read", 0.5, "any", "ignore", 7.0,
        ledger_tasks=[dataclasses.asdict(TaskKey("d", "r", "t"))],
    )  # fmt: skip
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    rebuilt = getattr(importlib.import_module(module), name)(**kwargs)
    assert rebuilt.serialize() == (classpath, kwargs)
    assert classpath == "airflow_provider_pepipost.triggers.status.WhatsAppMessageStatusTrigger"


def test_the_trigger_carries_the_store_connection_id_never_its_url(use_store, postgres_url):
    """The trigger table holds serialized kwargs in plain text: no URL, no password may get there."""
    conn_id = use_store(postgres_url.replace("postgres@", "postgres:s3cret@"))
    trigger = WhatsAppMessageStatusTrigger(["m1"], conn_id)
    _, kwargs = trigger.serialize()
    assert kwargs["status_store_conn_id"] == conn_id
    assert "s3cret" not in repr(kwargs) and "127.0.0.1" not in repr(kwargs)
    assert "s3cret" not in repr(trigger)


def test_fires_once_reports_reach_the_target(store_url, use_store):
    store = StatusStore(store_url)
    store.ingest([ev("m1", "read"), ev("m2", "sent")])

    def later():
        time.sleep(0.5)
        store.ingest([ev("m2", "delivered")])

    threading.Thread(target=later).start()
    started = time.monotonic()
    payload = first_event(
        WhatsAppMessageStatusTrigger(["m1", "m2"], use_store(store_url), "delivered", poll_interval=0.1)
    )
    assert time.monotonic() - started >= 0.4
    assert payload["status"] == "success"
    assert payload["summary"]["counts"] == {"delivered": 1, "read": 1}


def test_fails_when_the_ratio_cannot_be_met(sqlite_url, use_store):
    StatusStore(sqlite_url).ingest([ev("m1", "failed", "no phone"), ev("m2", "read")])
    payload = first_event(
        WhatsAppMessageStatusTrigger(["m1", "m2"], use_store(sqlite_url), "delivered", 1.0, poll_interval=0.1)
    )
    assert payload["status"] == "failure"
    assert "m1 (no phone)" in payload["reason"]


def test_gives_up_after_repeated_store_errors(use_store):
    conn_id = use_store("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    trigger = WhatsAppMessageStatusTrigger(["m1"], conn_id, poll_interval=0.01)
    payload = first_event(trigger, timeout=60)
    assert payload["status"] == "error" and "could not be read" in payload["reason"]


@pytest.mark.parametrize("target", ["sent", "read"])
def test_waits_on_a_ledger_reference(sqlite_url, target, use_store):
    store = StatusStore(sqlite_url)
    task = TaskKey("d", "r", "t")
    for i in range(3):
        store.claim_for_sending(task, f"k{i}", f"k{i}", "919833078369", i)
        store.record_outcome(f"k{i}", "accepted", message_id=f"m{i}")
    store.ingest([ev(f"m{i}", "read") for i in range(3)])
    payload = first_event(
        WhatsAppMessageStatusTrigger(
            [], use_store(sqlite_url), target, poll_interval=0.1, ledger_tasks=[dataclasses.asdict(task)]
        )
    )
    assert payload["status"] == "success" and payload["summary"]["total"] == 3
