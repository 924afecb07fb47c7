"""Group commit for the receiver: the batches of concurrent requests stored in one transaction.

Every request still waits for the commit that holds its events before it answers, so nothing is
acknowledged unstored; what changes is that one commit serves every request waiting at that moment.
Two bounds keep one client from costing the others: the queue holds a limited number of bodies
(beyond it a request is told to come back later), and a commit that fails because of what one body
holds is retried body by body, so that no request fails because of another's items.

Under load, a commit that starts the moment the previous one ends holds only the bodies that
arrived during it, and pays a whole commit for them. With ``linger`` set, when the previous commit
carried more than one body the writer first waits for stragglers: at most ``linger`` seconds, at
most as long as that commit took, and no longer once a full commit's worth is waiting. A lone
request never waits for company it has not had. That trades latency for CPU: it pays when the
CPU is what bounds the receiver, and costs throughput when the wait for the commit is (off by
default). Commits run back to back on threads of the queue's own: a writer takes what is waiting
the moment its commit ends, without waiting for a turn of the event loop, which under load is as
long as a commit (the receiver's events a second went up by 30 %). SQLite has one writer; on
PostgreSQL, where a commit mostly waits for the server, ``POSTGRES_WRITERS`` commit at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

from sqlalchemy import exc as sa_exc

from airflow_provider_pepipost.errors import StatusStoreUnavailable
from airflow_provider_pepipost.status.inbound import DeadLetter, WebhookBatch
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.logs import describe_error
from airflow_provider_pepipost.webhook.payload import letter
from airflow_provider_pepipost.webhook.settings import (
    DEFAULT_COMMIT_LINGER,
    DEFAULT_MAX_QUEUED_BODIES,
    DEFAULT_MAX_QUEUED_BYTES,
)

MAX_BATCHES_PER_COMMIT = 64
# Commits at once on PostgreSQL: each on a connection of its own, in its own transaction. Their rows
# are written in key order (status.ingest), so two of them never wait on each other in a cycle.
POSTGRES_WRITERS = 2
# A commit that ended longer ago than this had company no longer: the next one does not linger.
COMPANY_FORGOTTEN_AFTER = 1.0


class QueueFull(Exception):
    """Too much is waiting to be stored: the request should be sent again later (503, Retry-After)."""


def is_transient(err: BaseException) -> bool:
    """True when the store itself failed (down, locked, pool exhausted), not something a body holds.

    Such a failure fails every request of the commit alike; retrying body by body would only wait
    on the same lock or the same dead server once per body.
    """
    if isinstance(err, StatusStoreUnavailable) or (isinstance(err, sa_exc.DBAPIError) and err.connection_invalidated):
        return True
    return isinstance(err, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError))


class IngestQueue:
    """Queues parsed webhook bodies; the queue's own thread writes everything queued, commit after commit."""

    def __init__(
        self,
        store: Callable[[], StatusStore],
        *,
        max_bodies: int = DEFAULT_MAX_QUEUED_BODIES,
        max_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        linger: float = DEFAULT_COMMIT_LINGER,
    ) -> None:
        self._store = store
        # Bodies queued in this turn of an event loop, handed to the writer together at its end:
        # bodies that arrive together share a commit (by loop: a test may run several in turn).
        self._arriving: dict[asyncio.AbstractEventLoop, list[_Waiting]] = {}
        self._waiting: list[_Waiting] = []  # handed over, not yet taken by the writer: under _lock
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # notified when bodies are handed over
        self._writers: list[threading.Thread] = []  # the threads committing: under _lock
        self.writers_wanted = 1
        self.max_bodies, self.max_bytes = max_bodies, max_bytes
        self.linger = max(0.0, linger)
        self.held_bodies = self.held_bytes = 0
        # The last commit: how many bodies it carried, how long it took (what lingering is bounded by)
        # and when it ended (time.perf_counter).
        self.last_commit_bodies, self.last_commit_seconds, self.last_commit_ended = 0, 0.0, 0.0

    def full(self) -> bool:
        return self.held_bodies >= self.max_bodies or self.held_bytes >= self.max_bytes

    def admit(self, size: int) -> Admission:
        """Room for one body (``size`` bytes) from its parse to its answer: ``with queue.admit(size):``,
        QueueFull when there is none. A body alone is always admitted, however large: the body cap
        bounds it."""
        return Admission(self, size)

    async def ingest(self, batch: WebhookBatch) -> IngestResult:
        """Store one body; returns its counts once the transaction holding it has committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[IngestResult] = loop.create_future()
        arriving = self._arriving.get(loop)
        if arriving is None:
            arriving = self._arriving[loop] = []
            loop.call_soon(self._hand_over, loop)
        arriving.append((batch, future, loop))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        """The bodies of this turn of ``loop``, to the writers (the first started on the first body)."""
        arrived = self._arriving.pop(loop, [])
        with self._work:
            self._waiting += arrived
            self._work.notify()
            failed, reason = self._a_writer_for_what_waits()
        if reason is not None:
            _answer(failed, [reason] * len(failed))

    def _a_writer_for_what_waits(self) -> tuple[list[_Waiting], Exception | None]:
        """Under the lock: a writer started if bodies wait and none runs. With no thread to be had,
        the bodies waiting and why, for the caller to answer (503) once it has let the lock go; the
        next body tries again."""
        if not self._waiting or self._writers:
            return [], None
        try:
            self._start_writer()
        except Exception as err:
            failed, self._waiting = self._waiting, []
            return failed, err
        return [], None

    def _start_writer(self) -> None:
        """One more writer; raises (RuntimeError) when the process cannot start a thread, counting none."""
        # A daemon: an idle writer must not hold the process at exit. One stopped mid-commit
        # acknowledged nothing of that commit, and its transaction is rolled back.
        name = "pepipost-commit" if not self._writers else f"pepipost-commit-{len(self._writers)}"
        writer = threading.Thread(target=self._write_all, name=name, daemon=True)
        writer.start()  # under the lock: it cannot leave the list before it is in it
        self._writers.append(writer)

    def lingering(self) -> float:
        """Seconds the next commit waits for stragglers: 0 unless the last one, just now, had company."""
        if (
            self.last_commit_bodies < 2
            or len(self._waiting) >= MAX_BATCHES_PER_COMMIT
            or time.perf_counter() - self.last_commit_ended > COMPANY_FORGOTTEN_AFTER
        ):
            return 0.0
        return min(self.linger, self.last_commit_seconds)

    def _next_commit(self) -> list[_Waiting]:
        """What the next commit holds: the bodies waiting, once there are some (and after any linger)."""
        with self._work:
            while True:
                self._work.wait_for(lambda: self._waiting)
                if (wait := self.lingering()) > 0:
                    self._work.wait_for(lambda: len(self._waiting) >= MAX_BATCHES_PER_COMMIT, wait)
                taken, self._waiting = self._waiting[:MAX_BATCHES_PER_COMMIT], self._waiting[MAX_BATCHES_PER_COMMIT:]
                if self._waiting:  # more than one commit's worth: another writer may take the rest
                    self._work.notify()
                if taken:  # another writer may have taken everything while this one lingered
                    return taken

    def _write_all(self) -> None:
        # Commit after commit on this thread: the next one starts the moment the last ends, without
        # a turn of the event loop in between (which, under load, held the bodies back as long as
        # a commit). Only the answers go through the loop, one call a commit.
        try:
            while True:
                taken = self._next_commit()
                try:
                    results = self._commit([batch for batch, _, _ in taken])
                    if len(results) != len(taken):
                        raise RuntimeError(f"the store answered for {len(results)} bodies of {len(taken)}")
                except Exception as err:  # a bug, not the store: answer (503) rather than leave them waiting
                    results = [err] * len(taken)
                except BaseException as err:  # not stored either: answered, and this thread ends
                    _answer(taken, [RuntimeError(f"the commit was interrupted: {type(err).__name__}")] * len(taken))
                    raise
                _answer(taken, results)
                with self._work, suppress(Exception):  # a second writer that cannot start: one will do
                    if len(self._writers) < self.writers_wanted:
                        self._start_writer()
        finally:
            self._writer_gone()

    def _writer_gone(self) -> None:
        """A writer ended: another takes over what waits; with none to be had, what waits gets 503."""
        with self._work:
            if threading.current_thread() in self._writers:
                self._writers.remove(threading.current_thread())
            failed, reason = self._a_writer_for_what_waits()
        if reason is not None:
            _answer(failed, [reason] * len(failed))

    def _commit(self, batches: list[WebhookBatch]) -> list[IngestResult | BaseException]:
        """Each body's counts, or why it was not stored; timed for the next commit's linger."""
        started = time.perf_counter()
        results: list[IngestResult | BaseException]
        try:
            store = self._store()
            # One writer on SQLite (it has one writer at a time); on PostgreSQL, where a commit is
            # mostly waiting for the server, several. Known once the store is open.
            self.writers_wanted = 1 if store.is_sqlite else POSTGRES_WRITERS
            results = list(store.ingest_many(batches))
        except Exception as err:
            # A failure of the store itself: each waiting request answers 503 and the vendor
            # resends. Anything else: body by body, each body's poison set apart.
            results = [err] * len(batches) if is_transient(err) else self._store_each(batches)
        self.last_commit_ended = time.perf_counter()
        self.last_commit_bodies, self.last_commit_seconds = len(batches), self.last_commit_ended - started
        return results

    def _store_each(self, batches: Sequence[WebhookBatch]) -> list[IngestResult | BaseException]:
        """A failed group commit again, one body per transaction, each body's poison set apart."""
        outcomes: list[IngestResult | BaseException] = []
        for batch in batches:
            try:
                outcomes.append(store_apart(self._store(), batch))
            except Exception as err:
                outcomes.append(err)
        return outcomes


# A queued body: the batch, the future its request awaits and that request's event loop.
_Waiting = tuple[WebhookBatch, "asyncio.Future[IngestResult]", asyncio.AbstractEventLoop]


def _answer(taken: list[_Waiting], results: Sequence[IngestResult | BaseException]) -> None:
    """Settle each request's future on its own event loop: one call per loop (usually one)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, IngestResult | BaseException]]] = {}
    for (_, future, loop), result in zip(taken, results, strict=True):
        by_loop.setdefault(loop, []).append((future, result))
    for loop, settled in by_loop.items():
        with suppress(RuntimeError):  # that loop is closed: nobody waits for these answers any more
            loop.call_soon_threadsafe(_settle_all, settled)


def _settle_all(settled: list[tuple[asyncio.Future, IngestResult | BaseException]]) -> None:
    for future, result in settled:
        if future.done():  # the request was cancelled
            continue
        if not isinstance(result, BaseException):
            future.set_result(result)
            continue
        try:
            future.set_exception(result)
        except TypeError:  # one a future refuses (StopIteration): the request still gets its 503
            future.set_exception(RuntimeError(f"the commit failed: {result!r}"))


def store_apart(store: StatusStore, batch: WebhookBatch) -> IngestResult:
    """Store one body; if the store refuses what it holds, find the items it refuses by halving.

    Those become dead letters with the database's reason, the rest is stored, and the body can be
    acknowledged. Checking items against ``limits`` first makes this a last resort. A failure of
    the store itself (``is_transient``) is raised: nothing is acknowledged unstored.
    """
    try:
        return store.ingest_many([batch])[0]
    except Exception as err:
        if is_transient(err):
            raise
    total = IngestResult()
    refused: list[DeadLetter] = []
    _halve(store, list(batch.events), lambda part: WebhookBatch(events=part), total, refused)
    _halve(store, list(batch.inbound), lambda part: WebhookBatch(inbound=part), total, refused)
    letters = [*batch.dead_letters, *refused]
    if letters:
        store.ingest_many([WebhookBatch(dead_letters=letters)])
    total.dead_letters += len(letters)
    return total


def _halve(
    store: StatusStore,
    items: list[Any],  # the events, or the inbound messages, of one body
    as_batch: Callable[[list[Any]], WebhookBatch],
    total: IngestResult,
    refused: list[DeadLetter],
) -> None:
    if not items:
        return
    try:
        result = store.ingest_many([as_batch(items)])[0]
    except Exception as err:
        if is_transient(err):
            raise
        if len(items) == 1:
            refused.append(letter(f"the store refused this item: {describe_error(err)}", items[0].raw))
            return
        middle = len(items) // 2
        _halve(store, items[:middle], as_batch, total, refused)
        _halve(store, items[middle:], as_batch, total, refused)
        return
    for name in ("accepted", "duplicates", "inbound", "reconciled", "opt_outs"):
        setattr(total, name, getattr(total, name) + getattr(result, name))


class Admission:
    """A body's place in an ``IngestQueue``, held inside its ``with`` block.

    A class rather than a generator's context manager: entered and left for every body.
    """

    __slots__ = ("queue", "size")

    def __init__(self, queue: IngestQueue, size: int) -> None:
        self.queue, self.size = queue, size

    def __enter__(self) -> None:
        queue, size = self.queue, self.size
        if queue.held_bodies and (queue.held_bodies >= queue.max_bodies or queue.held_bytes + size > queue.max_bytes):
            raise QueueFull
        queue.held_bodies += 1
        queue.held_bytes += size

    def __exit__(self, *exc_info: object) -> None:
        self.queue.held_bodies -= 1
        self.queue.held_bytes -= self.size
