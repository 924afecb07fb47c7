"""Group commit for the send loop: the ledger writes of a campaign in few transactions.

Each message needs a durable claim before its request goes out. One transaction per claim makes
the database's commit the campaign's speed limit (SQLite has one writer); here one thread commits
whatever claims and outcomes are waiting, in one transaction, and wakes the callers it served.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import Future

from airflow_provider_pepipost.errors import PepipostConfigError
from airflow_provider_pepipost.status.ledger import Claim, ClaimAnswer, Outcome, RowRecord, TaskKey
from airflow_provider_pepipost.status.store import StatusStore

MAX_BATCH = 500
# Outcomes and rows wait this long, or for this many, to share a commit (claims never wait).
LINGER = 0.01
LINGER_ITEMS = 256


class LedgerWriter:
    """Batches ``claim_many`` (waits for its commit) and ``record`` (committed with the next batch)."""

    def __init__(
        self,
        store: StatusStore,
        task: TaskKey,
        *,
        resend_unknown: bool = False,
        campaign: str | None = None,
        generation: int = 0,
        check_opt_outs: bool = True,
    ) -> None:
        self.store = store
        self.task = task
        # One id per try: the ledger tells this try's rows from an earlier try's without clocks.
        self.attempt = uuid.uuid4().hex
        self.resend_unknown = resend_unknown
        self.campaign = campaign
        self.generation = generation
        self.check_opt_outs = check_opt_outs
        self._claims: list[tuple[list[Claim], Future]] = []  # each claim_many call, and its answers
        self._outcomes: list[Outcome] = []
        self._rows: list[RowRecord] = []
        self._cond = threading.Condition()
        self._closing = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pepipost-ledger", daemon=True)
        self._thread.start()

    def claim_many(self, claims: list[Claim]) -> list[ClaimAnswer]:
        """For each claim, whether its message may be sent (see ``StatusStore.write_ledger``);
        returns once all are committed."""
        answers: Future[list[ClaimAnswer]] = Future()
        with self._cond:
            self._raise_if_failed()
            self._claims.append((claims, answers))
            self._cond.notify()
        return answers.result()

    def record(self, outcome: Outcome) -> None:
        """Queue an outcome; ``close`` (or the next batch) commits it."""
        with self._cond:
            self._raise_if_failed()
            self._outcomes.append(outcome)
            self._wake_for(self._outcomes)

    def record_row(self, row: RowRecord) -> None:
        """Queue what became of one input row; committed with the next batch."""
        with self._cond:
            self._raise_if_failed()
            self._rows.append(row)
            self._wake_for(self._rows)

    def _wake_for(self, queued: list) -> None:
        # The writer needs waking for the first item (it may be waiting for anything) and for a
        # full batch (it may be lingering); a wake per item cost a thread switch per message.
        if len(queued) == 1 or len(queued) == LINGER_ITEMS:
            self._cond.notify()

    def close(self, *, whole_audience: bool = False) -> None:
        """Commit everything queued and stop; raises if a write failed.

        ``whole_audience``: this try recorded every input row, so rows only earlier tries
        recorded (an audience that shrank) are forgotten.
        """
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()
        self._raise_if_failed()
        if whole_audience:
            self.store.prune_rows(self.task, self.attempt)

    def _raise_if_failed(self) -> None:
        if isinstance(self._error, PepipostConfigError):  # a setting to mend: said as it is
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"the status store could not be written: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._claims or self._outcomes or self._rows or self._closing):
                    self._cond.wait()
                self._linger()
                groups = self._take_claims()
                outcomes, self._outcomes = self._outcomes, []
                rows, self._rows = self._rows, []
                if not groups and not outcomes and not rows and self._closing:
                    return
            claims = [claim for group, _ in groups for claim in group]
            try:
                granted = self.store.write_ledger(
                    self.task,
                    claims,
                    outcomes,
                    attempt=self.attempt,
                    resend_unknown=self.resend_unknown,
                    campaign=self.campaign,
                    generation=self.generation,
                    check_opt_outs=self.check_opt_outs,
                    rows=rows,
                )
            except BaseException as err:  # every waiting sender must hear of it
                with self._cond:
                    self._error = err
                for _, answers in groups:
                    answers.set_exception(err)
                with self._cond:  # fail the claims queued since, and stop
                    for _, answers in self._claims:
                        answers.set_exception(err)
                    self._claims = []
                return
            start = 0
            for group, answers in groups:
                answers.set_result(granted[start : start + len(group)])
                start += len(group)

    def _linger(self) -> None:
        """Outcomes and rows alone wait up to LINGER seconds for more (called with the lock held):
        a commit's own cost is paid for many messages. Claims, whose senders wait, never wait."""
        until = time.monotonic() + LINGER
        while not (self._claims or self._closing) and len(self._outcomes) + len(self._rows) < LINGER_ITEMS:
            left = until - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)

    def _take_claims(self) -> list[tuple[list[Claim], Future]]:
        """Whole claim_many calls, up to MAX_BATCH claims (at least one call); the lock held."""
        taken: list[tuple[list[Claim], Future]] = []
        size = 0
        while self._claims and (not taken or size + len(self._claims[0][0]) <= MAX_BATCH):
            group = self._claims.pop(0)
            taken.append(group)
            size += len(group[0])
        return taken
