"""The group commit: a body the store refuses never fails the other bodies of its commit, on SQLite and PostgreSQL.

The poison here bypasses the parser's checks on purpose (it is built as the store would get it), so
that what is tested is the retry body by body, the last line of defence behind ``limits``.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import pytest

from airflow_provider_pepipost.errors import StatusStoreUnavailable
from airflow_provider_pepipost.status.inbound import WebhookBatch
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.model import DeliveryEvent
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook import batching
from airflow_provider_pepipost.webhook.batching import MAX_BATCHES_PER_COMMIT, IngestQueue, QueueFull
from airflow_provider_pepipost.webhook.payload import letter
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


def ingest_together_on(queue: IngestQueue, bodies: int, seconds: float = 5.0) -> list:
    """``bodies`` one-event bodies queued at once on ``queue``; each one's result or exception."""

    async def run() -> list:
        ingests = (queue.ingest(WebhookBatch([event(f"t{n}")])) for n in range(bodies))
        return await asyncio.wait_for(asyncio.gather(*ingests, return_exceptions=True), seconds)

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


# -- issue 26: the writer lingers for stragglers under load, within its bound -----------------


class TimedStore:
    """A stand-in store whose commit takes ``seconds``: records each commit's size and thread."""

    is_sqlite = True  # one writer

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.commits: list[int] = []
        self.threads: set[str] = set()
        self.running = self.most_at_once = 0

    def ingest_many(self, batches: list) -> list[IngestResult]:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        self.commits.append(len(batches))
        self.running -= 1
        return [IngestResult(accepted=len(batch.events)) for batch in batches]


def bodies_per_commit(linger: float, clients: int = 8, rounds: int = 10) -> tuple[float, TimedStore]:
    """Clients that post again a little after each answer, each a step later than the one before (as
    HTTP clients do, answers and new requests trickling in), against commits of 20 ms."""
    store = TimedStore(0.02)
    queue = IngestQueue(lambda: store, linger=linger)  # type: ignore[arg-type,return-value]

    async def client(number: int) -> None:
        for _ in range(rounds):
            await asyncio.sleep(number * 0.002)
            await queue.ingest(WebhookBatch([event(f"c{number}")]))

    async def run() -> None:
        await asyncio.gather(*(client(n) for n in range(clients)))

    asyncio.run(run())
    assert sum(store.commits) == clients * rounds
    return sum(store.commits) / len(store.commits), store


def test_lingering_coalesces_more_bodies_per_commit():
    at_once, _ = bodies_per_commit(linger=0.0)
    lingering, store = bodies_per_commit(linger=0.015)
    assert lingering >= 1.5 * at_once, (at_once, lingering)
    # Every commit on the queue's own thread, one at a time.
    assert store.threads == {"pepipost-commit"} and store.most_at_once == 1


def lone_latency(queue: IngestQueue) -> float:
    async def run() -> float:
        started = time.perf_counter()
        await queue.ingest(WebhookBatch([event("lone")]))
        return time.perf_counter() - started

    return asyncio.run(run())


def after_a_burst(queue: IngestQueue, bodies: int = 4) -> None:
    async def run() -> None:
        await asyncio.gather(*(queue.ingest(WebhookBatch([event(f"b{n}")])) for n in range(bodies)))

    asyncio.run(run())
    assert queue.last_commit_bodies >= 2  # the last commit had company: the next one may linger


@pytest.mark.parametrize(
    ("linger", "commit"),
    [(0.05, 0.2), (0.5, 0.05)],
    ids=["bounded-by-the-linger", "bounded-by-the-last-commit"],
)
def test_a_lone_request_waits_at_most_min_of_linger_and_last_commit(linger, commit):
    store = TimedStore(commit)
    queue = IngestQueue(lambda: store, linger=linger)  # type: ignore[arg-type,return-value]
    assert lone_latency(queue) < commit + 0.03  # no company yet: no lingering at all
    after_a_burst(queue)
    waited = lone_latency(queue) - commit
    assert waited < min(linger, commit) + 0.03, waited


def test_a_lone_request_long_after_the_last_burst_does_not_linger(monkeypatch):
    store = TimedStore(0.05)
    queue = IngestQueue(lambda: store, linger=0.05)  # type: ignore[arg-type,return-value]
    after_a_burst(queue)
    monkeypatch.setattr(batching, "COMPANY_FORGOTTEN_AFTER", 0.0)
    assert lone_latency(queue) < 0.05 + 0.03


def test_a_full_commit_waiting_ends_the_linger():
    store = TimedStore(0.0)
    queue = IngestQueue(lambda: store, linger=10.0)  # type: ignore[arg-type,return-value]
    queue.last_commit_bodies, queue.last_commit_seconds, queue.last_commit_ended = 2, 10.0, time.perf_counter()

    async def run() -> float:
        started = time.perf_counter()
        await asyncio.gather(*(queue.ingest(WebhookBatch([event(f"f{n}")])) for n in range(MAX_BATCHES_PER_COMMIT)))
        return time.perf_counter() - started

    assert asyncio.run(run()) < 1.0
    assert store.commits == [MAX_BATCHES_PER_COMMIT]


# -- the writer's own thread: commits back to back, whatever the event loop is doing ------------


class StampedStore(TimedStore):
    """A TimedStore that notes when each commit started (time.perf_counter)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.started: list[float] = []

    def ingest_many(self, batches: list) -> list[IngestResult]:
        self.started.append(time.perf_counter())
        return super().ingest_many(batches)


def test_the_next_commit_starts_while_the_event_loop_is_busy():
    """Bodies queued during a commit go into the next one the moment it ends, not when the event
    loop next gets round to it: here the loop is held for 0.3 s right after queueing the second."""
    store = StampedStore(0.05)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]

    async def run() -> float:
        first = asyncio.ensure_future(queue.ingest(WebhookBatch([event("first")])))
        while not store.started:  # the first commit is under way
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(queue.ingest(WebhookBatch([event("second")])))
        await asyncio.sleep(0)  # the second body is queued and handed over
        await asyncio.sleep(0)
        time.sleep(0.3)  # the event loop is held, as by a burst of requests to parse
        released = time.perf_counter()
        await asyncio.gather(first, second)
        return released

    released = asyncio.run(run())
    assert store.commits == [1, 1]
    assert store.started[1] < released - 0.2, "the second commit waited for the event loop"


def test_a_writer_that_fails_unexpectedly_answers_every_body_and_goes_on():
    """A bug in the writer (here the store answers for the wrong number of bodies) fails the
    bodies of that commit, which are not acknowledged, and the next body is still stored."""

    class Miscounting(TimedStore):
        def ingest_many(self, batches: list) -> list[IngestResult]:
            results = super().ingest_many(batches)
            return [*results, IngestResult()] if len(self.commits) == 1 else results

    store = Miscounting(0.0)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]

    async def run() -> list:
        return await asyncio.gather(*(queue.ingest(WebhookBatch([event(f"m{n}")])) for n in range(2)),
                                    return_exceptions=True)  # fmt: skip

    first = asyncio.run(run())
    assert all(isinstance(result, Exception) for result in first), first
    second = asyncio.run(run())
    assert [result.accepted for result in second] == [1, 1]


# -- PostgreSQL: two commits at once, never a deadlock ------------------------------------------


class ConcurrentStore(TimedStore):
    """A stand-in for a store that takes several writers (PostgreSQL's ``is_sqlite`` is False)."""

    is_sqlite = False


@pytest.mark.parametrize(("stand_in", "most_at_once"), [(ConcurrentStore, 2), (TimedStore, 1)])
def test_commits_run_two_at_once_on_postgres_and_one_at_a_time_on_sqlite(stand_in, most_at_once):
    store = stand_in(0.02)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]

    async def run() -> None:
        await queue.ingest(WebhookBatch([event("first")]))  # the store is open: the writers it takes start

        async def client(number: int) -> None:
            for round_ in range(5):
                await asyncio.sleep(number * 0.003)  # arriving while a commit is under way
                await queue.ingest(WebhookBatch([event(f"c{number}-{round_}")]))

        await asyncio.gather(*(client(n) for n in range(8)))

    asyncio.run(run())
    assert sum(store.commits) == 1 + 8 * 5
    assert store.most_at_once == most_at_once


def test_two_commits_at_once_holding_the_same_messages_in_any_order_never_deadlock(postgres_url):
    """Bodies that report the same 200 messages, each in its own shuffled order, committed by two
    writers at once: every body is stored, none fails on a deadlock (rows go in key order; in
    arrival order, this failed on PostgreSQL's deadlock detection in two runs of three)."""
    store = StatusStore(postgres_url)
    shuffle = random.Random(26)
    batches = []
    for body in range(120):
        ids = [f"dl{n}" for n in range(200)]
        shuffle.shuffle(ids)
        status = ("sent", "delivered", "read")[body % 3]
        batches.append(WebhookBatch([DeliveryEvent(m, status, status, 1_700_000_000.0 + body, raw="{}") for m in ids]))
    queue = IngestQueue(lambda: store)

    async def run() -> list:
        await queue.ingest(WebhookBatch([event("opening")]))  # the second writer starts after a commit

        async def client(start: int) -> list:
            answers = []
            for batch in batches[start::6]:
                await asyncio.sleep(start * 0.001)  # arriving while a commit is under way
                answers.append(await queue.ingest(batch))
            return answers

        return [r for part in await asyncio.gather(*(client(n) for n in range(6))) for r in part]

    results = asyncio.run(run())
    assert len(queue._writers) == 2
    assert sum(r.accepted for r in results) == 120 * 200
    assert {mid: current_status(store, mid) for mid in ("dl0", "dl199")} == {"dl0": "read", "dl199": "read"}


# -- the writers' lives: never a request left waiting, never the event loop held -------------------


def test_two_commits_holding_the_same_dead_letters_in_either_order_never_deadlock(postgres_url):
    """The same two bodies of dead letters (a resend), committed at once in opposite orders."""
    store = StatusStore(postgres_url)
    failures: list[Exception] = []
    for round_ in range(3):
        x = WebhookBatch(dead_letters=[letter("bad", "{}", f"X{round_}", f"events[{i}]") for i in range(300)])
        y = WebhookBatch(dead_letters=[letter("bad", "{}", f"Y{round_}", f"events[{i}]") for i in range(300)])
        barrier = threading.Barrier(2)

        def commit(batches: list, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                store.ingest_many(batches)
            except Exception as err:
                failures.append(err)

        threads = [threading.Thread(target=commit, args=(order,)) for order in ([x, y], [y, x])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not failures, failures


class Interrupt(BaseException):
    """What a library may raise that is not an Exception (gevent's GreenletExit, SystemExit)."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer ends with it
def test_a_writer_ended_by_a_base_exception_answers_its_bodies_and_another_takes_over():
    class Interrupted(TimedStore):
        def ingest_many(self, batches: list) -> list[IngestResult]:
            if not self.commits:
                self.commits.append(0)
                self.threads.add(threading.current_thread())
                raise Interrupt
            return super().ingest_many(batches)

    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]
    store = Interrupted(0.0)
    (first,) = ingest_together_on(queue, 1)
    (interrupted,) = store.threads
    interrupted.join(5)  # it ends with the exception (reported here, not in a later test)
    (second,) = ingest_together_on(queue, 1)
    assert isinstance(first, RuntimeError) and "interrupted" in str(first), first
    assert isinstance(second, IngestResult) and second.accepted == 1, second


def test_no_thread_to_be_had_is_a_503_and_the_next_body_starts_a_writer(monkeypatch):
    store = TimedStore(0.0)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]
    real_start, refused = threading.Thread.start, []

    def start_once_refused(thread: threading.Thread) -> None:
        if thread.name.startswith("pepipost-commit") and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_once_refused)
    (first,), (second,) = ingest_together_on(queue, 1), ingest_together_on(queue, 1)
    assert isinstance(first, RuntimeError) and "can't start new thread" in str(first), first
    assert isinstance(second, IngestResult) and second.accepted == 1, second


def test_the_event_loop_never_waits_while_a_writer_opens_the_store():
    """A store whose first open is refused and whose second takes 1.5 s (a server that does not
    answer): the next body's hand-over, on the event loop, is not held meanwhile."""
    opened: list[float] = []

    def opening() -> StatusStore:
        opened.append(time.perf_counter())
        if len(opened) == 2:
            time.sleep(1.5)
        raise StatusStoreUnavailable("the store is down")

    queue = IngestQueue(opening)

    async def run() -> float:
        with pytest.raises(StatusStoreUnavailable):
            await queue.ingest(WebhookBatch([event("a")]))
        second = asyncio.ensure_future(queue.ingest(WebhookBatch([event("b")])))
        while len(opened) < 2:  # the writer is opening the store again, for the second body
            await asyncio.sleep(0.01)
        third = asyncio.ensure_future(queue.ingest(WebhookBatch([event("c")])))
        started = time.perf_counter()
        await asyncio.sleep(0)  # the third body's hand-over runs
        await asyncio.sleep(0)
        held = time.perf_counter() - started
        await asyncio.gather(second, third, return_exceptions=True)
        return held

    assert asyncio.run(run()) < 0.5


def test_a_lingering_writer_never_commits_nothing():
    """With two writers and a linger, one may wake to find the other took everything: it waits on
    rather than commit an empty transaction."""
    store = ConcurrentStore(0.01)
    queue = IngestQueue(lambda: store, linger=0.05)  # type: ignore[arg-type,return-value]

    async def run() -> None:
        await queue.ingest(WebhookBatch([event("first")]))

        async def client(number: int) -> None:
            for round_ in range(10):
                await asyncio.sleep(number * 0.002)
                await queue.ingest(WebhookBatch([event(f"l{number}-{round_}")]))

        await asyncio.gather(*(client(n) for n in range(8)))

    asyncio.run(run())
    assert sum(store.commits) == 1 + 8 * 10
    assert 0 not in store.commits


def test_an_exception_a_future_refuses_still_answers_every_body():
    """asyncio will not raise a StopIteration into a future: the bodies get an error all the same."""

    class Exhausted(TimedStore):
        def ingest_many(self, batches: list) -> list[IngestResult]:
            return next(iter([]))

    queue = IngestQueue(lambda: Exhausted(0.0))  # type: ignore[arg-type,return-value]
    answers = ingest_together_on(queue, 3)
    assert all(isinstance(answer, RuntimeError) and "StopIteration" in str(answer) for answer in answers), answers


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer ends with it
def test_a_writer_that_ends_with_no_replacement_to_be_had_answers_what_waits(monkeypatch):
    """The one writer is interrupted while a second body waits, and no thread can be started to take
    over: the waiting body gets its 503 at once, not when some later body comes."""
    interrupted = threading.Event()

    class Interrupted(TimedStore):
        def ingest_many(self, batches: list) -> list[IngestResult]:
            if not self.commits:
                self.commits.append(0)
                interrupted.wait(5)
                raise Interrupt
            return super().ingest_many(batches)

    store = Interrupted(0.0)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]
    real_start, started = threading.Thread.start, []

    def start_once(thread: threading.Thread) -> None:
        if thread.name.startswith("pepipost-commit"):
            started.append(thread)
            if len(started) > 1:
                raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_once)

    async def run() -> tuple:
        first = asyncio.ensure_future(queue.ingest(WebhookBatch([event("a")])))
        while not store.commits:  # the first commit is under way
            await asyncio.sleep(0.01)
        second = asyncio.ensure_future(queue.ingest(WebhookBatch([event("b")])))
        await asyncio.sleep(0.05)  # handed over, waiting behind the first commit
        interrupted.set()
        return tuple(await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True), 5))

    first, second = asyncio.run(run())
    started[0].join(5)
    assert isinstance(first, RuntimeError) and "interrupted" in str(first), first
    assert isinstance(second, RuntimeError) and "can't start new thread" in str(second), second


def test_a_burst_of_more_than_one_commit_is_taken_by_both_writers():
    """128 bodies in one turn of the event loop: two commits of 64, at once on two writers."""
    store = ConcurrentStore(0.2)
    queue = IngestQueue(lambda: store)  # type: ignore[arg-type,return-value]
    assert [r.accepted for r in ingest_together_on(queue, 1)] == [1]  # the store is open: two writers
    assert len(ingest_together_on(queue, 2 * MAX_BATCHES_PER_COMMIT)) == 2 * MAX_BATCHES_PER_COMMIT
    assert store.commits[1:] == [MAX_BATCHES_PER_COMMIT] * 2 and store.most_at_once == 2
