"""WhatsAppConsentOperator: record opt-ins and opt-outs with the vendor, in batches, once each."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_provider_pepipost.audience import Audience
from airflow_provider_pepipost.connection_form import DEFAULT_CONN_ID
from airflow_provider_pepipost.consent import (
    CONSENT_KINDS,
    ConsentDefaults,
    ConsentRow,
    build_consent_row,
)
from airflow_provider_pepipost.errors import (
    CampaignError,
    FailureKind,
    MessageValidationError,
    PepipostApiError,
    PepipostConfigError,
    PepipostError,
)
from airflow_provider_pepipost.hooks.pepipost import PepipostHook
from airflow_provider_pepipost.messages import iter_messages, validate_rows
from airflow_provider_pepipost.numbers import mask_number, mask_numbers_in, phone_or_none
from airflow_provider_pepipost.status.consent import Consent, ConsentBatch
from airflow_provider_pepipost.status.ledger import TaskKey
from airflow_provider_pepipost.status.resolver import store_source
from airflow_provider_pepipost.status.store import StatusStore, open_store

if TYPE_CHECKING:
    from airflow.sdk import Context

FAILED_ROWS_LISTED = 100  # rows of refused batches named in the XCom; the counts hold them all
REPLY_SYNC_LIMIT = 100_000  # reply opt-outs passed on to the vendor per run
PROGRESS_INTERVAL = 10.0  # seconds between progress lines in the task log


@dataclass
class _Tally:
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


@dataclass
class _OptOutPass:
    """Opt-outs passed on to the vendor: those taken from replies, and the STOPs that raced an opt-in."""

    synced: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # not a number the vendor can take
    refused: list[tuple[str, str]] = field(default_factory=list)  # (number, the vendor's reason), one by one
    refused_calls: int = 0
    not_confirmed: int = 0
    error: PepipostError | None = None
    stop: PepipostError | None = None  # an error every further call would meet (a refused key)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def unsynced(self) -> int:
        return len(self.invalid) + len(self.refused) + self.not_confirmed


class WhatsAppConsentOperator(BaseOperator):
    """Opt recipients in to (or out of) WhatsApp messages through Pepipost's consent API.

    Pepipost checks an opt-in before every send (8002 otherwise). Every row is validated before
    the first call; rows go in batches of ``batch_size``, ``max_workers`` batches at a time. The
    vendor's answer does not say which row of a refused batch was wrong, so a refused batch is
    reported with all its rows. Each confirmed batch is recorded in the status store: a retried
    task does not call the vendor again for it. A confirmed opt-out puts its numbers on the
    store's suppression list, which both send operators honour; a confirmed opt-in takes them off.

    :param recipients: phone numbers, or row dicts (``recipient``, optional ``source``,
        ``user_agent``, ``ip``), or a path to a CSV / JSON Lines file, read as a stream; usually
        an upstream task's XCom. (templated)
    :param kind: ``optin`` or ``optout``. (templated)
    :param source: where the consent came from, for rows that give none (the vendor requires it,
        at most 25 characters). (templated)
    :param user_agent: user agent for rows that give none. (templated)
    :param ip: IP address for rows that give none; validated. (templated)
    :param batch_size: recipients per call. The vendor does not document a limit for this API;
        keep it modest.
    :param max_workers: calls in flight at once.
    :param max_rejected_ratio: share of rows whose batch the vendor may refuse before the task
        fails (without Airflow retries: the same rows would be refused again).
    :param sync_reply_opt_outs: also pass on to the vendor, as opt-outs, the numbers that opted
        out by replying a stop word (recorded by the webhook receiver, which never calls the
        vendor itself). Each is passed on once. A batch the vendor refuses is split until the
        numbers it refuses stand alone; the task fails while any of them is not passed on.
    :param reply_opt_out_source: the ``source`` of those opt-outs.
    :param lift_opt_outs: for ``optin``: also opt in numbers on the suppression list, taking them
        off it. Off by default: a sign-up list processed again must not undo a later "STOP".
        Set it only for rows that record a new consent given after the opt-out. Only opt-outs
        recorded before a batch was read are lifted: a STOP that arrives while the batch is with
        the vendor always stays, and is passed on to the vendor.
    :param pepipost_conn_id: the Pepipost connection.
    :param status_store_conn_id: Airflow connection of the status store (see the send operators).

    Returns (XCom ``return_value``) the counts: ``kind``, ``total``, ``confirmed``, ``refused``,
    ``not_confirmed``, ``skipped_opted_out``, ``opted_out_during_call``, ``batches``,
    ``batches_reused``, ``reply_opt_outs_synced``, ``reply_opt_outs_refused``,
    ``reply_opt_outs_invalid``, ``reply_opt_outs_not_confirmed``, and ``failed_rows`` (the first
    100 rows the vendor refused: row, masked recipient, error_code, error_message).
    """

    template_fields: Sequence[str] = ("recipients", "kind", "source", "user_agent", "ip")
    template_fields_renderers = {"recipients": "py"}
    ui_color = "#25d366"

    def __init__(
        self,
        *,
        recipients: Any = None,
        kind: str = "optin",
        source: str | None = None,
        user_agent: str | None = None,
        ip: str | None = None,
        batch_size: int = 100,
        max_workers: int = 4,
        max_rejected_ratio: float = 0.0,
        sync_reply_opt_outs: bool = False,
        reply_opt_out_source: str = "WHATSAPP_REPLY",
        lift_opt_outs: bool = False,
        pepipost_conn_id: str = DEFAULT_CONN_ID,
        status_store_conn_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.recipients = recipients
        self.kind = kind
        self.source = source
        self.user_agent = user_agent
        self.ip = ip
        self.batch_size = batch_size
        self.max_workers = max_workers
        self.max_rejected_ratio = max_rejected_ratio
        self.sync_reply_opt_outs = sync_reply_opt_outs
        self.reply_opt_out_source = reply_opt_out_source
        self.lift_opt_outs = lift_opt_outs
        self.pepipost_conn_id = pepipost_conn_id
        self.status_store_conn_id = status_store_conn_id

    @cached_property
    def hook(self) -> PepipostHook:
        """The Pepipost hook, built once per task instance, its pool sized to the workers."""
        return PepipostHook(self.pepipost_conn_id, pool_size=self.max_workers)

    def _check_settings(self) -> None:
        if self.kind not in CONSENT_KINDS:
            raise AirflowFailException(f"kind must be one of {CONSENT_KINDS}, not {self.kind!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise AirflowFailException(f"batch_size must be a whole number of at least 1, not {self.batch_size!r}")
        if self.max_workers < 1:
            raise AirflowFailException(f"max_workers must be at least 1, not {self.max_workers!r}")
        if not 0.0 <= self.max_rejected_ratio <= 1.0:
            raise AirflowFailException(f"max_rejected_ratio must be between 0 and 1, not {self.max_rejected_ratio!r}")
        if self.recipients is None and not self.sync_reply_opt_outs:
            raise AirflowFailException("recipients: is required (unless the task only syncs reply opt-outs)")

    def execute(self, context: Context) -> dict[str, Any]:
        self._check_settings()
        defaults = ConsentDefaults(self.source or None, self.user_agent or None, self.ip or None)
        audience: Audience | list[Any] = []
        total = 0
        try:
            if self.recipients is not None:
                audience = Audience(self.recipients, number_columns=("recipient", "recipient_whatsapp"))
                self.log.info("Validating recipients from %s", audience.source_description)
            total = validate_rows(audience, defaults, build_consent_row)
        except (MessageValidationError, PepipostConfigError) as err:
            raise AirflowFailException(str(err).replace("nothing was sent", "no consent was recorded")) from err
        if self.recipients is not None and not total:
            raise AirflowFailException("recipients: holds no rows; there is no consent to record")

        ti = context["ti"]
        task = TaskKey(ti.dag_id, ti.run_id, ti.task_id, ti.map_index if ti.map_index is not None else -1)
        self.log.info("Status store: %s", store_source(self.status_store_conn_id))
        store = open_store(self.status_store_conn_id)
        hook = self.hook
        tally = _Tally()
        earlier = store.consent_batches(task)
        if earlier:
            confirmed = sum(1 for b in earlier.values() if b.state == "confirmed")
            self.log.info(
                "An earlier try recorded %d consent call(s), %d confirmed: not called again", len(earlier), confirmed
            )
        try:
            rows = iter_messages(audience, defaults, build_consent_row)
            self._call_all(hook, store, task, self.kind, _batches(rows, self.batch_size), earlier, tally, total)
            # Reply opt-outs, and the STOPs that came while their opt-in was with the vendor.
            numbers = store.reply_opt_outs(REPLY_SYNC_LIMIT) if self.sync_reply_opt_outs else []
            numbers = list(dict.fromkeys([*tally.opted_out_during_call, *numbers]))
            passed = self._pass_on_opt_outs(hook, store, numbers, tally) if numbers else _OptOutPass()
            if self.sync_reply_opt_outs and not numbers:
                self.log.info("No opt-out from a reply is waiting to be passed on to the vendor")
        finally:
            hook.close()
        return self._judge(tally, total, passed)

    def _call_all(
        self,
        hook: PepipostHook,
        store: StatusStore,
        task: TaskKey,
        kind: str,
        batches: Iterator[list[tuple[int, ConsentRow]]],
        earlier: dict[str, ConsentBatch],
        tally: _Tally,
        total: int,
    ) -> None:
        """Call the vendor for every batch not confirmed before; a confirmed batch also moves its
        numbers on or off the suppression list."""
        started = last_log = time.monotonic()
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pepipost-consent") as pool:
            in_flight: dict[Future, list[tuple[int, ConsentRow]]] = {}

            def collect(futures: set[Future]) -> None:
                for future in futures:
                    future.result()
                    del in_flight[future]

            for batch in batches:
                # Keyed on the input rows, before any is skipped: a STOP between two tries must not
                # re-cut the batches, or the second try would call again for confirmed ones.
                key = batch_key(task, kind, [row for _, row in batch])
                tally.batches += 1
                known = earlier.get(key)
                if known is not None and known.state == "confirmed":
                    tally.batches_reused += 1
                    tally.confirmed += known.rows
                    tally.skipped_opted_out += len(batch) - known.rows
                    continue
                call = (hook, store, task, kind, key, batch, tally)
                in_flight[pool.submit(self._call_one, *call)] = batch
                if len(in_flight) >= 2 * self.max_workers:
                    collect(wait(in_flight, return_when=FIRST_COMPLETED).done)
                if time.monotonic() - last_log >= PROGRESS_INTERVAL:
                    last_log = time.monotonic()
                    self._log_progress(kind, tally, total, started)
            collect(wait(in_flight).done)
        self._log_progress(kind, tally, total, started)

    def _call_one(
        self,
        hook: PepipostHook,
        store: StatusStore,
        task: TaskKey,
        kind: str,
        key: str,
        batch: list[tuple[int, ConsentRow]],
        tally: _Tally,
    ) -> None:
        """One consent call, its outcome recorded."""
        if tally.stop is not None:
            with tally.lock:
                tally.not_confirmed += len(batch)
            return
        # What the list holds now: the opt-in is recorded only where it still holds this after the call.
        held = store.consents(row.recipient for _, row in batch) if kind == "optin" else {}
        if kind == "optin" and not self.lift_opt_outs:
            kept = [(index, row) for index, row in batch if not _opted_out(held, row.recipient)]
            with tally.lock:
                tally.skipped_opted_out += len(batch) - len(kept)
            batch = kept
            if not batch:
                return
        rows = [row for _, row in batch]
        try:
            hook.manage_consent(kind, rows)
        except PepipostApiError as err:
            if err.is_transient or err.kind is FailureKind.JOB:
                with tally.lock:
                    tally.not_confirmed += len(batch)
                    if err.kind is FailureKind.JOB:
                        tally.stop = tally.stop or err
                    else:
                        tally.transient = tally.transient or err
                return
            store.record_consent_batch(task, ConsentBatch(key, kind, len(rows), "refused", err.code, err.message))
            with tally.lock:
                tally.refused += len(batch)
                for index, row in batch:
                    _list_failed_row(tally.failed_rows, index, row.recipient, err)
            self.log.warning(
                "The vendor refused the %s batch of rows %d-%d (%s): %s",
                kind, batch[0][0], batch[-1][0], err.code or err.http_status, err.message,
            )  # fmt: skip
            return
        except PepipostError as err:
            # Not sent, or an answer that cannot tell: consent calls are idempotent, so the next
            # try calls again. Nothing is recorded.
            with tally.lock:
                tally.not_confirmed += len(batch)
                tally.transient = tally.transient or err
            return
        numbers = [row.recipient for row in rows]
        changed = store.record_consent_batch(task, ConsentBatch(key, kind, len(rows), "confirmed"), numbers, held)
        raced = sorted(store.suppressed(changed)) if changed else []
        with tally.lock:
            tally.confirmed += len(batch) - len(raced)
            tally.opted_out_during_call += raced
        if raced:
            self.log.warning(
                "%d number(s) of the opt-in batch of rows %d-%d said STOP while the call was with the vendor: "
                "they stay opted out, and their opt-out is passed on to the vendor",
                len(raced), batch[0][0], batch[-1][0],
            )  # fmt: skip

    def _pass_on_opt_outs(
        self, hook: PepipostHook, store: StatusStore, numbers: list[str], tally: _Tally
    ) -> _OptOutPass:
        """Pass opt-outs on to the vendor in batches, isolating the numbers it refuses; mark each
        reply opt-out passed on once confirmed."""
        passed = _OptOutPass()
        valid = []
        for number in numbers:  # checked first: one bad number must not cost its batch
            (valid if phone_or_none(number) == number else passed.invalid).append(number)
        if tally.stop is not None:
            passed.not_confirmed += len(valid)
            return passed
        self.log.info("Passing on %d opt-out(s) to the vendor", len(valid))
        with ThreadPoolExecutor(self.max_workers, thread_name_prefix="pepipost-opt-out") as pool:
            for start in range(0, len(valid), self.batch_size):
                pool.submit(self._opt_out_isolating, hook, valid[start : start + self.batch_size], passed)
        store.mark_reply_opt_outs_synced(passed.synced)
        if passed.unsynced:
            self.log.warning(
                "%d opt-out(s) were not passed on to the vendor (%d refused, %d not valid numbers, %d not "
                "confirmed); they stay on the suppression list, and the next run tries them again",
                passed.unsynced, len(passed.refused), len(passed.invalid), passed.not_confirmed,
            )  # fmt: skip
        return passed

    def _opt_out_isolating(self, hook: PepipostHook, numbers: list[str], passed: _OptOutPass) -> None:
        """One opt-out call; a batch the vendor refuses is split in two until the refused numbers
        stand alone, so that one bad number never keeps the others from the vendor."""
        if passed.stop is not None:
            with passed.lock:
                passed.not_confirmed += len(numbers)
            return
        try:
            hook.manage_consent("optout", [ConsentRow(number, self.reply_opt_out_source) for number in numbers])
        except PepipostApiError as err:
            if err.is_transient or err.kind is FailureKind.JOB:
                failure = err
            else:
                with passed.lock:
                    passed.refused_calls += 1
                    if len(numbers) == 1:
                        passed.refused.append((numbers[0], f"{err.code or err.http_status}: {err.message}"))
                        return
                middle = len(numbers) // 2
                self._opt_out_isolating(hook, numbers[:middle], passed)
                self._opt_out_isolating(hook, numbers[middle:], passed)
                return
        except PepipostError as err:  # not sent, or an answer that cannot tell: the next run tries again
            failure = err
        else:
            with passed.lock:
                passed.synced += numbers
            return
        with passed.lock:
            passed.not_confirmed += len(numbers)
            passed.error = passed.error or failure
            if isinstance(failure, PepipostApiError) and failure.kind is FailureKind.JOB:
                passed.stop = passed.stop or failure

    def _log_progress(self, kind: str, tally: _Tally, total: int, started: float) -> None:
        done = tally.confirmed + tally.refused + tally.not_confirmed
        self.log.info(
            "Consent (%s): %d of %d rows done in %.1fs: confirmed %d, refused %d, not confirmed %d",
            kind, done, total, time.monotonic() - started, tally.confirmed, tally.refused, tally.not_confirmed,
        )  # fmt: skip

    def _judge(self, tally: _Tally, total: int, passed: _OptOutPass) -> dict[str, Any]:
        result = {
            "kind": self.kind,
            "total": total,
            "confirmed": tally.confirmed,
            "refused": tally.refused,
            "not_confirmed": tally.not_confirmed,
            "skipped_opted_out": tally.skipped_opted_out,
            "opted_out_during_call": len(tally.opted_out_during_call),
            "batches": tally.batches,
            "batches_reused": tally.batches_reused,
            "reply_opt_outs_synced": len(passed.synced),
            "reply_opt_outs_refused": len(passed.refused),
            "reply_opt_outs_invalid": len(passed.invalid),
            "reply_opt_outs_not_confirmed": passed.not_confirmed,
            "failed_rows": tally.failed_rows,
        }
        counts = {k: v for k, v in result.items() if k != "failed_rows"}
        if (stop := tally.stop or passed.stop) is not None:
            raise AirflowFailException(f"Consent calls stopped: {stop}. Counts: {counts}")
        allowed = int(self.max_rejected_ratio * total + 1e-9)
        if tally.refused > allowed:
            shown = ", ".join(f"row {r['row']} ({r['recipient']})" for r in tally.failed_rows[:5])
            raise AirflowFailException(
                f"The vendor refused {tally.refused} of {total} rows, more than max_rejected_ratio allows ({allowed}); "
                f"a retry would meet the same refusals. First refused: {shown}. Counts: {counts}"
            )
        if tally.not_confirmed:
            raise CampaignError(
                f"{tally.not_confirmed} row(s) were not confirmed by the vendor ({tally.transient}); the confirmed "
                f"batches are recorded, and the next try calls only the others. Counts: {counts}"
            )
        if passed.refused or passed.invalid:
            shown = [f"{mask_number(number)} ({reason})" for number, reason in passed.refused[:5]]
            shown += [f"{mask_number(number)} (not a number of 10 to 15 digits)" for number in passed.invalid[:5]]
            raise AirflowFailException(
                f"{len(passed.refused) + len(passed.invalid)} opt-out(s) could not be passed on to the vendor: "
                f"{', '.join(shown)}. They stay on the status store's suppression list and are never messaged; "
                f"every run that passes opt-outs on tries them again. The other {len(passed.synced)} were passed "
                f"on. Counts: {counts}"
            )
        if passed.not_confirmed:
            raise CampaignError(
                f"{passed.not_confirmed} opt-out(s) were not confirmed by the vendor ({passed.error}); they stay on "
                f"the suppression list, and the next try passes them on. Counts: {counts}"
            )
        if tally.skipped_opted_out:
            self.log.warning(
                "%d number(s) opted out earlier (a stop word, or an opt-out) and were not opted in again. If they "
                "gave their consent anew, opt them in with lift_opt_outs=True.",
                tally.skipped_opted_out,
            )
        self.log.info("Done: %s", counts)
        return result


def batch_key(task: TaskKey, kind: str, rows: Sequence[ConsentRow]) -> str:
    """The identity of one consent call of one task instance: the same rows give the same key."""
    content = json.dumps([kind, *task.instance, [row.to_payload() for row in rows]], separators=(",", ":"))
    return "cb-" + hashlib.sha256(content.encode()).hexdigest()[:40]


def _batches(rows: Iterator[tuple[int, ConsentRow]], size: int) -> Iterator[list[tuple[int, ConsentRow]]]:
    while batch := list(itertools.islice(rows, size)):
        yield batch


def _opted_out(held: dict[str, Consent], number: str) -> bool:
    consent = held.get(number)
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
