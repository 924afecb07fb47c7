"""Group commit for the receiver: the batches of concurrent requests stored in one transaction.

Every request still waits for the commit that holds its events before it answers, so nothing is
acknowledged unstored; what changes is that one commit serves every request waiting at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost.status.store import IngestResult, StatusStore, WebhookBatch

MAX_BATCHES_PER_COMMIT = 64


class IngestQueue:
    """Queues parsed webhook bodies; one task at a time writes everything queued."""

    def __init__(self, store: Callable[[], StatusStore]) -> None:
        self._store = store
        self._waiting: list[tuple[WebhookBatch, asyncio.Future]] = []
        self._writer: asyncio.Task | None = None

    async def ingest(self, batch: WebhookBatch) -> IngestResult:
        """Store one body; returns its counts once the transaction holding it has committed."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting.append((batch, future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        while self._waiting:
            taken, self._waiting = self._waiting[:MAX_BATCHES_PER_COMMIT], self._waiting[MAX_BATCHES_PER_COMMIT:]
            try:
                results = await run_in_threadpool(self._store().ingest_many, [batch for batch, _ in taken])
            except Exception as err:  # each waiting request answers 503 and the vendor resends
                for _, future in taken:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(taken, results, strict=True):
                if not future.done():
                    future.set_result(result)
