"""The receiver's approval responder: a tap on an approval request answers the task in Airflow.

A background task of the receiver. It starts with the receiver (standalone) or with its first
request (the plugin), looks for taps on approval requests that are not handled yet after every
stored body and every ``INTERVAL`` seconds, decides each (``approvals.ApprovalRequest.decide``: an
approver's tap on one of the request's buttons is an answer), and answers the task through
Airflow's REST API. A tap that answers is claimed in the store first, so that two receivers on one
store never both answer. A tap by anyone else, on another button, on an earlier try's request or
after the task stopped waiting changes nothing and is logged with the number masked. Until
Airflow can take it (down, the task not waiting yet, the service user's permissions), the tap
stays pending and is tried again, for ``MAX_PENDING`` seconds at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from starlette.concurrency import run_in_threadpool

from airflow_provider_pepipost.approvals import Verdict
from airflow_provider_pepipost.numbers import mask_number
from airflow_provider_pepipost.status.approvals import Answer, Tap
from airflow_provider_pepipost.status.store import StatusStore
from airflow_provider_pepipost.webhook.airflow_api import DEFAULT_AIRFLOW_API_CONN_ID, AirflowApi, Outcome
from airflow_provider_pepipost.webhook.confirmations import send_confirmation

log = logging.getLogger(__name__)

INTERVAL = 30.0  # seconds between two looks for pending taps when no body wakes the responder
SOON = 1.0  # seconds before looking again at a tap whose task is about to wait for its answer
# Seconds a task must have been seen waiting before it is answered: Airflow 3.3.2 fails a task
# resumed before the scheduler took in the end of the try that parked it (a loaded 2-core
# scheduler lagged 5.6 s; see docs/guarantees.md, "Limits").
SETTLE = 10.0
BATCH = 100  # taps handled a pass
CLAIM_STALE = 300.0  # a claim older than this was left by a receiver that died: taken over
MAX_PENDING = 24 * 3600.0  # a tap Airflow could not take for this long is given up ("expired")

Task = tuple[str, str, str, int, int]  # dag, run, task, map index, try


class ApprovalResponder:
    """One per receiver app: a background task that answers approvals, woken by each stored body."""

    def __init__(self, store: Callable[[], StatusStore], api_conn_id: str = DEFAULT_AIRFLOW_API_CONN_ID) -> None:
        self.store = store
        self.api_conn_id = api_conn_id
        self._api: AirflowApi | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._logged_at = 0.0
        self._seen_waiting: dict[Task, float] = {}

    def start(self) -> None:
        """Start the background task in the running loop unless it runs (its first pass is at once)."""
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()  # bound to this loop
            self._task = asyncio.get_running_loop().create_task(self._run(), name="pepipost-approvals")
            self._task.add_done_callback(_log_end)

    def wake(self) -> None:
        """Look for taps to handle now."""
        self.start()
        assert self._wake is not None
        self._wake.set()

    async def _run(self) -> None:
        wait = 0.0
        while True:
            assert self._wake is not None
            # asyncio.TimeoutError is not the built-in TimeoutError before Python 3.11.
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            try:
                wait = SOON if await run_in_threadpool(self.handle_until_done) else INTERVAL
            except Exception as err:  # the store: logged (at most once an interval), tried again next time
                self._log_error("could not read or record taps", err)
                wait = INTERVAL

    def handle_until_done(self) -> bool:
        """Passes over the pending taps while they make progress (blocking); True when a tap's task
        is about to wait for its answer (look again soon)."""
        while True:
            recorded, not_yet = self.handle_pending()
            if not recorded or recorded + not_yet < BATCH:
                return bool(not_yet)

    def handle_pending(self) -> tuple[int, int]:
        """One pass: how many taps it recorded an end for, and how many wait for their task."""
        store = self.store()
        recorded = not_yet = 0
        states: dict[Task, Outcome] = {}  # one task's taps in one pass: asked once while not answerable
        for tap in store.pending_approval_taps(BATCH, CLAIM_STALE):
            ended = self.handle(store, tap, states)
            recorded += ended is None
            not_yet += ended is Outcome.NOT_YET
        return recorded, not_yet

    def handle(self, store: StatusStore, tap: Tap, states: dict[Task, Outcome]) -> Outcome | None:
        """Decide one tap and record its end; None when recorded, else why it stays pending."""
        request, who = tap.request, mask_number(tap.sender)
        task: Task = (*request.task, request.try_number)
        where = f"{request.dag_id}/{request.run_id}/{request.task_id}[{request.map_index}] try {request.try_number}"
        verdict, option = request.decide(tap.sender, tap.payload)
        if verdict is Verdict.ANSWER and time.time() - tap.received_at > MAX_PENDING:
            store.record_approval_answer(Answer(tap.inbound_id, request.message_id, verdict.value, option, "expired",
                                                who, time.time()))  # fmt: skip
            log.warning("Pepipost approvals: %s's answer %r for %s expired: Airflow never took it", who, option, where)
            return None
        if verdict is not Verdict.ANSWER:
            log.warning("Pepipost approvals: a tap by %s on the request for %s changes nothing: %s", who, where,
                        verdict.value)  # fmt: skip
            store.record_approval_answer(Answer(tap.inbound_id, request.message_id, verdict.value, None, None, who,
                                                time.time()))  # fmt: skip
            return None
        if task in states:  # this pass already found the task not answerable
            return states[task]
        if not store.claim_approval_tap(tap, who, CLAIM_STALE):
            return Outcome.ALREADY_ANSWERED  # another receiver holds it
        said = self.api().answer(*request.task, option or "", try_number=request.try_number,
                                 settled=self.waited_long_enough)  # fmt: skip
        if said.outcome in (Outcome.NOT_YET, Outcome.UNREACHABLE):
            store.release_approval_tap(tap.inbound_id)
            states[task] = said.outcome
            if said.outcome is Outcome.UNREACHABLE:
                self._log_error(f"Airflow could not take {who}'s answer {option!r} for {where} (tried again later)",
                                said.detail)  # fmt: skip
            return said.outcome
        store.finish_approval_tap(Answer(tap.inbound_id, request.message_id, verdict.value, option,
                                         said.outcome.value, who, time.time()))  # fmt: skip
        if said.outcome is Outcome.ANSWERED:
            log.info("Pepipost approvals: %s answered %s with %r", who, where, option)
            if request.confirmation is not None:
                send_confirmation(request.confirmation, tap.sender or "", option or "")
        else:
            log.warning("Pepipost approvals: %s's answer %r for %s changes nothing: %s (%s)", who, option, where,
                        said.outcome.value, said.detail)  # fmt: skip
        return None

    def waited_long_enough(self, task: Task, state: str) -> bool:
        """True once this try of the task has been seen waiting for ``SETTLE`` seconds (this process's clock)."""
        now = time.monotonic()
        first = self._seen_waiting.setdefault(task, now)
        if len(self._seen_waiting) > 10_000:  # tasks answered long ago
            self._seen_waiting = {task: first}
        return now - first >= SETTLE

    def api(self) -> AirflowApi:
        if self._api is None:
            self._api = AirflowApi.from_connection(self.api_conn_id)
        return self._api

    def _log_error(self, what: str, cause: object) -> None:
        """An error, logged at most once an interval however often it happens."""
        if time.monotonic() - self._logged_at >= INTERVAL or not self._logged_at:
            log.error("Pepipost approvals: %s: %s", what, cause)
            self._logged_at = time.monotonic()


def _log_end(task: asyncio.Task[None]) -> None:
    """The responder never ends on its own: say so if it does (a cancelled app is not news)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("Pepipost approvals: the responder stopped: %r; it starts again with the next body", task.exception())
