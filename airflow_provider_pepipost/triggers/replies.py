"""Customer replies and button taps as Airflow events: ``WhatsAppReplyTrigger`` for ``AssetWatcher``,
and ``WhatsAppReplySensorTrigger``, the deferrable ``WhatsAppReplySensor``'s wait.

How a reply fires once. The status store keeps a cursor per feed: the last customer message
whose events Airflow has stored. A new feed starts after the newest message, so an old reply
never fires. A watcher has a feed of its own, unless it names a ``stream`` that others share.

- Airflow 3.3 and later: a feed is a shared stream in ack mode (one poll for every watcher of a
  ``stream`` in one triggerer). The cursor moves only past messages whose events every watcher
  had confirmed stored in Airflow's database; a triggerer stopped in between gets them again when
  it starts (at least once: ``ClaimWhatsAppRepliesOperator`` makes the handling once).
- Airflow 3.1 and 3.2 (no shared streams): each watcher polls on its own and moves its cursor
  ``SETTLE_SECONDS`` after an event fired (Airflow stores it within a second or two).

Either way the feed reads by id through a ``FeedWindow``: a message that commits after a later one
still fires, and the cursor never passes an id that may yet commit.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow.triggers.base import BaseEventTrigger, BaseTrigger, TriggerEvent

from airflow_provider_pepipost.errors import PepipostConfigError, StatusStoreUnavailable
from airflow_provider_pepipost.reply_filters import ReplyFilter, ReplyTally, reply_event, tally
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.replies import Reply
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.store import StatusStore, open_store
from airflow_provider_pepipost.triggers.feed_window import FeedWindow
from airflow_provider_pepipost.version_compat import HAS_SHARED_STREAMS

if HAS_SHARED_STREAMS:  # Airflow 3.3+
    from airflow.triggers.shared_stream import AdvanceItem, SharedStreamProducer
else:  # pragma: no cover - Airflow 3.1 and 3.2
    SharedStreamProducer = object  # type: ignore[assignment,misc]
    AdvanceItem = Any  # type: ignore[assignment,misc]

OWN_FEED = "watcher"  # the first part of the name of a watcher's own feed
FEED_BATCH = 500  # customer messages read per store query
# Without shared streams: how long after an event fired its cursor moves past it.
SETTLE_SECONDS = 15.0
# The longest wait between two tries to read a store that fails (a database restart).
MAX_BACKOFF = 60.0

_STORE_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pepipost-replies")


def _why(err: Exception) -> str:
    """What a store failure says in the log: the provider's own errors in full (they name the
    connection to fix and hold no secret), others by type (a driver's text may hold bound values)."""
    if isinstance(err, (StatusStoreUnavailable, PepipostConfigError)):
        return str(err)
    return type(err).__name__


async def _in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """Store calls block: run them off the triggerer's shared event loop."""
    return await asyncio.get_running_loop().run_in_executor(_STORE_THREADS, functools.partial(function, *args))


class WhatsAppReplyTrigger(BaseEventTrigger):
    """Fires once for each new customer message that matches the filters, for ``AssetWatcher``.

    .. code-block:: python

        taps = Asset(
            "pepipost_slot_taps",
            watchers=[AssetWatcher("yes_taps", WhatsAppReplyTrigger(button_payloads=["YES_BOOK"]))],
        )

    The event's payload (``context["triggering_asset_events"][asset][i].extra["payload"]``) is
    small and holds no whole number and no free text: ``inbound_id``, ``kind``,
    ``button_payload``, ``keyword``, ``received_at``, ``from_masked`` and ``in_reply_to``
    (``message_id``, ``dag_id``, ``run_id``, ``task_id``, ``map_index``, ``row`` of the send it
    answers) or None. ``StatusStore.reply(inbound_id)`` reads the rest.

    :param kinds: message kinds that count (``text``, ``button``, ``image``, ``location``...).
    :param button_payloads: button payloads that count (as the template was approved with them).
    :param keywords: words that count, compared as stop words are (case, spaces, punctuation).
    :param dag_id: only replies to messages this DAG sent.
    :param task_id: only replies to messages this task sent.
    :param status_store_conn_id: the store's Airflow connection; None: the resolver's default.
    :param poll_interval: seconds between two reads of the store when it had nothing new.
    :param stream: a feed shared with other watchers of the same store that name it: one poll and
        one cursor for all of them (Airflow 3.3+), which suits one triggerer. Default: a feed of its
        own (named by its filters), which is what several triggerers need: a watcher on one of them
        then never moves the cursor past what a watcher on another has not stored.
    """

    def __init__(
        self,
        kinds: Sequence[str] | None = None,
        button_payloads: Sequence[str] | None = None,
        keywords: Sequence[str] | None = None,
        dag_id: str | None = None,
        task_id: str | None = None,
        status_store_conn_id: str | None = None,
        poll_interval: float = 5.0,
        stream: str | None = None,
    ) -> None:
        super().__init__()
        self.filter = ReplyFilter.build(kinds, button_payloads, keywords, dag_id, task_id)
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be above 0 seconds, not {poll_interval!r}")
        if stream is not None and (not isinstance(stream, str) or not stream.strip() or set(stream) & set("/:")):
            raise ValueError(
                f"stream: {stream!r} is not a feed name (no '/' or ':'); leave it unset for a feed of its own"
            )
        self.status_store_conn_id = status_store_conn_id
        self.poll_interval = poll_interval
        self.stream = stream

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                **self.filter.to_kwargs(),
                "status_store_conn_id": self.status_store_conn_id,
                "poll_interval": self.poll_interval,
                "stream": self.stream,
            },
        )

    def __repr__(self) -> str:
        where = store_source(self.status_store_conn_id)
        return f"<{type(self).__qualname__} feed '{self.feed_name()}' {self.filter} in {where}>"

    # -- Airflow 3.3+: one shared poll per store and stream, in ack mode ------------------------

    def shared_stream_key(self) -> Hashable | None:
        if not HAS_SHARED_STREAMS:
            return None
        return ("pepipost-replies", self.status_store_conn_id, self.feed_name())

    @classmethod
    def create_shared_stream_producer(cls, kwargs: dict[str, Any]) -> SharedStreamProducer:
        trigger = cls(**kwargs)
        return ReplyFeedProducer(trigger.status_store_conn_id, trigger.feed_name(), trigger.poll_interval)

    async def filter_shared_stream(self, shared_stream: AsyncIterator[Any]) -> AsyncIterator[TriggerEvent]:
        async for reply in shared_stream:
            matched, keyword = self.filter.match(reply)
            if matched:
                yield TriggerEvent(reply_event(reply, keyword))

    # -- Airflow 3.1 and 3.2: a poll of its own -------------------------------------------------

    def feed_name(self) -> str:
        """This watcher's cursor in the store: its ``stream``'s (shared streams), else its own."""
        return self.stream if self.stream and HAS_SHARED_STREAMS else self.own_cursor()

    def own_cursor(self) -> str:
        """A cursor of this watcher's own: its stream (or ``watcher``) and a hash of its filters."""
        filters = json.dumps(self.filter.to_kwargs(), sort_keys=True)
        return f"{self.stream or OWN_FEED}/{hashlib.sha256(filters.encode()).hexdigest()[:16]}"

    async def run(self) -> AsyncIterator[TriggerEvent]:
        feed = ReplyFeed(
            self.status_store_conn_id, self.own_cursor(), self.poll_interval, self.log, settle_after=SETTLE_SECONDS
        )
        async for reply in feed.replies():
            matched, keyword = self.filter.match(reply)
            if matched:
                yield TriggerEvent(reply_event(reply, keyword))


class ReplyFeed:
    """The store's customer messages after a cursor, read as a stream that never ends.

    Which ids were read and which are done is a ``FeedWindow``: a message that commits after a
    later one (PostgreSQL) is still delivered, and the store's cursor moves only over ids that are
    done. Done means: confirmed by Airflow (``finish``, ack mode), or, with ``settle_after``,
    delivered that many seconds ago. Store errors (a database restart) are logged and retried
    with a growing wait, never raised: a watcher outlives its database's restarts.
    """

    def __init__(
        self, conn_id: str | None, name: str, poll_interval: float, log: Any, settle_after: float | None = None
    ) -> None:
        self.conn_id = conn_id
        self.name = name
        self.poll_interval = poll_interval
        self.log = log
        self.settle_after = settle_after
        self.window: FeedWindow | None = None
        self._delivered: list[tuple[float, int]] = []  # (when, id), waiting for settle_after
        self._persisted = 0
        self._store: StatusStore | None = None

    async def call(self, what: str, action: Callable[[StatusStore], Any]) -> Any:
        """``action(store)`` in a thread, tried again (with a growing wait) until it works."""
        failures = 0
        while True:
            try:
                if self._store is None:
                    self._store = await _in_thread(open_store, self.conn_id)
                return await _in_thread(action, self._store)
            except Exception as err:
                failures += 1
                wait = min(self.poll_interval * 2**failures, MAX_BACKOFF)
                self.log.warning(
                    "Reply feed '%s': %s failed (%d in a row): %s; trying again in %.1f s",
                    self.name, what, failures, _why(err), wait,
                )  # fmt: skip
                await asyncio.sleep(wait)

    async def replies(self) -> AsyncIterator[Reply]:
        start = await self.call("opening its cursor", lambda store: store.open_reply_cursor(self.name))
        self.log.info("Reply feed '%s' starts after customer message %d", self.name, start)
        window = self.window = FeedWindow(start)
        self._persisted = start
        while True:
            read = functools.partial(StatusStore.replies_after, after_id=window.read_floor, limit=FEED_BATCH)
            found: list[Reply] = await self.call("reading the store", read)
            fresh = set(window.take([reply.inbound_id for reply in found], time.monotonic()))
            for reply in found:
                if reply.inbound_id in fresh:
                    if self.settle_after is not None:
                        self._delivered.append((time.monotonic(), reply.inbound_id))
                    yield reply
            await self._settle()
            if len(found) < FEED_BATCH or not fresh:
                await asyncio.sleep(self.poll_interval)

    async def _settle(self) -> None:
        """With ``settle_after``: ids delivered that long ago are done. Gaps may expire too."""
        now = time.monotonic()
        settled = []
        if self.settle_after is not None:  # in ack mode Airflow says what is done (finish)
            settled = [inbound_id for when, inbound_id in self._delivered if now - when >= self.settle_after]
            self._delivered = [(when, i) for when, i in self._delivered if now - when < self.settle_after]
        await self.finish(settled)

    async def finish(self, inbound_ids: Sequence[int]) -> None:
        """These ids' events are stored: move the store's cursor as far as every id below is done."""
        if self.window is None:
            return
        floor = self.window.finish(inbound_ids, time.monotonic())
        if floor > self._persisted:
            await self.call("moving its cursor", lambda store: store.advance_reply_cursor(self.name, floor))
            self._persisted = floor


class ReplyFeedProducer(SharedStreamProducer):
    """The shared poll of one store and stream (ack mode): the cursor moves once Airflow stored the events."""

    def __init__(self, conn_id: str | None, stream: str, poll_interval: float) -> None:
        from airflow.utils.log.logging_mixin import LoggingMixin

        self.stream = stream
        self.poll_interval = poll_interval
        self.log = LoggingMixin().log
        self.feed = ReplyFeed(conn_id, stream, poll_interval, self.log)

    async def open_stream(self) -> AsyncIterator[tuple[Any, Any]]:
        # The watchers of a restarted triggerer subscribe one after another: one interval lets them
        # all join before the first message is broadcast (a late joiner misses what came before).
        await asyncio.sleep(self.poll_interval)
        async for reply in self.feed.replies():
            yield reply, reply.inbound_id

    async def advance(self, batch: Sequence[AdvanceItem]) -> None:
        done: list[int] = []
        for item in batch:
            outcome = item.outcome
            if outcome.failed or not (outcome.acked or outcome.rejected):
                await self.feed.finish(done)
                # Raising ends the group; its watchers start again from the cursor, and get this message again.
                raise RuntimeError(
                    f"reply feed '{self.stream}': customer message {item.broker_payload} was not confirmed by every "
                    f"watcher ({outcome}); it will be delivered again"
                )
            done.append(item.broker_payload)
        await self.feed.finish(done)


def replies_to_targets(store: StatusStore, targets: Sequence[str | TaskKey]) -> tuple[list[Reply], int]:
    """The replies to these messages (ids, or send task instances as a whole), and how many messages."""
    message_ids: list[str] = []
    for target in targets:
        message_ids.extend(store.ledger_message_ids(target) if isinstance(target, TaskKey) else [target])
    unique = list(dict.fromkeys(message_ids))
    return store.replies_to(unique), len(unique)


def count_replies(
    store: StatusStore, targets: Sequence[str | TaskKey], needed: int, reply_filter: ReplyFilter
) -> ReplyTally:
    """The reply sensor's reading: how many recipients of these messages replied as the filter asks."""
    found, recipients = replies_to_targets(store, targets)
    return tally(found, recipients, needed, reply_filter)


class WhatsAppReplySensorTrigger(BaseTrigger):
    """The deferrable ``WhatsAppReplySensor``'s wait: fires once enough recipients replied, or at the deadline.

    :param message_ids: message ids waited on.
    :param ledger_tasks: send task instances whose sent messages are waited on as a whole.
    :param needed: recipients whose matching reply ends the wait.
    :param deadline: epoch seconds after which it fires a timeout event.
    Filters: as ``WhatsAppReplyTrigger``'s.
    """

    def __init__(
        self,
        message_ids: list[str],
        needed: int,
        ledger_tasks: list[dict[str, Any]] | None = None,
        kinds: Sequence[str] | None = None,
        button_payloads: Sequence[str] | None = None,
        keywords: Sequence[str] | None = None,
        status_store_conn_id: str | None = None,
        poll_interval: float = 30.0,
        deadline: float | None = None,
    ) -> None:
        super().__init__()
        self.message_ids = message_ids
        self.ledger_tasks = ledger_tasks or []
        self.needed = needed
        self.filter = ReplyFilter.build(kinds, button_payloads, keywords)
        self.status_store_conn_id = status_store_conn_id
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        filters = self.filter.to_kwargs()
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "message_ids": self.message_ids,
                "needed": self.needed,
                "ledger_tasks": self.ledger_tasks,
                "kinds": filters["kinds"],
                "button_payloads": filters["button_payloads"],
                "keywords": filters["keywords"],
                "status_store_conn_id": self.status_store_conn_id,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    def __repr__(self) -> str:
        return (
            f"<{type(self).__qualname__} {len(self.message_ids)} id(s), {len(self.ledger_tasks)} task(s), "
            f"{self.needed} replier(s) needed>"
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        targets: list[str | TaskKey] = [*self.message_ids, *(TaskKey(**fields) for fields in self.ledger_tasks)]
        feed = ReplyFeed(self.status_store_conn_id, "sensor", self.poll_interval, self.log)
        # The sensor read the store just before it deferred.
        await asyncio.sleep(self.poll_interval)
        while True:
            counted: ReplyTally = await feed.call(
                "counting replies", lambda store: count_replies(store, targets, self.needed, self.filter)
            )
            if counted.done:
                yield TriggerEvent({"status": "success", "tally": counted.to_dict()})
                return
            if self.deadline is not None and time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "tally": counted.to_dict()})
                return
            self.log.info("%d of %d recipients replied as asked; %d needed", counted.repliers, counted.recipients,
                          counted.needed)  # fmt: skip
            await asyncio.sleep(self.poll_interval)
