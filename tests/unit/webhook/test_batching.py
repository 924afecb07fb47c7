"""The group commit: a body the store refuses never fails the other bodies of its commit, on SQLite and PostgreSQL.

The poison here bypasses the parser's checks on purpose (it is built as the store would get it), so
that what is tested is the retry body by body, the last line of defence behind ``limits``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from airflow_provider_pepipost.status.inbound import WebhookBatch
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.batching import IngestQueue, QueueFull
from tests.store_reads import current_status, dead_letters


def event(message_id: str, status: str = "read", recipient: str = "919800000000") -> DeliveryEvent:
    raw = f'{{"id":"{message_id}"}}'
    return DeliveryEvent(message_id, status, status, 1_700_000_000.0, recipient=recipient, raw=raw)


def ingest_together(store: StatusStore | Callable[[], StatusStore], batches: list) -> list:
    """Queue every batch at once, so that they share one commit; each one's result or exception."""
    queue = IngestQueue(store if callable(store) else lambda: store)

    async def run() -> list:
        return await asyncio.gather(*(queue.ingest(batch) for batch in batches), return_exceptions=True)

    return asyncio.run(run())


@pytest.mark.parametrize("poison", ["m\ud800", "nul\x00"], ids=["lone-surrogate", "nul"])
def test_a_body_the_store_refuses_costs_no_other_body_its_commit(store_url, poison):
    store = StatusStore(store_url)
    bad = event(poison)
    if "\x00" in poison and store.is_sqlite:
        bad = event("x", recipient="\ud800")  # SQLite stores NUL: refuse it something it cannot encode
    batches = [WebhookBatch([event("a1")]), WebhookBatch([event("b1"), bad, event("b2")]), WebhookBatch([event("c1")])]
    results = ingest_together(store, batches)
    assert not any(isinstance(r, BaseException) for r in results), results
    assert [r.accepted for r in results] == [1, 2, 1]
    assert results[1].dead_letters == 1
    assert {mid: current_status(store, mid) for mid in ("a1", "b1", "b2", "c1")} == dict.fromkeys(
        ("a1", "b1", "b2", "c1"), "read"
    )
    (reason, _), *rest = dead_letters(store)
    assert not rest and reason.startswith("the store refused this item")


def test_a_value_longer_than_its_column_is_set_apart_on_postgres(postgres_url):
    store = StatusStore(postgres_url)
    results = ingest_together(store, [WebhookBatch([event("ok")]), WebhookBatch([event("long", recipient="9" * 100)])])
    assert [r.accepted for r in results] == [1, 0] and results[1].dead_letters == 1
    assert "value too long" in dead_letters(store)[0][0] and "9" * 100 not in dead_letters(store)[0][0]


def test_a_store_that_is_down_fails_every_body_and_sets_nothing_apart():
    """Down is not poison: the bodies are not acknowledged (503), so the vendor sends them again."""
    down = "postgresql+psycopg2://nobody@127.0.0.1:1/none"
    results = ingest_together(lambda: StatusStore(down), [WebhookBatch([event("a")]), WebhookBatch([event("b")])])
    assert all(isinstance(r, Exception) for r in results)


def test_admission_is_bounded_by_bodies_and_bytes():
    queue = IngestQueue(lambda: None, max_bodies=2, max_bytes=100)  # type: ignore[arg-type,return-value]
    with queue.admit(500), pytest.raises(QueueFull):  # a body alone is admitted whatever its size
        queue.admit(1).__enter__()
    with queue.admit(60), queue.admit(30):
        assert queue.full()
        with pytest.raises(QueueFull):
            queue.admit(1).__enter__()
    assert (queue.held_bodies, queue.held_bytes) == (0, 0)
