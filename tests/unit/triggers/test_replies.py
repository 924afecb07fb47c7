"""WhatsAppReplyTrigger: serialization, the filters, the small payload, and a cursor that fires each
reply once across restarts, on a real store (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import time
from collections.abc import AsyncIterator

import pytest
from airflow.sdk import Asset, AssetWatcher

from airflow_provider_pepipost.reply_filters import ReplyFilter, reply_event
from airflow_provider_pepipost.status.inbound import ButtonReply, InboundMessage, TextReply
from airflow_provider_pepipost.status.ledger import Claim, Outcome, TaskKey
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.triggers import replies as replies_module
from airflow_provider_pepipost.triggers.feed_window import FeedWindow
from airflow_provider_pepipost.triggers.replies import (
    HAS_SHARED_STREAMS,
    ReplyFeedProducer,
    WhatsAppReplySensorTrigger,
    WhatsAppReplyTrigger,
)
from tests.conftest import STORE_CONN_ID

SENDER = "919800000123"
SEND = TaskKey("offers", "run-1", "send_offer", 0)


def tap(n: int, payload: str = "YES_BOOK", text: str = "Yes, book it", answers: str | None = "sent-1") -> ButtonReply:
    raw = json.dumps({"n": n, "payload": payload})
    return ButtonReply("button", SENDER, answers, raw, message_id=f"in-{n}", payload=payload, text=text)


def said(n: int, words: str, answers: str | None = "sent-1") -> TextReply:
    return TextReply("text", SENDER, answers, json.dumps({"n": n, "text": words}), message_id=f"in-{n}", text=words)


def file(store: StatusStore, *messages: InboundMessage) -> list[int]:
    """Store customer messages as the receiver does; their ids, in order."""
    before = set(store_ids(store))
    store.ingest([], inbound=list(messages))
    return [inbound_id for inbound_id in store_ids(store) if inbound_id not in before]


def store_ids(store: StatusStore) -> list[int]:
    """Every customer message's id, read with SQL (not through the feed's own reads)."""
    from airflow_provider_pepipost.status import schema

    with store.engine.connect() as conn:
        return list(conn.execute(schema.inbound_messages.select().with_only_columns(schema.inbound_messages.c.id)
                                 .order_by(schema.inbound_messages.c.id)).scalars())  # fmt: skip


@pytest.fixture
def store(store_url: str, use_store) -> StatusStore:
    use_store(store_url)
    opened = StatusStore(store_url)
    opened.write_ledger(
        SEND, [Claim("k1", "k1", SENDER, 7)], [Outcome("k1", "accepted", message_id="sent-1")], attempt="a"
    )
    return opened


def rebuilt(trigger):
    classpath, kwargs = trigger.serialize()
    module, _, name = classpath.rpartition(".")
    return classpath, kwargs, getattr(importlib.import_module(module), name)(**kwargs)


def test_serialize_round_trip_of_both_triggers():
    trigger = WhatsAppReplyTrigger(
        kinds=["BUTTON"], button_payloads=["YES_BOOK"], keywords=["yes"], dag_id="offers", task_id="send_offer",
        status_store_conn_id="pepipost_status_store", poll_interval=2.0, stream="slots",
    )  # fmt: skip
    classpath, kwargs, again = rebuilt(trigger)
    assert again.serialize() == (classpath, kwargs)
    assert classpath == "airflow_provider_pepipost.triggers.replies.WhatsAppReplyTrigger"
    assert kwargs["kinds"] == ["button"] and kwargs["stream"] == "slots"
    json.dumps(kwargs)  # what the trigger table stores
    task = {"dag_id": "d", "run_id": "r", "task_id": "t", "map_index": -1}
    sensor_trigger = WhatsAppReplySensorTrigger(["m1"], 3, [task], keywords=["YES"], deadline=9.0)
    classpath, kwargs, again = rebuilt(sensor_trigger)
    assert again.serialize() == (classpath, kwargs)


def test_it_is_an_event_trigger_an_asset_watcher_takes():
    watcher = AssetWatcher(name="taps", trigger=WhatsAppReplyTrigger(button_payloads=["YES_BOOK"]))
    assert Asset("pepipost_taps", watchers=[watcher]).watchers == [watcher]


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"kinds": [""]}, "kinds"),
        ({"button_payloads": [3]}, "button_payloads"),
        ({"keywords": ["?!"]}, "keywords"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"stream": " "}, "stream"),
        ({"stream": "consumer:x"}, "stream"),
        ({"kinds": ["buttons"]}, "did you mean 'button'"),
        ({"dag_id": ""}, "dag_id"),
    ],
)
def test_a_bad_filter_is_refused_naming_its_field(arguments, field):
    with pytest.raises(ValueError, match=field):
        WhatsAppReplyTrigger(**arguments)


def test_filters_combine_with_and_and_keywords_compare_as_stop_words_do(store):
    ids = file(
        store,
        tap(1),
        tap(2, payload="NOT_NOW", text="Not now"),
        said(3, " yes\u200b!! "),  # a zero-width space and punctuation: still YES
        said(4, "yes please"),
        said(5, "YES", answers=None),  # answers nothing the provider sent
    )
    replies = {reply.inbound_id: reply for reply in store.replies_after(0, 100)}

    def matched(**filters) -> list[int]:
        wanted = ReplyFilter.build(**filters)
        return [n for n, inbound_id in enumerate(ids, start=1) if wanted.match(replies[inbound_id])[0]]

    assert matched() == [1, 2, 3, 4, 5]
    assert matched(kinds=["button"]) == [1, 2]
    assert matched(button_payloads=["YES_BOOK"]) == [1]
    assert matched(keywords=["Yes"]) == [3, 5]
    assert matched(keywords=["yes", "Yes, book it"]) == [1, 3, 5]  # a button's text counts as its words
    assert matched(keywords=["yes"], dag_id="offers") == [3]
    assert matched(task_id="send_offer", kinds=["text"]) == [3, 4]
    assert matched(dag_id="another_dag") == []
    assert ReplyFilter.build(keywords=["yes"]).match(replies[ids[2]]) == (True, "yes")


def test_the_payload_holds_no_whole_number_and_no_words_from_the_phone(store):
    (inbound_id,) = file(store, said(1, "YES call me on +91 98000 00123"))
    reply = store.reply(inbound_id)
    payload = reply_event(reply, "YES")
    text = json.dumps(payload)
    assert SENDER not in text and "98000" not in text and "call me" not in text
    assert payload["from_masked"] == "9198******23"
    assert payload["in_reply_to"] == {"message_id": "sent-1", "dag_id": "offers", "run_id": "run-1",
                                      "task_id": "send_offer", "map_index": 0, "row": 7}  # fmt: skip
    assert set(payload) == {"inbound_id", "kind", "button_payload", "keyword", "received_at", "from_masked",
                            "in_reply_to"}  # fmt: skip


async def take(events: AsyncIterator, count: int, timeout: float = 20.0) -> list:
    taken = []

    async def pull():
        async for event in events:
            taken.append(event)
            if len(taken) == count:
                return

    await asyncio.wait_for(pull(), timeout)
    return taken


class Watcher:
    """A trigger's events (or a producer's stream) pulled in the background, as the triggerer
    pulls them; ``fired`` holds the ids of the customer messages, in the order they came."""

    def __init__(self, source: WhatsAppReplyTrigger | ReplyFeedProducer) -> None:
        if isinstance(source, ReplyFeedProducer):
            self.events, self.id_of = source.open_stream(), lambda item: item[0].inbound_id
        else:
            self.events, self.id_of = source.run(), lambda event: event.payload["inbound_id"]
        self.fired: list[int] = []
        self.task = asyncio.create_task(self._pull())

    async def _pull(self) -> None:
        async for item in self.events:
            self.fired.append(self.id_of(item))

    async def until(self, count: int, timeout: float = 20.0) -> list[int]:
        async def enough() -> None:
            while len(self.fired) < count:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(enough(), timeout)
        return self.fired

    async def stop(self) -> None:
        """As a triggerer that dies: nothing more is read or done."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def test_a_new_feed_never_fires_for_an_old_reply_and_fires_each_new_one_once(store, monkeypatch):
    """Airflow 3.1 and 3.2's path (a poll of its own): the cursor moves past an event once it settled;
    a trigger started again (a triggerer restart) fires what had not settled, and nothing before it."""
    file(store, tap(1))  # before the watcher existed

    def trigger() -> WhatsAppReplyTrigger:
        return WhatsAppReplyTrigger(
            button_payloads=["YES_BOOK"], poll_interval=0.05, status_store_conn_id=STORE_CONN_ID
        )

    async def life(settle: float, *filed: InboundMessage, count: int, settled: bool = False) -> list[int]:
        monkeypatch.setattr(replies_module, "SETTLE_SECONDS", settle)
        watching = trigger()
        watcher = Watcher(watching)
        await wait_for_feed(store, watching.own_cursor())
        file(store, *filed)
        fired = await watcher.until(count)
        if settled:  # until the cursor is past everything filed
            newest, deadline = store_ids(store)[-1], time.monotonic() + 20
            while store.open_reply_cursor(watching.own_cursor()) < newest:
                assert time.monotonic() < deadline, "the cursor never moved past the settled replies"
                await asyncio.sleep(0.02)
        await watcher.stop()
        return fired

    ids = store_ids
    # Settled at once: the cursor moves past all three (the NOT_NOW tap is read, not fired).
    fired = asyncio.run(life(0.0, tap(2), tap(3, payload="NOT_NOW"), tap(4), count=2, settled=True))
    assert fired == [ids(store)[1], ids(store)[3]]
    # Not settled when the triggerer dies: tap 5 fired but its cursor never moved past it...
    assert asyncio.run(life(3600.0, tap(5), count=1)) == [ids(store)[4]]
    # ...so the next life fires it again (at least once), and nothing before it.
    assert asyncio.run(life(3600.0, tap(6), count=2)) == ids(store)[4:6]


@pytest.mark.skipif(not HAS_SHARED_STREAMS, reason="shared streams (ack mode) came with Airflow 3.3")
def test_the_shared_feed_moves_its_cursor_only_past_what_every_watcher_confirmed(store):
    from airflow.triggers.shared_stream import AdvanceItem, AdvanceOutcome

    """Airflow 3.3's ack mode: the cursor moves with each confirmed batch; a message some watcher did
    not confirm stops it (and ends the group, so the message comes again); a producer started again
    (a triggerer restart) starts after the last confirmed message, never before."""
    file(store, tap(1))  # before the feed existed
    producer = ReplyFeedProducer(STORE_CONN_ID, "slots", 0.05)

    async def first_life() -> list:
        stream = producer.open_stream()
        taking = asyncio.create_task(take(stream, 3))
        await wait_for_feed(store, "slots")
        file(store, tap(2), tap(3), tap(4))
        got = await taking
        await producer.advance([AdvanceItem(got[0][1], AdvanceOutcome(acked=2, failed=0))])
        with pytest.raises(RuntimeError, match="delivered again"):
            await producer.advance([
                AdvanceItem(got[1][1], AdvanceOutcome(acked=1, failed=0, rejected=1)),
                AdvanceItem(got[2][1], AdvanceOutcome(acked=1, failed=1)),
            ])  # fmt: skip
        await stream.aclose()
        return [reply for reply, _ in got]

    first = asyncio.run(first_life())
    ids = store_ids(store)
    assert [reply.inbound_id for reply in first] == ids[1:4]
    assert store.open_reply_cursor("slots") == ids[2]  # tap 3 (confirmed, one watcher refused it): behind

    async def second_life() -> list:
        stream = ReplyFeedProducer(STORE_CONN_ID, "slots", 0.05).open_stream()
        got = await take(stream, 1)
        await stream.aclose()
        return [reply.inbound_id for reply, _ in got]

    assert asyncio.run(second_life()) == [ids[3]]  # tap 4 again, and only tap 4


def test_each_watcher_of_a_shared_feed_fires_only_its_own_replies(store):
    yes = WhatsAppReplyTrigger(button_payloads=["YES_BOOK"], stream="offers")
    words = WhatsAppReplyTrigger(keywords=["later"], kinds=["text"], stream="offers")
    if HAS_SHARED_STREAMS:
        assert yes.shared_stream_key() == words.shared_stream_key()  # one poll for both
        assert WhatsAppReplyTrigger(stream="other").shared_stream_key() != yes.shared_stream_key()
    else:  # Airflow 3.1 and 3.2: no shared streams, each watcher polls a feed of its own
        assert yes.shared_stream_key() is None and yes.feed_name() != words.feed_name()
    # Without a stream each watcher has a feed of its own (several triggerers never share a cursor).
    alone, other = WhatsAppReplyTrigger(button_payloads=["YES_BOOK"]), WhatsAppReplyTrigger(kinds=["text"])
    assert alone.feed_name() != other.feed_name() and alone.feed_name().startswith("watcher/")
    assert alone.feed_name() == WhatsAppReplyTrigger(button_payloads=["YES_BOOK"], poll_interval=9).feed_name()
    file(store, tap(1), said(2, "Later!"), tap(3, payload="NOT_NOW"))
    replies = store.replies_after(0, 10)

    async def raw() -> AsyncIterator:
        for reply in replies:
            yield reply

    async def fired(trigger: WhatsAppReplyTrigger) -> list:
        return [
            (event.payload["kind"], event.payload["keyword"]) async for event in trigger.filter_shared_stream(raw())
        ]

    assert asyncio.run(fired(yes)) == [("button", None)]
    assert asyncio.run(fired(words)) == [("text", "later")]


def test_claims_give_each_reply_to_one_run_and_a_retry_its_own_back(store):
    ids = file(store, tap(1), tap(2), tap(3))
    assert store.claim_replies("router", ids[:2], "router_dag", "run-a") == ids[:2]
    assert store.claim_replies("router", ids, "router_dag", "run-b") == ids[2:]  # 1 and 2 are run-a's
    assert store.claim_replies("router", ids[:2], "router_dag", "run-a") == ids[:2]  # run-a's retry
    assert store.claim_replies("another_consumer", ids, "router_dag", "run-b") == ids  # consumers apart
    assert store.claim_replies("router", [], "router_dag", "run-c") == []


def test_a_cursor_never_moves_back_and_a_new_feed_starts_at_the_newest_message(store):
    ids = file(store, tap(1), tap(2))
    assert store.open_reply_cursor("fresh") == ids[-1]
    store.advance_reply_cursor("fresh", ids[-1] + 5)
    store.advance_reply_cursor("fresh", ids[0])
    assert store.open_reply_cursor("fresh") == ids[-1] + 5


def test_the_window_delivers_a_message_that_commits_late_and_passes_a_gap_only_once_it_expired():
    window = FeedWindow(start=8, gap_wait=30.0)
    assert window.take([10, 11], now=0.0) == [10, 11]  # 9 is not visible yet
    assert window.read_floor == 8  # the next read starts below the gap
    assert window.take([10, 11], now=1.0) == []  # read again: not delivered twice
    assert window.finish([10, 11], now=1.0) == 8  # the cursor may not pass 9 yet
    assert window.take([9, 10, 11], now=2.0) == [9]  # 9 committed late: delivered
    assert window.read_floor == 11
    assert window.finish([9], now=2.0) == 11
    assert window.take([13], now=3.0) == [13]  # 12 never commits (a duplicate took the id)
    assert window.finish([13], now=10.0) == 11
    assert window.finish([], now=33.1) == 13  # given up on after 30 s
    assert window.take([13, 14], now=34.0) == [14] and window.read_floor == 14


async def wait_for_feed(store: StatusStore, name: str, timeout: float = 20.0) -> None:
    """Until the feed has opened its cursor: what it fires starts after that."""
    deadline = time.monotonic() + timeout
    while store.reply_feed_start(name) is None:
        assert time.monotonic() < deadline, f"feed {name} never opened"
        await asyncio.sleep(0.02)


def test_replies_commit_in_id_order_and_one_written_out_of_order_still_fires(postgres_url, use_store):
    """PostgreSQL: a receiver's transaction with customer messages waits for another's to commit, so
    ids become visible in order; a row written past that order (a receiver of an older version,
    without the lock) that commits after a higher id still fires, once."""
    import threading

    from sqlalchemy import insert

    from airflow_provider_pepipost.status import ingest, schema
    from airflow_provider_pepipost.status.inbound import WebhookBatch

    use_store(postgres_url)
    store = StatusStore(postgres_url)

    async def scenario() -> list[int]:
        collector = Watcher(ReplyFeedProducer(STORE_CONN_ID, "late", 0.05))
        await wait_for_feed(store, "late")
        with store.engine.connect() as slow:
            first = slow.begin()
            ingest.ingest_many(slow, [WebhookBatch(inbound=[tap(1)])], 0.0)  # holds the order lock
            second = threading.Thread(target=file, args=(store, tap(2)))
            second.start()
            second.join(0.5)
            assert second.is_alive(), "the second receiver did not wait for the first one's commit"
            first.commit()
        second.join(10)
        await collector.until(2)
        with store.engine.connect() as old_receiver:  # no lock: takes an id, commits after a higher one
            late = old_receiver.begin()
            row = {"inbound_key": "old-1", "sender": SENDER, "received_at": 0.0, "raw": "{}", "kind": "text"}
            old_receiver.execute(insert(schema.inbound_messages).values(row))
            file(store, tap(3))
            await collector.until(3)  # the higher id fired...
            late.commit()
        got = await collector.until(4)  # ...and the lower one once it committed
        await asyncio.sleep(0.3)  # nothing fires twice
        await collector.stop()
        return list(got)

    fired = asyncio.run(scenario())
    ids = store_ids(store)
    assert fired == [ids[0], ids[1], ids[3], ids[2]], (fired, ids)


def test_a_kind_the_receiver_does_not_read_may_be_filtered_on():
    assert WhatsAppReplyTrigger(kinds=["reaction"]).filter.kinds == ("reaction",)


def test_store_reads_run_off_the_event_loop_and_failures_are_ridden_out_naming_the_cause(store, monkeypatch, capfd):
    """The triggerer's loop is shared by every trigger: a store call never runs on it. A store that
    fails (a database restart) is read again, and the log says why in the provider's own words."""
    import threading

    from airflow_provider_pepipost.errors import StatusStoreUnavailable

    real = StatusStore.replies_after
    threads: list[str] = []
    failures = iter([StatusStoreUnavailable("the status store could not be opened: connection refused"), None])

    def replies_after(self, after_id, limit=500):
        try:
            asyncio.get_running_loop()
            threads.append(f"the event loop, in {threading.current_thread().name}")
        except RuntimeError:
            threads.append(threading.current_thread().name)
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return real(self, after_id, limit)

    monkeypatch.setattr(StatusStore, "replies_after", replies_after)
    monkeypatch.setattr(replies_module, "MAX_BACKOFF", 0.1)
    trigger = WhatsAppReplyTrigger(kinds=["button"], poll_interval=0.05, status_store_conn_id=STORE_CONN_ID)

    async def scenario() -> list[int]:
        watcher = Watcher(trigger)
        await wait_for_feed(store, trigger.own_cursor())
        file(store, tap(1))
        fired = await watcher.until(1)
        await watcher.stop()
        return fired

    assert asyncio.run(scenario()) == store_ids(store)
    assert threads and all(name.startswith("pepipost-replies") for name in threads), set(threads)
    logged = "".join(capfd.readouterr())
    assert "reading the store failed (1 in a row): the status store could not be opened: connection refused" in logged
