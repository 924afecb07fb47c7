"""The status store: the send ledger and every delivery event, in the provider's own database.

SQLAlchemy Core over an embedded SQLite file by default, or any SQLAlchemy URL (PostgreSQL in
production). Never Airflow's metadata database: Airflow 3 tasks may not touch it.

``StatusStore`` owns the transactions and the schema; the SQL lives with its job: ``ledger``
(what was sent), ``ingest`` (what the webhook reported), ``summaries`` (reading it back),
``consent`` (the suppression list and consent calls) and ``engines`` (connections and dialects).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, func, select, update
from sqlalchemy import exc as sa_exc

from airflow_provider_pepipost.approvals import Confirmation
from airflow_provider_pepipost.errors import PepipostConfigError, StatusStoreUnavailable
from airflow_provider_pepipost.numbers import canonical_number
from airflow_provider_pepipost.status import (
    approvals,
    consent,
    ingest,
    ledger,
    replies,
    reply_feed,
    reports,
    retention,
    schema,
    summaries,
)
from airflow_provider_pepipost.status.consent import Consent, ConsentBatch
from airflow_provider_pepipost.status.engines import (
    get_engine,
    insert_for,
    redact_url,
    sqlite_write_lock,
    transaction_lock,
)
from airflow_provider_pepipost.status.inbound import DeadLetter, InboundMessage, WebhookBatch
from airflow_provider_pepipost.status.ingest import IngestResult
from airflow_provider_pepipost.status.ledger import Claim, ClaimAnswer, LedgerEntry, Outcome, RowRecord, TaskKey
from airflow_provider_pepipost.status.migrations import migrate
from airflow_provider_pepipost.status.model import DeliveryEvent, DeliverySummary
from airflow_provider_pepipost.status.resolver import ERASURE_KEY_ENV, erasure_key, resolve_store_url, store_source

__all__ = ["StatusStore", "TaskKey", "open_store"]

_SCHEMA_READY: set[str] = set()


def open_store(conn_id: str | None = None, *, url: str | None = None) -> StatusStore:
    """The one way every part opens the status store: ``url`` when given (a command line's),
    else the store resolver's answer for ``conn_id`` (see ``status.resolver``). Errors name where
    the store came from: the connection, the variable or the setting to check."""
    if url:
        return StatusStore(url, source="the URL given")
    source = store_source(conn_id)
    try:
        resolved = resolve_store_url(conn_id)
    except PepipostConfigError:
        raise
    except Exception as err:  # the connection is not defined, or a secrets backend failed
        raise StatusStoreUnavailable(
            f"The status store's {source} could not be read: {type(err).__name__}: {str(err)[:200]}. Define that "
            "connection (type postgres or sqlite) in Airflow, or name another with status_store_conn_id"
        ) from err
    return StatusStore(resolved, source=source)


# transaction_lock's key for creating and migrating the schema ("pepS" in ASCII).
SCHEMA_LOCK = 0x70657053


class StatusStore:
    """The ledger of sent messages and the delivery events reported for them."""

    def __init__(self, url: str | None = None, *, source: str | None = None) -> None:
        self.url = url or resolve_store_url()
        self.source = source  # where the URL came from, in words: what an error asks to check
        try:
            self.engine = get_engine(self.url)
        except OSError as err:  # the SQLite file's folder cannot be made
            raise self._unavailable(f"{err.strerror}: {err.filename}") from err
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self._write_lock = sqlite_write_lock(self.url) if self.is_sqlite else None
        self.ensure_schema()

    def __repr__(self) -> str:
        return f"StatusStore({redact_url(self.url)!r})"

    # -- schema and transactions ----------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the tables on first use, and record the schema version."""
        if self.url in _SCHEMA_READY:
            return
        try:
            self._create_or_migrate()
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as err:
            # The driver's first line says what failed (refused, unknown host, bad password), never the password.
            cause = str(err.orig).strip().splitlines()[0] if err.orig is not None else type(err).__name__
            raise self._unavailable(cause) from err
        _SCHEMA_READY.add(self.url)

    def _unavailable(self, cause: str) -> StatusStoreUnavailable:
        where = f" (from {self.source})" if self.source else ""
        check = (
            f"{self.source}'s host, port, database, login and password"
            if self.source and self.source.startswith("Airflow connection")
            else "the store's Airflow connection (host, port, database, login, password): status_store_conn_id, "
            "[pepipost] status_store_conn_id or PEPIPOST_STATUS_STORE_URL"
        )
        return StatusStoreUnavailable(
            f"The status store {redact_url(self.url)}{where} could not be opened: {cause}. Check that the "
            f"database is running and reachable from this machine, and {check}"
        )

    def _create_or_migrate(self) -> None:
        with self._writing() as conn:
            # Two processes opening a new store at once (receivers starting together) take turns on
            # PostgreSQL: the second finds the tables the first made.
            transaction_lock(conn, SCHEMA_LOCK)
            schema.metadata.create_all(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema.schema_version.c.version))).scalar()
            if found is None or found < schema.SCHEMA_VERSION:
                applied = migrate(conn, found) if found is not None else [schema.SCHEMA_VERSION]
                for version in applied:
                    conn.execute(
                        insert_for(conn, schema.schema_version)
                        .values(version=version, applied_at=time.time())
                        .on_conflict_do_nothing()
                    )
            elif found > schema.SCHEMA_VERSION:
                raise RuntimeError(
                    f"the status store at {redact_url(self.url)} has schema version {found}, newer than "
                    f"this provider's {schema.SCHEMA_VERSION}: upgrade airflow-provider-pepipost"
                )

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(schema.schema_version.c.version))).scalar() or 0)

    def ping(self) -> None:
        """Raise if the database cannot be read."""
        with self.engine.connect() as conn:
            conn.execute(select(func.count()).select_from(schema.schema_version)).scalar()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """A write transaction, committed on exit; serialized per process on SQLite."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    # -- the send ledger ------------------------------------------------------------------------

    def open_ledger(self, task: TaskKey) -> dict[str, LedgerEntry]:
        """What earlier tries of this task instance recorded, by idempotency key (see ``ledger``)."""
        with self._writing() as conn:
            return ledger.open_ledger(conn, task)

    def write_ledger(
        self,
        task: TaskKey | None,
        claims: Sequence[Claim] = (),
        outcomes: Sequence[Outcome] = (),
        *,
        attempt: str = "",
        resend_unknown: bool = False,
        campaign: str | None = None,
        generation: int = 0,
        check_opt_outs: bool = False,
        rows: Sequence[RowRecord] = (),
    ) -> list[ClaimAnswer]:
        """Claims and outcomes of many sends in one transaction (the send loop's group commit).

        Returns the ledger's answer to each claim (see ``ledger.claim``). With
        ``check_opt_outs``, a granted claim whose number is on the suppression list is recorded
        ``suppressed`` instead, in the same transaction: a STOP stored before the claim's commit
        is honoured, however long the campaign has been running. ``rows``: what became of input
        rows (see ``ledger.record_rows``), written in the same transaction.
        """
        now = time.time()
        answers: list[ClaimAnswer] = []
        with self._writing() as conn:
            if claims:
                if task is None:
                    raise ValueError("claims need the task instance that sends them")
                answers = ledger.claim(
                    conn, task, claims, attempt=attempt, resend_unknown=resend_unknown, campaign=campaign, now=now,
                    generation=generation,
                )  # fmt: skip
                if check_opt_outs:
                    answers = self._suppress_opted_out(conn, claims, answers, now)
            if outcomes:
                ledger.record_outcomes(conn, outcomes, now)
            if rows:
                if task is None:
                    raise ValueError("rows need the task instance they belong to")
                ledger.record_rows(conn, task, rows, campaign=campaign, attempt=attempt, now=now)
        return answers

    def prune_rows(self, task: TaskKey, attempt: str) -> None:
        """After a try went through its whole audience: forget rows only earlier tries had."""
        with self._writing() as conn:
            ledger.prune_rows(conn, task, attempt)

    @staticmethod
    def _suppress_opted_out(
        conn: Connection, claims: Sequence[Claim], answers: list[ClaimAnswer], now: float
    ) -> list[ClaimAnswer]:
        # Read after the claim's write: on SQLite the transaction then holds the write lock, so no
        # STOP can commit between this read and the commit.
        opted_out = consent.suppressed(conn, {c.recipient for c, a in zip(claims, answers, strict=True) if a.granted})
        if not opted_out:
            return answers
        stopped = [c.key for c, a in zip(claims, answers, strict=True) if a.granted and c.recipient in opted_out]
        ledger.mark_suppressed(conn, stopped, now)
        return [
            ledger.SUPPRESSED if a.granted and c.recipient in opted_out else a
            for c, a in zip(claims, answers, strict=True)
        ]

    def claim_for_sending(self, task: TaskKey, key: str, api_header: str, recipient: str, row_index: int) -> bool:
        """One claim in its own transaction: see ``write_ledger``."""
        claim = Claim(key, api_header, recipient, row_index)
        return self.write_ledger(task, [claim], attempt=uuid.uuid4().hex)[0].granted

    def record_outcome(
        self,
        key: str,
        state: str,
        *,
        message_id: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """The answer to a send: accepted (with its id), rejected (with the error) or unknown."""
        self.write_ledger(None, outcomes=[Outcome(key, state, message_id, error_code, error_message)])

    def adopt_campaign(self, task: TaskKey, old: str, new: str) -> None:
        """Count a task instance's rows of campaign hash ``old`` as campaign ``new`` (the legacy
        default key of an earlier try, see ``CampaignSender``)."""
        led = schema.ledger
        with self._writing() as conn:
            conn.execute(update(led).where(*ledger.task_filter(task), led.c.campaign == old).values(campaign=new))

    def ledger_message_ids(self, task: TaskKey) -> list[str]:
        """The ids of every accepted message of a task instance, in input order."""
        with self.engine.connect() as conn:
            return ledger.message_ids(conn, task)

    def task_keys(self, dag_id: str, run_id: str | None = None) -> list[TaskKey]:
        """The task instances of a DAG (and run) that sent messages, for a report over all of them."""
        with self.engine.connect() as conn:
            return ledger.task_keys(conn, dag_id, run_id)

    # -- delivery reports -----------------------------------------------------------------------

    def ingest(
        self,
        events: Sequence[DeliveryEvent],
        dead_letters: Sequence[DeadLetter] = (),
        inbound: Sequence[InboundMessage] = (),
    ) -> IngestResult:
        """Store one webhook batch in one transaction: events, dead letters and inbound messages.

        Returns only after the commit, so the caller may then acknowledge the batch.
        """
        return self.ingest_many([WebhookBatch(list(events), list(dead_letters), list(inbound))])[0]

    def ingest_many(self, batches: Sequence[WebhookBatch]) -> list[IngestResult]:
        """Several webhook batches in one transaction (the receiver's group commit)."""
        now = time.time()
        reports = ingest.reports_alone(batches, now) if self.engine.dialect.driver == "psycopg2" else None
        if reports is not None:  # delivery reports alone: one round trip
            with self.engine.connect() as conn:
                return ingest.ingest_reports_alone(conn, reports)
        with self._writing() as conn:
            return ingest.ingest_many(conn, batches, now)

    def reply(self, inbound_id: int) -> replies.Reply | None:
        """A customer message the receiver filed, by its id: the whole number, its words or button,
        and the send task row it answers (``status.replies``)."""
        with self.engine.connect() as conn:
            return replies.reply(conn, inbound_id)

    # -- replies as a feed ----------------------------------------------------------------------

    def replies_after(self, after_id: int, limit: int = 500) -> list[replies.Reply]:
        """Up to ``limit`` customer messages filed after ``after_id``, oldest first."""
        with self.engine.connect() as conn:
            return replies.replies_after(conn, after_id, limit)

    def replies_to(self, message_ids: Sequence[str]) -> list[replies.Reply]:
        """The customer messages answering any of these messages of the provider, oldest first."""
        with self.engine.connect() as conn:
            return replies.replies_to(conn, message_ids)

    def open_reply_cursor(self, name: str, start: int | None = None) -> int:
        """Where the reply feed ``name`` has got to; a new feed starts at ``start``, by default
        after the newest message."""
        with self._writing() as conn:
            return reply_feed.open_cursor(conn, name, time.time(), start)

    def advance_reply_cursor(self, name: str, inbound_id: int) -> None:
        """Move the feed's cursor forward to ``inbound_id`` (never back)."""
        with self._writing() as conn:
            reply_feed.advance_cursor(conn, name, inbound_id, time.time())

    def reply_feed_start(self, name: str) -> int | None:
        """The newest message's id when the reply feed ``name`` was made; None when it never was."""
        with self.engine.connect() as conn:
            return reply_feed.feed_start(conn, name)

    def unclaimed_replies(
        self, consumer: str, after_id: int, received_since: float, limit: int = 1000, **only: Any
    ) -> list[replies.Reply]:
        """Customer messages after ``after_id`` and received since ``received_since`` (epoch
        seconds) that no run of ``consumer`` claimed, oldest first; ``only``: ``kinds``,
        ``button_payloads``, ``dag_id``, ``task_id`` (``reply_feed.unclaimed``)."""
        with self.engine.connect() as conn:
            return reply_feed.unclaimed(conn, consumer, after_id, received_since, limit, **only)

    def claim_replies(self, consumer: str, inbound_ids: Iterable[int], dag_id: str, run_id: str) -> list[int]:
        """Claim customer messages for ``consumer`` as this DAG run: the ids this run holds, each
        held by one run only (a retry of the same run gets its own claims back)."""
        with self._writing() as conn:
            return reply_feed.claim(conn, consumer, inbound_ids, dag_id, run_id, time.time())

    # -- approvals on WhatsApp -------------------------------------------------------------------

    def record_approval_request(
        self,
        message_id: str,
        task: tuple[str, str, str, int, int],
        options_by_payload: Mapping[str, str],
        approvers: Iterable[str],
        confirmation: Confirmation | None = None,
    ) -> None:
        """A request message ``WhatsAppHITLNotifier`` sent for a task instance (dag, run, task, map
        index, try): its buttons (payload -> option) and who may answer (canonical numbers)."""
        with self._writing() as conn:
            approvals.record_request(conn, message_id, task, options_by_payload, approvers, time.time(), confirmation)

    def pending_approval_taps(self, limit: int = 100, stale_after: float = 300.0) -> list[approvals.Tap]:
        """Replies to request messages not handled yet, and claims older than ``stale_after`` seconds."""
        with self.engine.connect() as conn:
            return approvals.pending_taps(conn, limit, time.time() - stale_after)

    def claim_approval_tap(self, tap: approvals.Tap, answered_by: str, stale_after: float = 300.0) -> bool:
        """Take a tap to answer Airflow with; False when another receiver holds it."""
        with self._writing() as conn:
            now = time.time()
            return approvals.claim(conn, tap.inbound_id, tap.request.message_id, answered_by, now, now - stale_after)

    def finish_approval_tap(self, answer: approvals.Answer) -> None:
        """What Airflow said to a claimed tap's answer."""
        with self._writing() as conn:
            approvals.finish(conn, answer)

    def release_approval_tap(self, inbound_id: int) -> None:
        """Give a claimed tap back: Airflow could not take it yet."""
        with self._writing() as conn:
            approvals.release(conn, inbound_id)

    def record_approval_answer(self, answer: approvals.Answer) -> None:
        """A tap decided without asking Airflow (once: a tap recorded stays as it was)."""
        with self._writing() as conn:
            approvals.record_answer(conn, answer)

    def approval_answers(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> list[approvals.Answer]:
        """The taps on this task instance's requests and what became of each (masked numbers only):
        what the task (or a later one) reads to say who answered."""
        with self.engine.connect() as conn:
            return approvals.answers_for_task(conn, dag_id, run_id, task_id, map_index)

    def record_dead_letter(self, reason: str, raw: str, key: str | None = None) -> None:
        """Keep a body the receiver could not read at all, with the reason (once per ``key``)."""
        self.ingest((), dead_letters=[DeadLetter(reason, raw, key)])

    def count_rows(self, table_name: str) -> int:
        """Rows in one of the store's tables (the receiver's health check counts dead letters)."""
        table = schema.metadata.tables[table_name]
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)

    # -- consent and the suppression list -------------------------------------------------------

    def suppressed(self, recipients: Iterable[str]) -> set[str]:
        """Which of these numbers have opted out (the send operators skip them), as spelled here."""
        with self.engine.connect() as conn:
            return consent.suppressed(conn, recipients)

    def consents(self, recipients: Iterable[str]) -> dict[str, Consent]:
        """What the suppression list holds for these numbers, by canonical number (none: no row)."""
        with self.engine.connect() as conn:
            return consent.consents(conn, recipients)

    def record_opt_outs(self, recipients: Iterable[str], *, via: str, detail: str = "") -> None:
        """Put numbers on the suppression list (``via``: ``reply`` or ``consent_api``)."""
        with self._writing() as conn:
            consent.set_opted_out(conn, recipients, True, via, detail, time.time())

    def consent_batches(self, task: TaskKey) -> dict[str, ConsentBatch]:
        """The consent calls earlier tries of this task instance recorded, by batch key."""
        with self.engine.connect() as conn:
            return consent.batches_of(conn, task)

    def record_consent_batch(
        self,
        task: TaskKey,
        batch: ConsentBatch,
        recipients: Sequence[str] = (),
        held: Mapping[str, Consent | None] | None = None,
    ) -> set[str]:
        """One consent call's outcome; a confirmed one also moves ``recipients`` on or off the
        suppression list, in the same transaction.

        An opt-out is recorded whatever the list held. An opt-in is recorded only for numbers
        whose row still holds what ``held`` says it held when the call's rows were read (absent
        from ``held``: no row then): a STOP that came while the call was with the vendor stays.
        Returns the numbers whose opt-in was not recorded for that reason.
        """
        now = time.time()
        with self._writing() as conn:
            consent.record_batch(conn, task, batch, now)
            if batch.state != "confirmed" or not recipients:
                return set()
            detail = f"{batch.kind} by {task.dag_id}/{task.run_id}/{task.task_id}"
            if batch.kind == "optout":
                consent.set_opted_out(conn, recipients, True, consent.VIA_CONSENT_API, detail, now)
                return set()
            read = held or {}
            expected = {number: read.get(canonical_number(number)) for number in recipients}
            changed = consent.opt_in_if_unchanged(conn, expected, detail, now)
            # The numbers that said STOP while the call was with the vendor are kept beside the
            # batch, in its transaction: a retry that reuses the batch passes their opt-out on too.
            for number in consent.suppressed(conn, changed) if changed else ():
                raced = ConsentBatch(consent.raced_key(batch.batch_key, number), batch.kind, 1, consent.RACED)
                consent.record_batch(conn, task, raced, now)
            return changed

    def reply_opt_outs(self, limit: int = 100_000) -> list[str]:
        """Numbers that opted out by a reply, not yet passed on to the vendor."""
        with self.engine.connect() as conn:
            return consent.unsynced_reply_opt_outs(conn, limit)

    def mark_reply_opt_outs_synced(self, recipients: Sequence[str]) -> None:
        """The vendor confirmed the opt-out of these numbers."""
        if recipients:
            with self._writing() as conn:
                consent.mark_synced(conn, recipients, time.time())

    # -- summaries ------------------------------------------------------------------------------

    def summarize_ids(self, message_ids: Iterable[str], *, chunked: bool = False) -> DeliverySummary:
        """Counts by current status for these ids, and the failed ones with their remarks."""
        with self.engine.connect() as conn:
            return summaries.summarize_ids(conn, message_ids, chunked=chunked)

    def summarize_task(self, task: TaskKey) -> DeliverySummary:
        """The summary of everything one task instance sent, unknown outcomes included."""
        with self.engine.connect() as conn:
            return summaries.summarize_task(conn, task)

    def summarize(self, targets: Sequence[str | TaskKey]) -> DeliverySummary:
        """One summary over message ids and whole task instances together."""
        ids = [t for t in targets if isinstance(t, str)]
        with self.engine.connect() as conn:
            parts = [summaries.summarize_ids(conn, ids)] if ids else []
            parts += [summaries.summarize_task(conn, t) for t in targets if isinstance(t, TaskKey)]
        return summaries.merge_summaries(parts)

    # -- the campaign page ----------------------------------------------------------------------

    def campaign_report(
        self,
        dag_id: str,
        run_id: str,
        task_id: str | None = None,
        *,
        rate_card: Mapping[str, Any] | None = None,
        full_text: bool = False,
    ) -> reports.CampaignReport:
        """The campaign page's figures for a DAG run, or for one send task of it (all map indexes)."""
        with self.engine.connect() as conn:
            return reports.campaign_report(conn, dag_id, run_id, task_id, rate_card=rate_card, full_text=full_text)

    def export_campaign(
        self, dag_id: str, run_id: str, task_id: str | None = None, *, full_numbers: bool = False
    ) -> Iterator[tuple[Any, ...]]:
        """One row per input row (``reports.EXPORT_COLUMNS``), streamed; numbers masked unless asked."""
        with self.engine.connect() as conn:
            yield from reports.export_rows(conn, dag_id, run_id, task_id, full_numbers=full_numbers)

    # -- retention and erasure -----------------------------------------------------------------

    def purge(
        self, older_than_days: float, *, batch_size: int = retention.DEFAULT_PURGE_BATCH, dry_run: bool = False
    ) -> dict[str, int]:
        """Delete events, replies, dead letters, finished ledger rows and the rest older than
        ``older_than_days``, in short transactions; never the suppression list. Returns the rows
        deleted per table (with ``dry_run``, the rows that would be)."""
        if not older_than_days > 0:
            raise PepipostConfigError(f"older_than_days must be above 0, not {older_than_days!r}")
        if batch_size < 1:
            raise PepipostConfigError(f"batch_size must be at least 1, not {batch_size!r}")
        return retention.purge(
            self.engine, self._writing, older_than_days * 86_400, batch_size=batch_size, dry_run=dry_run
        )

    def erase(self, number: str, *, key: str | None = None) -> retention.Erased:
        """Remove or anonymise every row holding ``number``; it stays suppressed under its keyed
        hash (``key``, default the deployment's erasure key; none set: refused)."""
        key = key or erasure_key()
        if not key:
            raise PepipostConfigError(
                f"no erasure key: set {ERASURE_KEY_ENV} (or [pepipost] erasure_key) for every Airflow component "
                "and the receiver, to a secret kept outside the store. An erased number stays suppressed under a "
                "hash made with it, which the send operators check; without it, it would be messaged again"
            )
        return retention.erase(self._writing, number, key)

    def stats(self) -> list[retention.TableStats]:
        """Rows, bytes and the oldest row of every table."""
        return retention.stats(self.engine)

    def last_report_at(self, targets: Sequence[str | TaskKey] | None = None) -> float | None:
        """When the store last received a delivery report (epoch seconds), or None if never.

        With ``targets`` (message ids and task instances, as the sensor holds them), the last
        report for any of those messages: what a sensor that timed out can say about its receiver.
        """
        with self.engine.connect() as conn:
            return summaries.last_report_at(conn, targets)
