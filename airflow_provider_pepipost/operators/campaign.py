"""The send loop of a campaign: concurrent, rate-limited, recorded in the ledger, never sending twice.

Kept apart from the operator so that the operator is Airflow glue and this is the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from airflow_provider_pepipost.errors import (
    FailureKind,
    PepipostApiError,
    PepipostConfigError,
    PepipostError,
    PepipostNotSentError,
    PepipostOutcomeUnknownError,
)
from airflow_provider_pepipost.hooks.loop_transport import Slots
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import (
    default_campaign_key,
    idempotency_key,
    is_derived_header,
    legacy_campaign_key,
)
from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in
from airflow_provider_pepipost.outgoing import OutgoingMessage
from airflow_provider_pepipost.status.ledger import (
    RESENDABLE_STATES,
    SUPPRESSED_REASON,
    Claim,
    ClaimAnswer,
    LedgerEntry,
    Outcome,
    RowRecord,
    TaskKey,
    campaign_hash,
)
from airflow_provider_pepipost.status.ledger_writer import LedgerWriter
from airflow_provider_pepipost.status.resolver import airflow_setting
from airflow_provider_pepipost.status.store import StatusStore


@dataclass(frozen=True, slots=True)
class RowOutcome:
    """What became of one input row; the XCom ``messages`` rows are these."""

    row: int
    recipient: str
    api_header: str
    message_id: str | None
    state: str  # accepted | fallback | rejected | unknown | duplicate | not_sent | suppressed
    error_code: str | None = None
    error_message: str | None = None
    reconciled: bool = False  # the id came from a delivery report, after an unknown outcome
    key: str | None = None  # the ledger row of the message that stands for the row

    def record(self) -> RowRecord:
        """The row as the store keeps it for the campaign page and its CSV."""
        return RowRecord(
            self.row, self.recipient, self.state, self.key, self.message_id, self.error_code, self.error_message
        )

    def to_dict(self, *, full_numbers: bool = False) -> dict[str, Any]:
        """The row for XCom ``messages``, which every user who can see the DAG may read: numbers
        masked (in free text too) unless ``full_numbers``; the row and the message id join it back
        to the status store, which keeps the whole number."""
        text = (lambda value: value) if full_numbers else _masked_text
        # A derived x-apiheader is a hash, which may hold a run of digits: kept as it is, since
        # reports are matched by it. A header of the user's own may hold a number: masked.
        header = self.api_header if is_derived_header(self.api_header) else text(self.api_header)
        return {
            "row": self.row,
            "recipient": self.recipient if full_numbers else mask_number(self.recipient),
            "x-apiheader": header,
            "message_id": self.message_id,
            "state": self.state,
            "error_code": self.error_code,
            "error_message": text(self.error_message),
        }


@dataclass
class CampaignResult:
    total: int
    counts: Counter = field(default_factory=Counter)  # state -> rows
    settled_now: Counter = field(default_factory=Counter)  # state -> rows this try settled (not reused)
    reused: int = 0  # accepted by an earlier try, not sent again
    error_codes: Counter = field(default_factory=Counter)
    outcomes: list[RowOutcome] | None = None  # in input order, when kept
    fatal: PepipostError | None = None  # stopped by an error no retry of the task can mend
    stopped: PepipostError | None = None  # stopped by an error a later try may not meet
    stopped_reason: str | None = None
    duplicate_rows: list[int] = field(default_factory=list)  # the first ones, for the log
    # The vendor's refusals by (code, message), numbers in the message masked: what a failure says.
    reasons: Counter = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "accepted": self.counts["accepted"],
            "fallback": self.counts["fallback"],
            "rejected": self.counts["rejected"],
            "unknown": self.counts["unknown"],
            "duplicate": self.counts["duplicate"],
            "not_sent": self.counts["not_sent"],
            "suppressed": self.counts["suppressed"],
            "reused_from_earlier_try": self.reused,
            "error_codes": dict(self.error_codes),
        }


class RateLimiter:
    """Spaces calls evenly at ``rate`` per second across threads."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            time.sleep(wait)

    def reserve(self) -> float:
        """Take the next slot; the seconds to wait for it."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next)
            self._next = slot + self.interval
        return slot - now


class CampaignSender:
    """Sends validated messages with ``max_workers`` threads, writing each one to the ledger first."""

    def __init__(
        self,
        hook: PepipostHook,
        store: StatusStore,
        task: TaskKey,
        *,
        total: int,
        campaign_key: str | None = None,
        generation: int = 0,
        resend_unknown: bool = False,
        respect_opt_outs: bool = True,
        max_workers: int = 16,
        max_rate: float | None = None,
        max_rejected_ratio: float = 0.0,
        max_unknown_ratio: float = 1.0,
        keep_outcomes: bool = True,
        progress_interval: float = 10.0,
        log: logging.Logger | Any = None,
        on_progress: Callable[[Counter], None] | None = None,
    ) -> None:
        self.hook = hook
        self.store = store
        self.task = task
        self.total = total
        self.campaign_key = campaign_key or default_campaign_key(task.dag_id, task.run_id, task.task_id)
        # With the default key, a retry after an upgrade from schema < 7 finds the earlier try's
        # rows under the key that named the map index.
        self.legacy_campaign_key = None if campaign_key else legacy_campaign_key(*task.instance)
        self.generation = generation
        self.resend_unknown = resend_unknown
        self.respect_opt_outs = respect_opt_outs
        self.max_workers = max_workers
        self.limiter = RateLimiter(max_rate) if max_rate else None
        self.max_rejected = int(max_rejected_ratio * total + 1e-9)
        self.max_unknown = int(max_unknown_ratio * total + 1e-9)
        self.keep_outcomes = keep_outcomes
        self.progress_interval = progress_interval
        self.log = log or logging.getLogger(__name__)
        # Given the rows this try settled, by state, with each progress line and at the end.
        self.on_progress = on_progress
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_log = 0.0
        self._fresh_unknown = 0
        self._rejected = 0  # rows rejected, by this try or an earlier one (max_rejected_ratio)
        self.result = CampaignResult(total=total, outcomes=[] if keep_outcomes else None)

    def run(self, messages: Iterable[tuple[int, OutgoingMessage]]) -> CampaignResult:
        self.ledger = LedgerWriter(
            self.store,
            self.task,
            resend_unknown=self.resend_unknown,
            campaign=self.campaign_key,
            generation=self.generation,
            check_opt_outs=self.respect_opt_outs,
        )
        whole = False
        try:
            result = self._run(messages)
            whole = True
            return result
        finally:
            # Every outcome is in the ledger before the task moves on.
            self.ledger.close(whole_audience=whole)
            if self.on_progress is not None:  # also when the campaign raised: what it did, it did
                self.on_progress(self.result.settled_now)

    def _run(self, messages: Iterable[tuple[int, OutgoingMessage]]) -> CampaignResult:
        earlier = self.store.open_ledger(self.task)
        if earlier:
            self._log_earlier_try(earlier)
        legacy = self._adopt_legacy_rows(earlier)
        resendable = (*RESENDABLE_STATES, "unknown") if self.resend_unknown else RESENDABLE_STATES
        started = time.monotonic()
        self._last_log = started
        with self._workers() as workers:
            pipeline = _Pipeline(self, workers)
            for row, message in messages:
                key = idempotency_key(self.campaign_key, message.recipient, message.identity())
                if message.api_header is None:
                    message = message.with_header(key)
                # Popped: a second row with the same key is a duplicate on every try, not a reuse.
                entry = self._earlier_entry(earlier, legacy, key, message)
                template = message.fallback

                def earlier_template(template: OutgoingMessage | None = template) -> LedgerEntry | None:
                    if template is None:
                        return None
                    return self._earlier_entry(earlier, legacy, self._fallback_key(template), template)

                decision = decide_row(
                    entry, earlier_template, has_fallback=template is not None, resendable=resendable,
                    stopped=self._stop.is_set(),
                )  # fmt: skip
                self._act(decision, pipeline, row, key, message)
                pipeline.drain_ready()
                self._log_progress_every_interval(started)
            pipeline.finish(started)
        self.hook.flush_retry_log()  # the retries' last summary before the last progress line
        self._log_progress(started)
        if self.result.outcomes is not None:
            self.result.outcomes.sort(key=lambda outcome: outcome.row)
        return self.result

    def _workers(self) -> _ThreadWorkers | _LoopWorkers:
        """The event loop (one thread, every send in flight on it) unless the send goes through a
        proxy, which only the threaded transport speaks, or ``[pepipost] send_transport`` says threads."""
        choice = (airflow_setting("send_transport") or "event_loop").strip().lower()
        if choice not in SEND_TRANSPORTS:
            raise PepipostConfigError(
                f"[pepipost] send_transport must be one of {', '.join(SEND_TRANSPORTS)}, not {choice!r}"
            )
        # A hook whose send_message is not PepipostHook's own (a subclass's, a stand-in's) is called
        # as it is, on the threads: the event loop would go around it.
        own_send = getattr(type(self.hook), "send_message", None) is PepipostHook.send_message
        if choice == "event_loop" and own_send and self.hook.event_loop_possible():
            return _LoopWorkers(self)
        return _ThreadWorkers(self)

    def _act(self, decision: RowDecision, pipeline: _Pipeline, row: int, key: str, message: OutgoingMessage) -> None:
        """Carry out what ``decide_row`` decided for one row."""
        if decision.action is Action.REUSE:
            outcome = self._from_ledger(row, decision.message_of(message), decision.settled_entry())
            self._record(_as_fallback(outcome) if decision.of_template else outcome, reused=True)
        elif decision.action is Action.NOT_SENT:
            self._record(self._not_sent(row, message, key))
        elif decision.action is Action.SEND_FALLBACK:
            pipeline.send_fallback(row, message)
        else:
            pipeline.claim(row, key, message)

    def _earlier_entry(
        self, earlier: dict[str, LedgerEntry], legacy: str | None, key: str, message: OutgoingMessage
    ) -> LedgerEntry | None:
        """What an earlier try recorded for this message (popped), under its key or the legacy one."""
        if not earlier:
            return None
        entry = earlier.pop(key, None)
        if entry is None and legacy is not None:
            entry = earlier.pop(idempotency_key(legacy, message.recipient, message.identity()), None)
        return entry

    def _adopt_legacy_rows(self, earlier: dict[str, LedgerEntry]) -> str | None:
        """The legacy campaign key when an earlier try (before schema 7) recorded rows under it;
        those rows then count in this campaign's summaries."""
        if self.legacy_campaign_key is None:
            return None
        old = campaign_hash(self.legacy_campaign_key)
        if not any(entry.campaign == old for entry in earlier.values()):
            return None
        self.store.adopt_campaign(self.task, old, campaign_hash(self.campaign_key))
        return self.legacy_campaign_key

    def _send_one(self, row: int, key: str, message: OutgoingMessage) -> RowOutcome:
        """Send one claimed message and record its outcome (a worker thread)."""
        if self._stop.is_set():
            return self._give_back(row, key, message, None)
        if self.limiter:
            self.limiter.acquire()
            if self._suppressed_since_claim(message.recipient):
                return self._suppressed_now(row, key, message)
        try:
            message_id = self.hook.send_message(message)
        except PepipostError as err:
            outcome = self._failed(row, key, message, err)
            return self._send_fallback(row, message) if outcome is None else outcome
        except BaseException:
            self._outcome_unknown(key)
            raise
        return self._accepted(row, key, message, message_id)

    async def _asend_one(self, row: int, key: str, message: OutgoingMessage) -> RowOutcome:
        """``_send_one`` as a coroutine on the send loop (_LoopWorkers); the store is read off the loop."""
        if self._stop.is_set():
            return self._give_back(row, key, message, None)
        if self.limiter:
            wait = self.limiter.reserve()
            if wait > 0:
                await asyncio.sleep(wait)
            loop = asyncio.get_running_loop()
            if await loop.run_in_executor(None, self._suppressed_since_claim, message.recipient):
                return self._suppressed_now(row, key, message)
        try:
            message_id = await self.hook.asend_message(message)
        except PepipostError as err:
            outcome = self._failed(row, key, message, err)
            return await self._asend_fallback(row, message) if outcome is None else outcome
        except BaseException:
            self._outcome_unknown(key)
            raise
        return self._accepted(row, key, message, message_id)

    def _suppressed_since_claim(self, recipient: str) -> bool:
        # Paced rows wait long after their claim: the suppression list is read again, so that how
        # long a STOP may go unheeded never depends on max_rate.
        return self.respect_opt_outs and bool(self.store.suppressed([recipient]))

    def _suppressed_now(self, row: int, key: str, message: OutgoingMessage) -> RowOutcome:
        self.ledger.record(Outcome(key, "suppressed", error_message=SUPPRESSED_REASON))
        return self._suppressed(row, message, key)

    def _accepted(self, row: int, key: str, message: OutgoingMessage, message_id: str) -> RowOutcome:
        self.ledger.record(Outcome(key, "accepted", message_id=message_id))
        return RowOutcome(row, message.recipient, message.api_header or key, message_id, "accepted", key=key)

    def _outcome_unknown(self, key: str) -> None:
        # Unexpected: the outcome of the request is not known, so it must not be resent.
        self.ledger.record(Outcome(key, "unknown", error_message="the send raised unexpectedly"))

    def _failed(self, row: int, key: str, message: OutgoingMessage, err: PepipostError) -> RowOutcome | None:
        """Record a send that failed; None when its fallback template is to be sent instead."""
        header = message.api_header or key  # always set by run(); kept total for direct callers
        recipient = message.recipient
        if isinstance(err, PepipostOutcomeUnknownError):
            self.ledger.record(Outcome(key, "unknown", error_message=str(err)))
            return RowOutcome(row, recipient, header, None, "unknown", error_message=str(err), key=key)
        if isinstance(err, PepipostNotSentError):
            # It never reached the vendor, after the hook's retries: the network or the connection.
            self._stop_campaign(err, fatal=not err.retryable)
            return self._give_back(row, key, message, err)
        if not isinstance(err, PepipostApiError):
            self._outcome_unknown(key)
            raise err
        if err.code == "8007" and message.fallback is not None:
            self.ledger.record(Outcome(key, "rejected", error_code=err.code, error_message=err.message))
            return None
        if err.kind is FailureKind.TRANSIENT:
            # The vendor turned it away (throttled, busy) through every retry: not processed.
            self._stop_campaign(err, fatal=False)
            return self._give_back(row, key, message, err)
        self.ledger.record(Outcome(key, "rejected", error_code=err.code, error_message=err.message))
        if err.kind is FailureKind.JOB:
            self._stop_campaign(err, fatal=True)
        return RowOutcome(row, recipient, header, None, "rejected", err.code, err.message, key=key)

    def _fallback_key(self, template: OutgoingMessage) -> str:
        return idempotency_key(self.campaign_key, template.recipient, template.identity())

    def _send_fallback(self, row: int, message: OutgoingMessage) -> RowOutcome:
        """The row's template message, sent where the session message met a closed window."""
        key, template, answer = self._claim_fallback(row, message)
        if not answer.granted:
            return _as_fallback(self._not_claimed(row, key, template, answer))
        return _as_fallback(self._send_one(row, key, template))

    async def _asend_fallback(self, row: int, message: OutgoingMessage) -> RowOutcome:
        """``_send_fallback`` on the send loop; the claim waits for its commit off the loop."""
        loop = asyncio.get_running_loop()
        key, template, answer = await loop.run_in_executor(None, self._claim_fallback, row, message)
        if not answer.granted:
            return _as_fallback(self._not_claimed(row, key, template, answer))
        return _as_fallback(await self._asend_one(row, key, template))

    def _claim_fallback(self, row: int, message: OutgoingMessage) -> tuple[str, OutgoingMessage, ClaimAnswer]:
        template = message.fallback
        if template is None:  # decide_row sends a fallback only for a message that has one
            raise ValueError(f"row {row} has no fallback template to send")
        key = self._fallback_key(template)
        if template.api_header is None:
            template = template.with_header(key)
        answer = self.ledger.claim_many([Claim(key, template.api_header or key, template.recipient, row)])[0]
        return key, template, answer

    def _not_claimed(self, row: int, key: str, message: OutgoingMessage, answer: ClaimAnswer) -> RowOutcome:
        """A row the ledger would not let go out: suppressed, sent before a clear, or a duplicate."""
        if answer.suppressed:
            return self._suppressed(row, message, key)
        if answer.taken_over is not None:
            return self._from_ledger(row, message, answer.taken_over)
        return self._duplicate(row, message, key)

    def _give_back(self, row: int, key: str, message: OutgoingMessage, err: PepipostError | None) -> RowOutcome:
        """A claimed row whose request never reached the vendor: a later try sends it."""
        reason = str(err) if err is not None else "the campaign stopped before it was sent"
        self.ledger.record(Outcome(key, "not_sent", error_message=reason))
        return self._not_sent(row, message, key, reason)

    @staticmethod
    def _not_sent(row: int, message: OutgoingMessage, key: str, reason: str | None = None) -> RowOutcome:
        reason = reason or "the campaign stopped before it was sent"
        header = message.api_header or ""
        return RowOutcome(row, message.recipient, header, None, "not_sent", error_message=reason, key=key)

    @staticmethod
    def _suppressed(row: int, message: OutgoingMessage, key: str) -> RowOutcome:
        header = message.api_header or ""
        return RowOutcome(row, message.recipient, header, None, "suppressed", error_message=SUPPRESSED_REASON, key=key)

    def _duplicate(self, row: int, message: OutgoingMessage, key: str) -> RowOutcome:
        if len(self.result.duplicate_rows) < 20:
            self.result.duplicate_rows.append(row)
        return RowOutcome(
            row, message.recipient, message.api_header or "", None, "duplicate",
            error_message="the same recipient and content as an earlier row of this campaign", key=key,
        )  # fmt: skip

    def _stop_campaign(self, err: PepipostError, *, fatal: bool) -> None:
        with self._lock:
            if self.result.fatal is None and self.result.stopped is None:
                if fatal:
                    self.result.fatal = err
                else:
                    self.result.stopped = err
                self.result.stopped_reason = str(err)
        self._stop.set()

    def _record(self, outcome: RowOutcome, reused: bool = False, *, weighed: bool = False) -> None:
        """Count what became of one row (the engine's thread). ``weighed``: a send's outcome, whose
        worker already weighed it against the stop ratios (``_weigh``)."""
        result = self.result
        result.counts[outcome.state] += 1
        if not reused:
            result.settled_now[outcome.state] += 1
        if reused and outcome.state in ("accepted", "fallback"):
            result.reused += 1  # accepted by an earlier try (its unknown rows count as unknown)
        if outcome.state == "rejected":
            result.error_codes[outcome.error_code or "none"] += 1
            reason = (outcome.error_code or "", mask_numbers_in(outcome.error_message or ""))
            if reason in result.reasons or len(result.reasons) < MAX_REASONS:
                result.reasons[reason] += 1
        if not weighed:
            self._weigh(outcome, reused)
        self.ledger.record_row(outcome.record())  # the page's and the CSV's row, one per input row
        if result.outcomes is not None:
            result.outcomes.append(outcome)

    def _weigh(self, outcome: RowOutcome, reused: bool = False) -> RowOutcome:
        """Stop the campaign when rejections or fresh unknowns pass their ratio. Called by the
        worker that made the outcome, so that no send starts after the one that tipped it."""
        with self._lock:
            if outcome.state == "rejected":
                self._rejected += 1
                if self._rejected > self.max_rejected and not self._stop.is_set():
                    self.result.stopped_reason = (
                        f"{self._rejected} rejections exceed max_rejected_ratio "
                        f"({self.max_rejected} of {self.total} allowed)"
                    )
                    self._stop.set()
            if outcome.state == "unknown" and not reused:
                self._fresh_unknown += 1  # this try's evidence; rows an earlier try left unknown are not
            if outcome.state == "unknown" and self._fresh_unknown > self.max_unknown and not self._stop.is_set():
                # A gateway or proxy failing after the requests left: each further row would end
                # the same way, unknown and never resent. Stop; a later try sends the rest.
                self.result.stopped_reason = (
                    f"{self._fresh_unknown} unknown outcomes in this try exceed max_unknown_ratio "
                    f"({self.max_unknown} of {self.total} allowed): the answers came back broken after the "
                    "requests left. Check the vendor's status, and any gateway or proxy between (HTTP_PROXY / "
                    "HTTPS_PROXY); the rows not sent yet go out on the next try"
                )
                self._stop.set()
        return outcome

    @staticmethod
    def _from_ledger(row: int, message: OutgoingMessage, entry: LedgerEntry) -> RowOutcome:
        return RowOutcome(
            row, message.recipient, entry.api_header, entry.message_id, entry.state,
            entry.error_code, entry.error_message, reconciled=entry.reconciled, key=entry.idempotency_key,
        )  # fmt: skip

    def _log_earlier_try(self, earlier: dict[str, LedgerEntry]) -> None:
        states = Counter(entry.state for entry in earlier.values())
        again = ("rejected", "not_sent", "unknown") if self.resend_unknown else ("rejected", "not_sent")
        self.log.info(
            "An earlier try of this task recorded %d rows (%s). Sent again now if still in the audience: %s; "
            "never sent again: the rest%s",
            len(earlier), ", ".join(f"{state} {n}" for state, n in sorted(states.items())),
            " and ".join(again),
            "" if self.resend_unknown else " (unknown outcomes are reconciled from delivery reports)",
        )  # fmt: skip

    def _log_progress_every_interval(self, started: float) -> None:
        if time.monotonic() - self._last_log >= self.progress_interval:
            self._log_progress(started)
            self._last_log = time.monotonic()

    def _log_progress(self, started: float) -> None:
        elapsed = max(time.monotonic() - started, 1e-6)
        counts = self.result.counts
        done = sum(counts.values())
        states = ", ".join(f"{label} {counts[state]}" for state, label in PROGRESS_STATES)
        self.log.info(
            "Processed %d of %d rows (%.0f%%), %.1f rows/s: %s",
            done, self.total, 100.0 * done / max(self.total, 1), done / elapsed, states,
        )  # fmt: skip
        if self.on_progress is not None:
            self.on_progress(self.result.settled_now)


# [pepipost] send_transport: how a campaign's requests are made (event_loop: unless a proxy applies).
SEND_TRANSPORTS = ("event_loop", "threads")

MAX_REASONS = 100  # distinct refusal texts kept: the vendor's texts vary, memory must not

# Every state a row can end in, as the progress line names them: they add up to the rows processed.
PROGRESS_STATES = (
    ("accepted", "accepted"),
    ("fallback", "fallback template"),
    ("rejected", "rejected"),
    ("unknown", "unknown"),
    ("duplicate", "duplicate"),
    ("not_sent", "not sent"),
    ("suppressed", "opted out"),
)


class Action(str, Enum):
    """What the engine does with one input row before any request."""

    REUSE = "reuse"  # an earlier try settled it: its outcome stands, nothing is sent
    NOT_SENT = "not_sent"  # the campaign has stopped: a later try sends it
    SEND_FALLBACK = "send_fallback"  # an earlier try met the closed window: straight to the template
    CLAIM = "claim"  # claim it in the ledger, then send it if the claim is granted


@dataclass(frozen=True)
class RowDecision:
    action: Action
    entry: LedgerEntry | None = None  # the earlier try's entry that stands (REUSE)
    of_template: bool = False  # that entry is the row's fallback template

    def message_of(self, message: OutgoingMessage) -> OutgoingMessage:
        """The message the settled entry stands for: the row's own, or its fallback template."""
        return message.fallback if self.of_template and message.fallback is not None else message

    def settled_entry(self) -> LedgerEntry:
        if self.entry is None:
            raise ValueError(f"a {self.action.value} decision carries no ledger entry")
        return self.entry


def decide_row(
    entry: LedgerEntry | None,
    earlier_template: Callable[[], LedgerEntry | None],
    *,
    has_fallback: bool,
    resendable: tuple[str, ...],
    stopped: bool,
) -> RowDecision:
    """The per-row rule, from what an earlier try of this task recorded for the row.

    ``entry`` is the earlier try's row for the message (None: none), ``earlier_template`` looks up
    the one for its fallback template (only asked when the session message met a closed window).
    """
    if has_fallback and _closed_window(entry):
        template_entry = earlier_template()
        if template_entry is not None and template_entry.state not in resendable:
            return RowDecision(Action.REUSE, template_entry, of_template=True)
        return RowDecision(Action.NOT_SENT if stopped else Action.SEND_FALLBACK)
    if entry is not None and entry.state not in resendable:
        return RowDecision(Action.REUSE, entry)
    return RowDecision(Action.NOT_SENT if stopped else Action.CLAIM)


# A send that finished (its result() is the RowOutcome, or raises), handed to the engine's thread.
Done = Callable[[Any], None]


class _ThreadWorkers:
    """The sends on ``max_workers`` threads, each through the threaded transport."""

    def __init__(self, sender: CampaignSender) -> None:
        self.sender = sender
        self.pool = ThreadPoolExecutor(sender.max_workers, thread_name_prefix="pepipost-send")

    def send_many(self, claimed: list[tuple[int, str, OutgoingMessage]], done: Done) -> None:
        sender = self.sender
        for row, key, message in claimed:
            self.pool.submit(self._weighed, sender._send_one, row, key, message).add_done_callback(done)

    def send_fallback(self, row: int, message: OutgoingMessage, done: Done) -> None:
        self.pool.submit(self._weighed, self.sender._send_fallback, row, message).add_done_callback(done)

    def _weighed(self, send: Callable[..., RowOutcome], *args: Any) -> RowOutcome:
        return self.sender._weigh(send(*args))

    def __enter__(self) -> _ThreadWorkers:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:  # the campaign raised: the sends not begun give their rows back
            self.sender._stop.set()
        self.pool.shutdown(wait=True)


class _LoopWorkers:
    """The sends as coroutines on one event loop thread, ``max_workers`` in flight at most.

    A thread a send cost a hand-off of the GIL and http.client's work per request: at 1,000
    messages a second, a core (docs/benchmarks.md). A batch of claimed rows crosses to the loop in
    one hand-off; each finished send comes back as its task (``done``). The store is never read or
    written on the loop (the ledger writer's thread, or the loop's executor, does it).
    """

    def __init__(self, sender: CampaignSender) -> None:
        self.sender = sender
        self.loop = _new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="pepipost-send-loop", daemon=True)
        self.slots = Slots(sender.max_workers)

    def send_many(self, claimed: list[tuple[int, str, OutgoingMessage]], done: Done) -> None:
        sender = self.sender
        sends = [sender._asend_one(row, key, message) for row, key, message in claimed]
        self.loop.call_soon_threadsafe(self._start, sends, done)

    def send_fallback(self, row: int, message: OutgoingMessage, done: Done) -> None:
        self.loop.call_soon_threadsafe(self._start, [self.sender._asend_fallback(row, message)], done)

    def _start(self, sends: list[Coroutine[Any, Any, RowOutcome]], done: Done) -> None:
        for send in sends:
            task = self.loop.create_task(self._bounded(send))
            task.add_done_callback(_seen)
            task.add_done_callback(done)

    async def _bounded(self, send: Coroutine[Any, Any, RowOutcome]) -> RowOutcome:
        async with self.slots:
            return self.sender._weigh(await send)

    def __enter__(self) -> _LoopWorkers:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None:  # the campaign raised: the sends not begun give their rows back
            self.sender._stop.set()
        try:
            asyncio.run_coroutine_threadsafe(self._wind_down(), self.loop).result()
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join()
            self.loop.close()

    async def _wind_down(self) -> None:
        """Wait for the sends still in flight (each bounded by the hook's deadline and retries, as
        the threads' are), then close the connections and the loop's executor."""
        pending = {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}
        if pending:
            await asyncio.wait(pending)
        self.sender.hook.aclose()
        await self.loop.shutdown_default_executor()


def _seen(task: asyncio.Task) -> None:
    """Mark a send's error as seen: the engine's thread raises it from ``result()``, or it is moot
    because the campaign already raised; asyncio would otherwise log it, with whatever text it holds."""
    if not task.cancelled():
        task.exception()


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop where it is installed (it comes with Airflow's uvicorn), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Pipeline:
    """Claims rows a batch at a time and keeps the workers fed, never more than a window ahead.

    Claims are committed by the engine's thread, a batch at a time, while the workers send the
    batch before: no worker waits on a commit. The price: a try killed outright can leave up to
    ``window`` claimed rows 'unknown' (never resent), not only the ``max_workers`` being sent. Each
    claim checks the suppression list in its transaction, so a STOP stored while the campaign runs
    stops every row claimed after it: at most this one batch ahead.
    """

    def __init__(self, sender: CampaignSender, workers: _ThreadWorkers | _LoopWorkers) -> None:
        self.sender, self.workers = sender, workers
        self.batch_size = max(1, sender.max_workers // 2)
        self.window = sender.max_workers + 2 * self.batch_size
        # Finished sends arrive here; waiting on a queue costs the same whatever is in flight.
        self.finished: queue.SimpleQueue[Any] = queue.SimpleQueue()  # Futures (threads), Tasks (loop)
        self.batch: list[tuple[int, str, OutgoingMessage]] = []
        self.in_flight = 0

    def send_fallback(self, row: int, message: OutgoingMessage) -> None:
        self.in_flight += 1
        self.workers.send_fallback(row, message, self.finished.put)

    def claim(self, row: int, key: str, message: OutgoingMessage) -> None:
        self.batch.append((row, key, message))
        if len(self.batch) >= self.batch_size:
            self._claim_batch()

    def _claim_batch(self) -> None:
        sender = self.sender
        claims = [Claim(key, msg.api_header or key, msg.recipient, row) for row, key, msg in self.batch]
        granted = []
        for (row, key, message), answer in zip(self.batch, sender.ledger.claim_many(claims), strict=True):
            if answer.granted:
                granted.append((row, key, message))
            else:
                sender._record(sender._not_claimed(row, key, message, answer), reused=answer.taken_over is not None)
        self.in_flight += len(granted)
        self.workers.send_many(granted, self.finished.put)
        self.batch.clear()

    def drain_ready(self) -> None:
        """Record what finished; keep one batch queued behind the workers, so that they never
        wait for the next claim, and no more."""
        while self.in_flight > self.window - self.batch_size or not self.finished.empty():
            self.sender._record(self.finished.get().result(), weighed=True)
            self.in_flight -= 1

    def finish(self, started: float) -> None:
        """Claim the last batch (unless the campaign stopped) and wait for every send."""
        sender = self.sender
        if self.batch and not sender._stop.is_set():
            self._claim_batch()
        for row, key, message in self.batch:  # the campaign stopped while they waited for a claim
            sender._record(sender._not_sent(row, message, key))
        while self.in_flight:
            try:
                sender._record(self.finished.get(timeout=sender.progress_interval).result(), weighed=True)
                self.in_flight -= 1
            except queue.Empty:
                pass
            sender._log_progress_every_interval(started)


def _masked_text(value: str | None) -> str | None:
    return mask_numbers_in(value) if value else value


def _closed_window(entry: LedgerEntry | None) -> bool:
    return entry is not None and entry.state == "rejected" and entry.error_code == "8007"


def _as_fallback(outcome: RowOutcome) -> RowOutcome:
    """A template sent in a session message's stead counts apart from the session messages."""
    return dataclasses.replace(outcome, state="fallback") if outcome.state == "accepted" else outcome
