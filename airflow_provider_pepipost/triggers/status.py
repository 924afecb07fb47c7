"""WhatsAppMessageStatusTrigger: the deferrable sensor's wait, polling the status store in the triggerer."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.model import evaluate
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.store import StatusStore, open_store

# Consecutive store errors the trigger rides out (a database restart) before it gives up.
MAX_CONSECUTIVE_ERRORS = 5


class WhatsAppMessageStatusTrigger(BaseTrigger):
    """Fires once the messages reach ``target_status`` (success) or the failure policy trips.

    Store reads run in a thread: the triggerer's event loop is shared by every trigger.

    :param message_ids: message ids.
    :param ledger_tasks: task instances whose sent rows are waited on as a whole: ``TaskKey``
        fields as dicts (the sensor turns the send task's ledger references into these).
    :param status_store_conn_id: the store's Airflow connection; None: the resolver's default
        (``airflow_provider_pepipost.status.resolver``). Only the id is serialized, never a URL.
    :param deadline: epoch seconds after which it fires a timeout event. Airflow enforces the
        deferral timeout too; this one also holds where nothing else does (``dag.test()``).

    Other parameters: see ``WhatsAppMessageStatusSensor``.
    """

    def __init__(
        self,
        message_ids: list[str],
        status_store_conn_id: str | None = None,
        target_status: str = "delivered",
        min_success_ratio: float = 1.0,
        fail_on: str = "unreachable",
        unknown_policy: str = "wait",
        poll_interval: float = 30.0,
        deadline: float | None = None,
        ledger_tasks: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.message_ids = message_ids
        self.ledger_tasks = ledger_tasks or []
        self.status_store_conn_id = status_store_conn_id
        self.target_status = target_status
        self.min_success_ratio = min_success_ratio
        self.fail_on = fail_on
        self.unknown_policy = unknown_policy
        self.poll_interval = poll_interval
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "message_ids": self.message_ids,
                "ledger_tasks": self.ledger_tasks,
                "status_store_conn_id": self.status_store_conn_id,
                "target_status": self.target_status,
                "min_success_ratio": self.min_success_ratio,
                "fail_on": self.fail_on,
                "unknown_policy": self.unknown_policy,
                "poll_interval": self.poll_interval,
                "deadline": self.deadline,
            },
        )

    def __repr__(self) -> str:
        # The default repr prints every kwarg: the ids are many.
        return (
            f"<{type(self).__qualname__} {len(self.message_ids)} id(s), {len(self.ledger_tasks)} task(s) "
            f"-> '{self.target_status}' "
            f"in {store_source(self.status_store_conn_id)}>"
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        targets: list[str | TaskKey] = [*self.message_ids, *(TaskKey(**fields) for fields in self.ledger_tasks)]
        errors = 0
        store: StatusStore | None = None
        # The sensor read the store just before it deferred: the first read waits one interval.
        # That also keeps the trigger from firing before the scheduler has taken in the deferral:
        # Airflow 3.3 can mark such a task failed (apache/airflow#66374, #72716).
        await asyncio.sleep(self.poll_interval)
        while True:
            try:
                if store is None:
                    store = await _in_thread(open_store, self.status_store_conn_id)
                summary = await _in_thread(store.summarize, targets)
            except Exception as err:
                errors += 1
                self.log.warning("Reading the status store failed (%d in a row): %s", errors, type(err).__name__)
                if errors >= MAX_CONSECUTIVE_ERRORS:
                    yield TriggerEvent({"status": "error", "reason": f"the status store could not be read: {err}"})
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            errors = 0
            verdict = evaluate(summary, self.target_status, self.min_success_ratio, self.fail_on, self.unknown_policy)
            if verdict.done:
                yield TriggerEvent(
                    {
                        "status": "failure" if verdict.failed else "success",
                        "reason": verdict.reason,
                        "summary": summary.to_dict(),
                    }
                )
                return
            if self.deadline is not None and time.time() >= self.deadline:
                yield TriggerEvent({"status": "timeout", "reason": verdict.reason, "summary": summary.to_dict()})
                return
            self.log.info(
                "%d of %d reached '%s'; %d pending, %d failed",
                summary.reached(self.target_status), summary.total, self.target_status,
                summary.pending, summary.failed_total,
            )  # fmt: skip
            await asyncio.sleep(self.poll_interval)


# The store reads of every status trigger in this triggerer: threads of their own, so that other
# work on the event loop's default pool (a notifier's alert, another provider's trigger) never
# delays a delivered sensor, and these reads never delay that work.
_STORE_THREADS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pepipost-status")


async def _in_thread(function: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_STORE_THREADS, functools.partial(function, *args))
