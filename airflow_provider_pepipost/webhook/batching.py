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
default). Commits run on a thread of the queue's own, one at a time: cheaper per commit than the
server's shared thread pool, and never behind its other work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

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
# A commit that ended longer ago than this had company no longer: the next one does not linger.
COMPANY_FORGOTTEN_AFTER = 1.0
T = TypeVar("T")


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
    """Queues parsed webhook bodies; one task at a time writes everything queued."""

    def __init__(
        self,
        store: Callable[[], StatusStore],
        *,
        max_bodies: int = DEFAULT_MAX_QUEUED_BODIES,
        max_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
        linger: float = DEFAULT_COMMIT_LINGER,
    ) -> None:
        self._store = store
        self._waiting: list[tuple[WebhookBatch, asyncio.Future[IngestResult]]] = []
        self._writer: asyncio.Task | None = None
        self._company: asyncio.Future[None] | None = None  # while lingering: done once a full commit waits
        # The commits' own thread, made on the first commit (its thread ends with the queue).
        self._committer: ThreadPoolExecutor | None = None
        self.max_bodies, self.max_bytes = max_bodies, max_bytes
        self.linger = max(0.0, linger)
        self.held_bodies = self.held_bytes = 0
        # The last commit: how many bodies it carried, how long it took (what lingering is bounded by)
        # and when it ended (time.perf_counter).
        self.last_commit_bodies, self.last_commit_seconds, self.last_commit_ended = 0, 0.0, 0.0

    def full(self) -> bool:
        return self.held_bodies >= self.max_bodies or self.held_bytes >= self.max_bytes

    @contextmanager
    def admit(self, size: int) -> Iterator[None]:
        """Hold room for one body (``size`` bytes) from its parse to its answer; QueueFull if none.

        A body alone is always admitted, however large: the body cap bounds it.
        """
        if self.held_bodies and (self.held_bodies >= self.max_bodies or self.held_bytes + size > self.max_bytes):
            raise QueueFull
        self.held_bodies += 1
        self.held_bytes += size
        try:
            yield
        finally:
            self.held_bodies -= 1
            self.held_bytes -= size

    async def ingest(self, batch: WebhookBatch) -> IngestResult:
        """Store one body; returns its counts once the transaction holding it has committed."""
        future: asyncio.Future[IngestResult] = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        if self._company is not None and len(self._waiting) >= MAX_BATCHES_PER_COMMIT:
            _settle(self._company)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    def lingering(self) -> float:
        """Seconds the next commit waits for stragglers: 0 unless the last one, just now, had company."""
        if (
            self.last_commit_bodies < 2
            or len(self._waiting) >= MAX_BATCHES_PER_COMMIT
            or time.perf_counter() - self.last_commit_ended > COMPANY_FORGOTTEN_AFTER
        ):
            return 0.0
        return min(self.linger, self.last_commit_seconds)

    async def _write_all(self) -> None:
        while self._waiting:
            if (wait := self.lingering()) > 0:
                await self._linger(wait)
            taken, self._waiting = self._waiting[:MAX_BATCHES_PER_COMMIT], self._waiting[MAX_BATCHES_PER_COMMIT:]
            batches = [batch for batch, _ in taken]
            started = time.perf_counter()
            try:
                results: list[IngestResult | BaseException] = list(await self._commit(self._ingest_many, batches))
            except Exception as err:
                if is_transient(err):  # each waiting request answers 503 and the vendor resends
                    results = [err] * len(taken)
                else:
                    results = await self._commit(self._store_each, batches)
            self.last_commit_ended = time.perf_counter()
            self.last_commit_bodies, self.last_commit_seconds = len(taken), self.last_commit_ended - started
            for (_, future), result in zip(taken, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)

    async def _linger(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a full commit's worth is waiting sooner (a timer, no task)."""
        loop = asyncio.get_running_loop()
        self._company = loop.create_future()
        timer = loop.call_later(seconds, _settle, self._company)
        try:
            await self._company
        finally:
            timer.cancel()
            self._company = None

    async def _commit(self, write: Callable[[list[WebhookBatch]], T], batches: list[WebhookBatch]) -> T:
        """``write(batches)`` on the commit thread, awaited."""
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pepipost-commit")
        return await asyncio.get_running_loop().run_in_executor(self._committer, write, batches)

    def _ingest_many(self, batches: list[WebhookBatch]) -> list[IngestResult]:
        return self._store().ingest_many(batches)

    def _store_each(self, batches: Sequence[WebhookBatch]) -> list[IngestResult | BaseException]:
        """A failed group commit again, one body per transaction, each body's poison set apart."""
        outcomes: list[IngestResult | BaseException] = []
        for batch in batches:
            try:
                outcomes.append(store_apart(self._store(), batch))
            except Exception as err:
                outcomes.append(err)
        return outcomes


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
