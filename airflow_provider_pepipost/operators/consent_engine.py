"""The consent engine: calls the vendor's consent API a batch at a time, once per batch, records
each outcome in the status store, and passes opt-outs on to the vendor.

Kept apart from the operator so that the operator is Airflow glue and this is the engine. The
rule for one batch is ``decide_batch``, and the rule for a failed call is ``failure_of``: pure
functions of what the store and the hook answered, tested as tables.

A number that says STOP while its opt-in is with the vendor stays opted out (the store's
compare-and-set), and its opt-out is passed on to the vendor after the opt-in. Such a number is
recorded beside its batch (``raced_key``), so that a retry that reuses the confirmed batch still
counts it as opted out and passes its opt-out on, should the first pass have failed.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from airflow_provider_pepipost.consent import ConsentRow
from airflow_provider_pepipost.errors import FailureKind, PepipostApiError, PepipostError
from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in, phone_or_none
from airflow_provider_pepipost.status.consent import RACED, Consent, ConsentBatch, raced_key
from airflow_provider_pepipost.status.ledger import TaskKey

FAILED_ROWS_LISTED = 100  # rows of refused batches named in the XCom; the counts hold them all
REPLY_SYNC_LIMIT = 100_000  # reply opt-outs passed on to the vendor per run
PROGRESS_INTERVAL = 10.0  # seconds between progress lines in the task log

Batch = Sequence[tuple[int, ConsentRow]]  # input rows of one call: (row index, checked row)


class ConsentCaller(Protocol):
    """The engine's edge to the vendor (``PepipostHook``)."""

    def manage_consent(self, kind: str, recipients: Sequence[ConsentRow]) -> object: ...


class ConsentStore(Protocol):
    """The engine's edge to the status store (``StatusStore``)."""

    def consent_batches(self, task: TaskKey) -> dict[str, ConsentBatch]: ...

    def consents(self, recipients: Iterable[str]) -> dict[str, Consent]: ...

    def record_consent_batch(
        self,
        task: TaskKey,
        batch: ConsentBatch,
        recipients: Sequence[str] = (),
        held: Mapping[str, Consent | None] | None = None,
    ) -> set[str]: ...

    def suppressed(self, recipients: Iterable[str]) -> set[str]: ...

    def reply_opt_outs(self, limit: int = ...) -> list[str]: ...

    def mark_reply_opt_outs_synced(self, recipients: Sequence[str]) -> None: ...


class TaskLog(Protocol):
    """The task's logger, as far as the engine writes to it."""

    def info(self, msg: str, /, *args: object) -> object: ...

    def warning(self, msg: str, /, *args: object) -> object: ...


class BatchAction(str, Enum):
    """What the engine does with one batch of input rows."""

    REUSE = "reuse"  # an earlier try's call was confirmed: its count stands, the vendor is not called
    NOT_CONFIRMED = "not_confirmed"  # the calls have stopped (a refused key): a later try calls it
    SKIP = "skip"  # every row is an opt-in of a number that opted out: there is nothing to call
    CALL = "call"  # call the vendor with the decision's rows


@dataclass(frozen=True)
class BatchDecision:
    action: BatchAction
    rows: Batch = ()  # the rows the vendor is called with (CALL)
    confirmed: int = 0  # rows that count as confirmed without a call (REUSE)
    skipped_opted_out: int = 0  # opt-in rows left out: their number is on the suppression list
    not_confirmed: int = 0  # rows not called because the calls stopped
    held: Mapping[str, Consent] = field(default_factory=dict)  # the list's rows when read (opt-in)
    # Numbers of a reused opt-in batch that said STOP while its call was with the vendor.
    opted_out_during_call: Sequence[str] = ()


def decide_batch(
    batch: Batch,
    known: ConsentBatch | None,
    held: Callable[[], Mapping[str, Consent]],
    *,
    kind: str,
    lift_opt_outs: bool,
    stopped: bool,
    raced: Sequence[str] = (),
) -> BatchDecision:
    """The per-batch rule, from what the store holds.

    ``known`` is what an earlier try of the task recorded for this batch (None: nothing).
    ``held`` reads what the suppression list holds for the batch's numbers; it is asked only for
    an opt-in that is called, since the opt-in is recorded only where the list still holds that
    after the call. ``raced``: the numbers of the batch that the earlier try found had said STOP
    while the call was with the vendor; they count as opted out, not confirmed.
    """
    if known is not None and known.state == "confirmed":
        # The earlier try left out the rows that had opted out; they stay left out.
        return BatchDecision(
            BatchAction.REUSE,
            confirmed=known.rows - len(raced),
            skipped_opted_out=len(batch) - known.rows,
            opted_out_during_call=raced,
        )
    if stopped:
        return BatchDecision(BatchAction.NOT_CONFIRMED, not_confirmed=len(batch))
    if kind != "optin":
        return BatchDecision(BatchAction.CALL, batch)
    consents = held()
    kept = batch if lift_opt_outs else [(index, row) for index, row in batch if not _opted_out(consents, row)]
    action = BatchAction.CALL if kept else BatchAction.SKIP
    return BatchDecision(action, kept, skipped_opted_out=len(batch) - len(kept), held=consents)


class CallFailure(str, Enum):
    """What a failed consent call means for its rows and for the calls after it."""

    REFUSED = "refused"  # the vendor refused the rows: the same rows would be refused again
    STOP = "stop"  # every further call would meet it (a refused key): the calls stop
    RETRY = "retry"  # not sent, or an answer that cannot tell: calls are idempotent, a later try calls again


def failure_of(err: PepipostError) -> CallFailure:
    """The rule for a failed call, the same for opt-ins, opt-outs and opt-outs passed on."""
    if not isinstance(err, PepipostApiError) or err.is_transient:
        return CallFailure.RETRY
    if err.kind is FailureKind.JOB:
        return CallFailure.STOP
    return CallFailure.REFUSED


@dataclass
class ConsentTally:
    """What the consent calls came to, shared by the worker threads."""

    confirmed: int = 0  # rows in batches the vendor confirmed (this try or an earlier one)
    refused: int = 0  # rows in batches the vendor refused
    not_confirmed: int = 0  # rows whose call failed for a reason a later try may not meet
    skipped_opted_out: int = 0  # opt-in rows whose number is on the suppression list (lift_opt_outs off)
    # Opt-in rows whose number said STOP while their call was with the vendor: not opted in here,
    # and opted out again at the vendor.
    opted_out_during_call: list[str] = field(default_factory=list)
    batches: int = 0
    batches_reused: int = 0
    failed_rows: list[dict[str, Any]] = field(default_factory=list)
    stop: PepipostError | None = None  # an error every further call would meet (a refused key)
    transient: PepipostError | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, decision: BatchDecision) -> None:
        """The rows a decision settles before any call."""
        with self.lock:
            if decision.action is BatchAction.REUSE:
                self.batches_reused += 1
            self.confirmed += decision.confirmed
            self.skipped_opted_out += decision.skipped_opted_out
            self.not_confirmed += decision.not_confirmed
            self.opted_out_during_call += decision.opted_out_during_call

    def count_failed(self, rows: int, err: PepipostError, failure: CallFailure) -> None:
        """Rows of a call that failed for a reason a later try may not meet."""
        with self.lock:
            self.not_confirmed += rows
            if failure is CallFailure.STOP:
                self.stop = self.stop or err
            else:
                self.transient = self.transient or err

    def count_refused(self, batch: Batch, err: PepipostApiError) -> None:
        with self.lock:
            self.refused += len(batch)
            for index, row in batch:
                _list_failed_row(self.failed_rows, index, row.recipient, err)


@dataclass
class OptOutPass:
    """Opt-outs passed on to the vendor: those taken from replies, and the STOPs that raced an opt-in.

    Every valid number ends in exactly one of ``synced``, ``refused`` and ``left``.
    """

    synced: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # not a number the vendor can take
    refused: list[tuple[str, str]] = field(default_factory=list)  # (number, the vendor's reason), one by one
    refused_calls: int = 0  # calls the vendor refused, the halves of split batches included
    left: list[str] = field(default_factory=list)  # not confirmed: a later try passes them on
    error: PepipostError | None = None
    stop: PepipostError | None = None  # an error every further call would meet (a refused key)
    unexpected: Exception | None = None  # what a call raised that is no vendor answer (a bug, a crash)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def not_confirmed(self) -> int:
        return len(self.left)

    @property
    def unsynced(self) -> int:
        return len(self.invalid) + len(self.refused) + len(self.left)

    def count_failed(self, numbers: Sequence[str], err: PepipostError, failure: CallFailure) -> None:
        with self.lock:
            self.left += numbers
            self.error = self.error or err
            if failure is CallFailure.STOP:
                self.stop = self.stop or err

    def count_unexpected(self, numbers: Sequence[str], err: Exception) -> None:
        """A call of ``numbers`` raised ``err``: those of them not yet accounted for are left."""
        with self.lock:
            accounted = {*self.synced, *self.left, *(number for number, _ in self.refused)}
            self.left += [number for number in numbers if number not in accounted]
            self.unexpected = self.unexpected or err

    def check(self, valid: Sequence[str]) -> None:
        """Every valid number was passed on, refused or left, once: the counts add up."""
        refused = [number for number, _ in self.refused]
        if sorted([*self.synced, *refused, *self.left]) != sorted(valid):
            raise RuntimeError(
                f"The opt-out pass lost count: {len(self.synced)} synced + {len(refused)} refused + "
                f"{len(self.left)} left != {len(valid)} valid opt-outs"
            )


class ConsentEngine:
    """Calls the vendor for every batch not confirmed before, ``max_workers`` calls at a time,
    recording each outcome; then passes opt-outs on to the vendor."""

    def __init__(
        self,
        hook: ConsentCaller,
        store: ConsentStore,
        task: TaskKey,
        *,
        kind: str,
        batch_size: int = 100,
        max_workers: int = 4,
        lift_opt_outs: bool = False,
        reply_opt_out_source: str = "WHATSAPP_REPLY",
        log: TaskLog | None = None,
    ) -> None:
        self.hook, self.store, self.task, self.kind = hook, store, task, kind
        self.batch_size = batch_size
        self.max_workers = max_workers
        self.lift_opt_outs = lift_opt_outs
        self.reply_opt_out_source = reply_opt_out_source
        self.log: TaskLog = log or logging.getLogger(__name__)
        self.tally = ConsentTally()

    def run(
        self, rows: Iterator[tuple[int, ConsentRow]], total: int, *, sync_reply_opt_outs: bool = False
    ) -> tuple[ConsentTally, OptOutPass]:
        """Every row's call, then the opt-outs passed on: reply opt-outs (``sync_reply_opt_outs``)
        and the STOPs that came while their opt-in was with the vendor."""
        earlier = self.store.consent_batches(self.task)
        if calls := [b for b in earlier.values() if b.state != RACED]:
            confirmed = sum(1 for b in calls if b.state == "confirmed")
            self.log.info(
                "An earlier try recorded %d consent call(s), %d confirmed: not called again", len(calls), confirmed
            )
        self.call_all(batches(rows, self.batch_size), earlier, total)
        numbers = self.store.reply_opt_outs(REPLY_SYNC_LIMIT) if sync_reply_opt_outs else []
        raced = self.tally.opted_out_during_call
        if raced:  # a raced number opted in again since (lift_opt_outs) is not opted out at the vendor
            still_out = self.store.suppressed(raced)
            raced = [number for number in raced if number in still_out]
        numbers = list(dict.fromkeys([*raced, *numbers]))
        passed = self.pass_on_opt_outs(numbers) if numbers else OptOutPass()
        if sync_reply_opt_outs and not numbers:
            self.log.info("No opt-out from a reply is waiting to be passed on to the vendor")
        return self.tally, passed

    def call_all(self, batches: Iterable[Batch], earlier: Mapping[str, ConsentBatch], total: int) -> None:
        """One call for every batch not confirmed before, never more than two per worker in flight."""
        started = last_log = time.monotonic()
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pepipost-consent") as pool:
            in_flight: set[Future[None]] = set()
            for batch in batches:
                # Keyed on the input rows, before any is skipped: a STOP between two tries must not
                # re-cut the batches, or the second try would call again for confirmed ones.
                key = batch_key(self.task, self.kind, [row for _, row in batch])
                self.tally.batches += 1
                raced = (
                    [row.recipient for _, row in batch if raced_key(key, row.recipient) in earlier] if earlier else []
                )
                in_flight.add(pool.submit(self.handle_batch, key, batch, earlier.get(key), raced))
                if len(in_flight) >= 2 * self.max_workers:
                    in_flight = _collect(in_flight, FIRST_COMPLETED)
                if time.monotonic() - last_log >= PROGRESS_INTERVAL:
                    last_log = time.monotonic()
                    self._log_progress(total, started)
            _collect(in_flight)
        self._log_progress(total, started)

    def handle_batch(self, key: str, batch: Batch, known: ConsentBatch | None, raced: Sequence[str] = ()) -> None:
        """Decide one batch and carry the decision out."""
        decision = decide_batch(
            batch, known, lambda: self.store.consents(row.recipient for _, row in batch), kind=self.kind,
            lift_opt_outs=self.lift_opt_outs, stopped=self.tally.stop is not None, raced=raced,
        )  # fmt: skip
        self.tally.count(decision)
        if decision.action is BatchAction.CALL:
            self._call(key, decision)

    def _call(self, key: str, decision: BatchDecision) -> None:
        """One consent call, its outcome recorded."""
        batch = decision.rows
        rows = [row for _, row in batch]
        try:
            self.hook.manage_consent(self.kind, rows)
        except PepipostError as err:
            failure = failure_of(err)
            if failure is CallFailure.REFUSED and isinstance(err, PepipostApiError):
                self._record_refused(key, batch, err)
            else:  # nothing recorded: the next try calls again
                self.tally.count_failed(len(batch), err, failure)
            return
        numbers = [row.recipient for row in rows]
        confirmed = ConsentBatch(key, self.kind, len(rows), "confirmed")
        changed = self.store.record_consent_batch(self.task, confirmed, numbers, decision.held)
        # Those the store kept beside the batch (raced_key): a retry that reuses it passes them on too.
        raced = sorted(self.store.suppressed(changed)) if changed else []
        with self.tally.lock:
            self.tally.confirmed += len(batch) - len(raced)
            self.tally.opted_out_during_call += raced
        if raced:
            self.log.warning(
                "%d number(s) of the opt-in batch of rows %d-%d said STOP while the call was with the vendor: "
                "they stay opted out, and their opt-out is passed on to the vendor",
                len(raced), batch[0][0], batch[-1][0],
            )  # fmt: skip

    def _record_refused(self, key: str, batch: Batch, err: PepipostApiError) -> None:
        refused = ConsentBatch(key, self.kind, len(batch), "refused", err.code, err.message)
        self.store.record_consent_batch(self.task, refused)
        self.tally.count_refused(batch, err)
        self.log.warning(
            "The vendor refused the %s batch of rows %d-%d (%s): %s",
            self.kind, batch[0][0], batch[-1][0], err.code or err.http_status, err.message,
        )  # fmt: skip

    def pass_on_opt_outs(self, numbers: Sequence[str]) -> OptOutPass:
        """Pass opt-outs on to the vendor in batches, isolating the numbers it refuses; mark each
        reply opt-out passed on once confirmed."""
        passed = OptOutPass()
        valid: list[str] = []
        for number in numbers:  # checked first: one bad number must not cost its batch
            (valid if phone_or_none(number) == number else passed.invalid).append(number)
        if self.tally.stop is not None:
            passed.left += valid
            return passed
        self.log.info("Passing on %d opt-out(s) to the vendor", len(valid))
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pepipost-opt-out") as pool:
            chunks = [valid[start : start + self.batch_size] for start in range(0, len(valid), self.batch_size)]
            calls = [(pool.submit(self._opt_out_isolating, chunk, passed), chunk) for chunk in chunks]
        for call, chunk in calls:  # every call is read: what one raised is never lost
            if (err := call.exception()) is not None:
                if not isinstance(err, Exception):
                    raise err
                passed.count_unexpected(chunk, err)
                trace = "".join(traceback.format_exception(err))
                self.log.warning("An opt-out call raised an unexpected error: %s", mask_numbers_in(trace))
        self.store.mark_reply_opt_outs_synced(passed.synced)  # those confirmed, whatever the others met
        passed.check(valid)
        if passed.unsynced:
            self.log.warning(
                "%d opt-out(s) were not passed on to the vendor (%d refused in %d refused call(s), %d not valid "
                "numbers, %d not confirmed); they stay on the suppression list, and the next run tries them again",
                passed.unsynced, len(passed.refused), passed.refused_calls, len(passed.invalid), passed.not_confirmed,
            )  # fmt: skip
        return passed

    def _opt_out_isolating(self, numbers: Sequence[str], passed: OptOutPass) -> None:
        """One opt-out call; a batch the vendor refuses is split in two until the refused numbers
        stand alone, so that one bad number never keeps the others from the vendor."""
        if passed.stop is not None:
            with passed.lock:
                passed.left += numbers
            return
        try:
            self.hook.manage_consent("optout", [ConsentRow(number, self.reply_opt_out_source) for number in numbers])
        except PepipostError as err:
            failure = failure_of(err)
            if failure is CallFailure.REFUSED and isinstance(err, PepipostApiError):
                self._split_refused(numbers, err, passed)
            else:  # not sent, or an answer that cannot tell: the next run tries again
                passed.count_failed(numbers, err, failure)
            return
        with passed.lock:
            passed.synced += numbers

    def _split_refused(self, numbers: Sequence[str], err: PepipostApiError, passed: OptOutPass) -> None:
        with passed.lock:
            passed.refused_calls += 1
            if len(numbers) == 1:
                passed.refused.append((numbers[0], f"{err.code or err.http_status}: {err.message}"))
                return
        middle = len(numbers) // 2
        self._opt_out_isolating(numbers[:middle], passed)
        self._opt_out_isolating(numbers[middle:], passed)

    def _log_progress(self, total: int, started: float) -> None:
        tally = self.tally
        done = tally.confirmed + tally.refused + tally.not_confirmed
        self.log.info(
            "Consent (%s): %d of %d rows done in %.1fs: confirmed %d, refused %d, not confirmed %d",
            self.kind, done, total, time.monotonic() - started, tally.confirmed, tally.refused, tally.not_confirmed,
        )  # fmt: skip


def batch_key(task: TaskKey, kind: str, rows: Sequence[ConsentRow]) -> str:
    """The identity of one consent call of one task instance: the same rows give the same key."""
    content = json.dumps([kind, *task.instance, [row.to_payload() for row in rows]], separators=(",", ":"))
    return "cb-" + hashlib.sha256(content.encode()).hexdigest()[:40]


def batches(rows: Iterator[tuple[int, ConsentRow]], size: int) -> Iterator[list[tuple[int, ConsentRow]]]:
    """The rows cut into calls of ``size`` rows, read as a stream."""
    while batch := list(itertools.islice(rows, size)):
        yield batch


def _collect(futures: set[Future[None]], return_when: str = ALL_COMPLETED) -> set[Future[None]]:
    """Wait for the futures (the first one, or all), raise what a worker raised; return the rest."""
    done, pending = wait(futures, return_when=return_when)
    for future in done:
        future.result()
    return pending


def _opted_out(held: Mapping[str, Consent], row: ConsentRow) -> bool:
    consent = held.get(row.recipient)
    return consent is not None and consent.opted_out


def _list_failed_row(failed_rows: list[dict[str, Any]], index: int, number: str, err: PepipostApiError) -> None:
    """One refused row for the XCom, which every DAG reader sees: its number masked."""
    if len(failed_rows) < FAILED_ROWS_LISTED:
        failed_rows.append(
            {
                "row": index,
                "recipient": mask_number(number),
                "error_code": err.code,
                "error_message": mask_numbers_in(err.message),
            }
        )
