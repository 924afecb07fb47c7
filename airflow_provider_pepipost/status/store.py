"""The status store: the send ledger and every delivery event, in the provider's own database.

SQLAlchemy Core over an embedded SQLite file by default, or any SQLAlchemy URL (PostgreSQL in
production). Never Airflow's metadata database: Airflow 3 tasks may not touch it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    String,
    Text,
    any_,
    bindparam,
    case,
    cast,
    create_engine,
    event,
    func,
    literal,
    null,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from airflow_provider_pepipost import limits
from airflow_provider_pepipost.status import schema
from airflow_provider_pepipost.status.migrations import migrate
from airflow_provider_pepipost.status.model import DeliveryEvent, DeliverySummary, LedgerState
from airflow_provider_pepipost.status.resolver import resolve_store_url

# Bound parameters per IN (...) chunk: well under SQLite's 32766 and fast on PostgreSQL.
ID_CHUNK = 5000
ID_SEPARATOR = "\n"  # joins a PostgreSQL id list into one bound text (ids with it go as an array)
IN_FLIGHT_STATES = (LedgerState.SENDING.value, LedgerState.UNKNOWN.value)
# Rows a later try may send again: the vendor refused them, or a stopped campaign never sent them.
RESENDABLE_STATES = (LedgerState.REJECTED.value, LedgerState.NOT_SENT.value)


def redact_url(url: str) -> str:
    """The URL with its password hidden, for log lines."""
    return make_url(url).render_as_string(hide_password=True)


@dataclass(frozen=True)
class TaskKey:
    """The task instance that sent a set of messages."""

    dag_id: str
    run_id: str
    task_id: str
    map_index: int = -1
    # Only the rows whose send outcome was unknown (the sensor's share of a listed send whose
    # accepted ids travel beside this reference), reconciled ones included.
    only_unknown: bool = False
    # Only the rows of this campaign (``campaign_hash``): a task instance may have sent two.
    campaign: str | None = None

    LEDGER_REF = "pepipost_ledger"

    def to_ref(self) -> dict[str, Any]:
        """The XCom form of 'everything this task instance sent', for sends too big to list."""
        ref: dict[str, Any] = {
            "dag_id": self.dag_id,
            "run_id": self.run_id,
            "task_id": self.task_id,
            "map_index": self.map_index,
        }
        if self.only_unknown:
            ref["outcome"] = "unknown"
        if self.campaign is not None:
            ref["campaign"] = self.campaign
        return {self.LEDGER_REF: ref}

    @classmethod
    def from_ref(cls, ref: Mapping[str, Any]) -> TaskKey:
        fields = dict(ref[cls.LEDGER_REF])
        only_unknown = fields.pop("outcome", None) == "unknown"
        return cls(**fields, only_unknown=only_unknown)

    def of_campaign(self, campaign_key: str) -> TaskKey:
        """This task instance's rows of one campaign only."""
        return dataclasses.replace(self, campaign=campaign_hash(campaign_key))

    @property
    def instance(self) -> tuple[str, str, str, int]:
        return (self.dag_id, self.run_id, self.task_id, self.map_index)

    @classmethod
    def is_ref(cls, value: Any) -> bool:
        return isinstance(value, Mapping) and cls.LEDGER_REF in value


@dataclass(frozen=True, slots=True)
class Claim:
    """A message about to be sent, as the ledger records it."""

    key: str
    api_header: str
    recipient: str
    row_index: int


@dataclass(frozen=True, slots=True)
class Outcome:
    """The answer to one send."""

    key: str
    state: str  # accepted | rejected | unknown | not_sent (a claim given back unsent)
    message_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None


@dataclass(frozen=True)
class LedgerEntry:
    idempotency_key: str
    api_header: str
    message_id: str | None
    state: str
    row_index: int
    error_code: str | None = None
    error_message: str | None = None
    reconciled: bool = False  # the message id came from a delivery report, after an unknown outcome


@dataclass
class IngestResult:
    """What one webhook batch did to the store."""

    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    inbound: int = 0
    reconciled: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


# One webhook body, parsed: (events, dead letters, inbound message dicts). A dead letter is
# (reason, raw) or (reason, raw, key): equal keys are stored once.
DeadLetterItem = tuple[str, str] | tuple[str, str, str]
WebhookBatch = tuple[Sequence[DeliveryEvent], Sequence[DeadLetterItem], Sequence[Mapping[str, Any]]]


def _letter_key(letter: DeadLetterItem) -> str:
    if len(letter) > 2 and letter[2]:
        return letter[2][:40]
    return hashlib.sha256(f"{letter[0]}\x1f{letter[1]}".encode("utf-8", "surrogatepass")).hexdigest()[:40]


_ENGINES: dict[str, Engine] = {}
_ENGINES_LOCK = threading.Lock()
_SCHEMA_READY: set[str] = set()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the sensor read while the receiver writes. synchronous=NORMAL keeps every commit
    # through a process crash (SIGKILL); only a power loss can take the last ones.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def get_engine(url: str) -> Engine:
    """One engine per URL per process: pools are shared by every hook, sensor and request.

    ``hide_parameters``: a failed statement's error names its SQL, never the values bound to it
    (phone numbers, remarks), wherever that error is logged.
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, pool_size=8, max_overflow=56, pool_timeout=60, hide_parameters=True)
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                # psycopg2 runs an executemany UPDATE (the ledger's outcomes) one round trip per
                # row; execute_batch pages them.
                batch = {"executemany_mode": "values_plus_batch"} if parsed.get_driver_name() == "psycopg2" else {}
                engine = create_engine(
                    url,
                    pool_size=8,
                    max_overflow=32,
                    pool_pre_ping=True,
                    pool_timeout=60,
                    hide_parameters=True,
                    **batch,
                )
            _ENGINES[url] = engine
        return engine


def _insert_for(conn: Connection, table: Any) -> Any:
    """An INSERT that knows ON CONFLICT, for the dialects the store supports."""
    name = conn.dialect.name
    if name == "sqlite":
        return sqlite.insert(table)
    if name == "postgresql":
        return postgresql.insert(table)
    raise NotImplementedError(f"the status store supports SQLite and PostgreSQL, not {name}")


def _chunks(items: Sequence[str], size: int = ID_CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def campaign_hash(campaign_key: str) -> str:
    """How the ledger keeps a campaign key (which may be longer than any column)."""
    return hashlib.sha256(campaign_key.encode()).hexdigest()[: limits.CAMPAIGN_HASH_MAX]


def event_key(message_id: str, status: str, reported_at: float | None) -> str:
    """A report sent twice has the same key, so it is stored once."""
    return hashlib.sha256(f"{message_id}\x1f{status}\x1f{reported_at}".encode()).hexdigest()[:40]


class StatusStore:
    """The ledger of sent messages and the delivery events reported for them."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or resolve_store_url()
        self.engine = get_engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        # SQLite has one writer at a time; queueing writers here beats spinning on its busy lock.
        self._write_lock = _sqlite_write_lock(self.url) if self.is_sqlite else None
        self.ensure_schema()

    def __repr__(self) -> str:
        return f"StatusStore({redact_url(self.url)!r})"

    # -- schema ---------------------------------------------------------------------------------

    def ensure_schema(self) -> None:
        """Create the tables on first use, and record the schema version."""
        if self.url in _SCHEMA_READY:
            return
        with self._writing() as conn:
            schema.metadata.create_all(conn, checkfirst=True)
            found = conn.execute(select(func.max(schema.schema_version.c.version))).scalar()
            if found is None or found < schema.SCHEMA_VERSION:
                applied = migrate(conn, found) if found is not None else [schema.SCHEMA_VERSION]
                for version in applied:
                    conn.execute(
                        _insert_for(conn, schema.schema_version)
                        .values(version=version, applied_at=time.time())
                        .on_conflict_do_nothing()
                    )
            elif found > schema.SCHEMA_VERSION:
                raise RuntimeError(
                    f"the status store at {redact_url(self.url)} has schema version {found}, newer than "
                    f"this provider's {schema.SCHEMA_VERSION}: upgrade airflow-provider-pepipost"
                )
        _SCHEMA_READY.add(self.url)

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

    # -- ledger ---------------------------------------------------------------------------------

    def open_ledger(self, task: TaskKey) -> dict[str, LedgerEntry]:
        """What earlier tries of this task instance recorded, by idempotency key.

        Rows an earlier try left 'sending' died in flight: they may have been accepted, so they
        become 'unknown' and are never sent again.
        """
        led = schema.ledger
        where = (
            (led.c.dag_id == task.dag_id)
            & (led.c.run_id == task.run_id)
            & (led.c.task_id == task.task_id)
            & (led.c.map_index == task.map_index)
        )
        with self._writing() as conn:
            conn.execute(
                update(led)
                .where(where & (led.c.state == "sending"))
                .values(
                    state="unknown",
                    error_message="the try that sent it ended before the answer came",
                    updated_at=time.time(),
                )
            )
            rows = conn.execute(
                select(
                    led.c.idempotency_key,
                    led.c.api_header,
                    led.c.message_id,
                    led.c.state,
                    led.c.row_index,
                    led.c.error_code,
                    led.c.error_message,
                    led.c.reconciled_at.is_not(None),
                ).where(where)
            ).all()
        return {row.idempotency_key: LedgerEntry(*row) for row in rows}

    def write_ledger(
        self,
        task: TaskKey | None,
        claims: Sequence[Claim] = (),
        outcomes: Sequence[Outcome] = (),
        *,
        attempt: str = "",
        resend_unknown: bool = False,
        campaign: str | None = None,
    ) -> list[bool]:
        """Claims and outcomes of many sends in one transaction (the send loop's group commit).

        A claim records, before the request goes out, that a message is being sent; it is granted
        (True) only when the ledger does not hold the message yet, or holds it as rejected or not
        sent by another try than ``attempt`` (with ``resend_unknown``, also as unknown). Anything
        else (sent, in flight, unknown, or a duplicate row of this try) must not go out again. The
        outcome ``not_sent`` gives back a claim whose request never went out.
        """
        now = time.time()
        granted: list[bool] = []
        with self._writing() as conn:
            if claims:
                if task is None:
                    raise ValueError("claims need the task instance that sends them")
                resendable = (*RESENDABLE_STATES, "unknown") if resend_unknown else RESENDABLE_STATES
                insert_stmt = _insert_for(conn, schema.ledger)
                claim_stmt = insert_stmt.on_conflict_do_update(
                    index_elements=[schema.ledger.c.idempotency_key],
                    set_={
                        "state": "sending",
                        "error_code": None,
                        "error_message": None,
                        "updated_at": insert_stmt.excluded.updated_at,
                        "sent_at": insert_stmt.excluded.sent_at,
                        "attempt": insert_stmt.excluded.attempt,
                        "campaign": insert_stmt.excluded.campaign,
                        # A row taken over belongs to the task instance that sends it now (a
                        # campaign_key shared by two runs): its summaries and clears see it.
                        "dag_id": insert_stmt.excluded.dag_id,
                        "run_id": insert_stmt.excluded.run_id,
                        "task_id": insert_stmt.excluded.task_id,
                        "map_index": insert_stmt.excluded.map_index,
                        "row_index": insert_stmt.excluded.row_index,
                    },
                    # or_ of equalities, not in_: an IN list is an expanding parameter, which a
                    # multi-row statement cannot hold.
                    where=or_(*(schema.ledger.c.state == state for state in resendable))
                    & (schema.ledger.c.attempt.is_(None) | (schema.ledger.c.attempt != insert_stmt.excluded.attempt)),
                )
                common = {
                    "dag_id": task.dag_id,
                    "run_id": task.run_id,
                    "task_id": task.task_id,
                    "map_index": task.map_index,
                    "state": "sending",
                    "sent_at": now,
                    "updated_at": now,
                    "attempt": attempt,
                    "campaign": campaign_hash(campaign) if campaign is not None else None,
                }
                rows = [
                    {
                        "idempotency_key": claim.key,
                        "api_header": claim.api_header,
                        "recipient": claim.recipient,
                        "row_index": claim.row_index,
                        **common,
                    }
                    for claim in claims
                ]
                granted = self._grant_claims(conn, claim_stmt, rows)
            if outcomes:
                led = schema.ledger
                # A delivery report may have reconciled the row while its request hung: a late
                # 'unknown' (or 'rejected') must not wipe the message id it found.
                conn.execute(
                    update(led)
                    .where(
                        led.c.idempotency_key == bindparam("key"),
                        led.c.message_id.is_(None) | (bindparam("new_state") == "accepted"),
                    )
                    .values(
                        state=bindparam("new_state"),
                        message_id=bindparam("new_message_id"),
                        error_code=bindparam("new_error_code"),
                        error_message=bindparam("new_error_message"),
                        updated_at=now,
                        # The send's own answer wins over a report that came first: that row was
                        # never unknown, and the XCom lists its id (the sensor must not count it twice).
                        reconciled_at=case((bindparam("new_state") == "accepted", null()), else_=led.c.reconciled_at),
                    ),
                    [
                        {
                            "key": o.key,
                            "new_state": o.state,
                            "new_message_id": o.message_id,
                            "new_error_code": o.error_code,
                            "new_error_message": o.error_message,
                        }
                        for o in outcomes
                    ],
                )
        return granted

    @staticmethod
    def _grant_claims(conn: Connection, claim_stmt: Any, rows: list[dict[str, Any]]) -> list[bool]:
        """Run the claim upsert for each row; True where it inserted or took over the row."""
        if conn.dialect.name != "postgresql":
            # In-process SQLite: one execute per claim, its rowcount the answer.
            return [conn.execute(claim_stmt, row).rowcount > 0 for row in rows]
        # PostgreSQL: one multi-row statement whose RETURNING names the keys granted. A key twice in
        # one statement is an error there, and only its first row may win anyway.
        first: dict[str, int] = {}
        for index, row in enumerate(rows):
            first.setdefault(row["idempotency_key"], index)
        unique = [rows[index] for index in first.values()]
        won = set(conn.execute(claim_stmt.returning(schema.ledger.c.idempotency_key), unique).scalars())
        return [key in won and first[key] == index for index, key in enumerate(r["idempotency_key"] for r in rows)]

    def claim_for_sending(self, task: TaskKey, key: str, api_header: str, recipient: str, row_index: int) -> bool:
        """One claim in its own transaction: see ``write_ledger``."""
        return self.write_ledger(task, [Claim(key, api_header, recipient, row_index)], attempt=uuid.uuid4().hex)[0]

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
        outcome = Outcome(key, state, message_id, error_code, error_message)
        self.write_ledger(None, outcomes=[outcome])

    def ledger_message_ids(self, task: TaskKey) -> list[str]:
        """The ids of every accepted message of a task instance, in input order."""
        led = schema.ledger
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    select(led.c.message_id)
                    .where(*self._task_filter(task), led.c.message_id.is_not(None))
                    .order_by(led.c.row_index)
                ).scalars()
            )

    @staticmethod
    def _task_filter(task: TaskKey) -> tuple[Any, ...]:
        led = schema.ledger
        return (
            led.c.dag_id == task.dag_id,
            led.c.run_id == task.run_id,
            led.c.task_id == task.task_id,
            led.c.map_index == task.map_index,
        )

    # -- delivery reports -----------------------------------------------------------------------

    def ingest(
        self,
        events: Sequence[DeliveryEvent],
        rejected: Sequence[DeadLetterItem] = (),
        inbound: Sequence[Mapping[str, Any]] = (),
    ) -> IngestResult:
        """Store one webhook batch in one transaction: events, dead letters and inbound messages.

        ``rejected`` holds (reason, raw) pairs; ``inbound`` dicts with sender, context_message_id,
        raw. Returns only after the commit, so the caller may then acknowledge the batch.
        """
        return self.ingest_many([(events, rejected, inbound)])[0]

    def ingest_many(self, batches: Sequence[WebhookBatch]) -> list[IngestResult]:
        """Several webhook batches in one transaction (the receiver's group commit).

        Each batch gets its own counts; an event in two batches counts as accepted in the first.
        """
        results = [IngestResult(rejected=len(rej), inbound=len(inb)) for _, rej, inb in batches]
        events = [ev for evs, _, _ in batches for ev in evs]
        rejected = [item for _, rej, _ in batches for item in rej]
        inbound = [item for _, _, inb in batches for item in inb]
        now = time.time()
        with self._writing() as conn:
            if events:
                keys = [event_key(ev.message_id, ev.status, ev.reported_at) for ev in events]
                fresh = self._insert_new_events(conn, events, keys, now)
                self._raise_statuses(conn, events, now)
                reconciled = self._reconcile(conn, events, now)
                keyed = iter(zip(keys, events, strict=True))  # the events, batch by batch, in order
                for result, (evs, _, _) in zip(results, batches, strict=True):
                    for key, ev in itertools.islice(keyed, len(evs)):
                        if key in fresh:
                            fresh.discard(key)
                            result.accepted += 1
                        else:
                            result.duplicates += 1
                        if ev.api_header in reconciled:
                            reconciled.discard(ev.api_header)
                            result.reconciled += 1
            if rejected:
                # Keyed, so that a body sent again adds no dead letters; a pair without a key is
                # keyed by its content.
                letters = {_letter_key(letter): letter for letter in rejected}
                conn.execute(
                    _insert_for(conn, schema.dead_letters).on_conflict_do_nothing(index_elements=["letter_key"]),
                    [
                        {"received_at": now, "reason": letter[0], "raw": letter[1], "letter_key": key}
                        for key, letter in letters.items()
                    ],
                )
            if inbound:
                rows = {hashlib.sha256(item["raw"].encode()).hexdigest()[:40]: item for item in inbound}
                conn.execute(
                    _insert_for(conn, schema.inbound_messages).on_conflict_do_nothing(index_elements=["inbound_key"]),
                    [
                        {
                            "inbound_key": key,
                            "sender": item.get("sender"),
                            "context_message_id": item.get("context_message_id"),
                            "received_at": now,
                            "raw": item["raw"],
                        }
                        for key, item in rows.items()
                    ],
                )
        return results

    def record_dead_letter(self, reason: str, raw: str, key: str | None = None) -> None:
        """Keep a body the receiver could not read at all, with the reason (once per ``key``)."""
        self.ingest((), rejected=[(reason, raw, key) if key else (reason, raw)])

    @staticmethod
    def _insert_new_events(
        conn: Connection, events: Sequence[DeliveryEvent], keys: Sequence[str], now: float
    ) -> set[str]:
        """Store the events not stored yet; returns the keys this transaction added."""
        rows: dict[str, dict[str, Any]] = {}
        for key, ev in zip(keys, events, strict=True):
            rows.setdefault(
                key,
                {
                    "event_key": key,
                    "message_id": ev.message_id,
                    "status": ev.status,
                    "raw_status": ev.raw_status,
                    "remark": ev.remark,
                    "reported_at": ev.reported_at,
                    "received_at": now,
                    "api_header": ev.api_header,
                    "recipient": ev.recipient,
                    "raw": ev.raw,
                },
            )
        insert_stmt = _insert_for(conn, schema.events).on_conflict_do_nothing(index_elements=["event_key"])
        if conn.dialect.name == "postgresql":
            # Only with RETURNING does SQLAlchemy send an upsert as one multi-row INSERT (without,
            # psycopg2 makes a round trip per row), and it names exactly the rows added, even when
            # another receiver adds the same ones at the same time. SQLite's executemany is faster.
            return set(conn.execute(insert_stmt.returning(schema.events.c.event_key), list(rows.values())).scalars())
        seen: set[str] = set()
        for chunk in _chunks(list(rows)):
            seen.update(
                conn.execute(select(schema.events.c.event_key).where(schema.events.c.event_key.in_(chunk))).scalars()
            )
        new_rows = [row for key, row in rows.items() if key not in seen]
        if new_rows:
            conn.execute(insert_stmt, new_rows)
        return {row["event_key"] for row in new_rows}

    @staticmethod
    def _raise_statuses(conn: Connection, events: Sequence[DeliveryEvent], now: float) -> None:
        """Move each message's current status up, never down (one row per message per statement)."""
        best: dict[str, DeliveryEvent] = {}
        for ev in events:
            held = best.get(ev.message_id)
            if held is None or ev.rank > held.rank:
                best[ev.message_id] = ev
        stmt = _insert_for(conn, schema.message_status)
        stmt = stmt.on_conflict_do_update(
            index_elements=[schema.message_status.c.message_id],
            set_={
                "status": stmt.excluded.status,
                "rank": stmt.excluded.rank,
                "remark": stmt.excluded.remark,
                "reported_at": stmt.excluded.reported_at,
                "updated_at": stmt.excluded.updated_at,
            },
            where=schema.message_status.c.rank < stmt.excluded.rank,
        )
        if conn.dialect.name == "postgresql":
            stmt = stmt.returning(schema.message_status.c.message_id)  # one multi-row INSERT (see above)
        conn.execute(
            stmt,
            [
                {
                    "message_id": ev.message_id,
                    "status": ev.status,
                    "rank": ev.rank,
                    "remark": ev.remark,
                    "reported_at": ev.reported_at,
                    "updated_at": now,
                }
                for ev in best.values()
            ],
        )

    @staticmethod
    def _reconcile(conn: Connection, events: Sequence[DeliveryEvent], now: float) -> set[str]:
        """Give unknown sends their message id from reports that echo their x-apiheader.

        Returns the headers whose rows were reconciled.
        """
        by_header = {ev.api_header: ev.message_id for ev in events if ev.api_header}
        if not by_header:
            return set()
        led = schema.ledger
        waiting: dict[str, list[str]] = {}
        for chunk in _chunks(list(by_header)):
            for key, header in conn.execute(
                select(led.c.idempotency_key, led.c.api_header).where(
                    led.c.api_header.in_(chunk), led.c.message_id.is_(None), led.c.state.in_(IN_FLIGHT_STATES)
                )
            ):
                waiting.setdefault(header, []).append(key)
        reconciled: set[str] = set()
        for header, keys in waiting.items():
            if len(keys) != 1:
                continue  # a header shared by several rows cannot tell them apart
            message_id = by_header[header]
            if conn.execute(select(led.c.idempotency_key).where(led.c.message_id == message_id)).first():
                continue
            conn.execute(
                update(led)
                .where(led.c.idempotency_key == keys[0])
                .values(message_id=message_id, state="accepted", reconciled_at=now, updated_at=now)
            )
            reconciled.add(header)
        return reconciled

    # -- summaries ------------------------------------------------------------------------------

    def summarize_ids(self, message_ids: Iterable[str], *, chunked: bool = False) -> DeliverySummary:
        """Counts by current status for these ids, and the failed ones with their remarks.

        On SQLite and PostgreSQL all ids travel in one bound parameter (a JSON array, an array),
        so 100k ids cost one indexed query; ``chunked`` forces IN lists of ID_CHUNK ids, the
        portable way used for other databases.
        """
        ids = list(dict.fromkeys(message_ids))
        summary = DeliverySummary(total=len(ids))
        st = schema.message_status
        with self.engine.connect() as conn:
            for matches in self._id_filters(conn, st.c.message_id, ids, chunked):
                # One statement per id set, so the ids travel once: the counts by status, then
                # (marked by a null status) the first failed ids with their remarks.
                matched = select(st.c.message_id, st.c.status, st.c.remark).where(matches).cte("matched")
                counts = select(
                    matched.c.status, func.count().label("n"), cast(null(), String).label("mid"), cast(null(), Text)
                ).group_by(matched.c.status)
                room = max(DeliverySummary.MAX_FAILED_LISTED - len(summary.failed), 0)
                failed = (
                    select(cast(null(), String), literal(0), matched.c.message_id, matched.c.remark)
                    .where(matched.c.status == "failed")
                    .order_by(matched.c.message_id)
                    .limit(room)
                    .subquery()
                )
                for status, count, message_id, remark in conn.execute(union_all(counts, select(failed))):
                    if status is None:
                        summary.failed.append({"message_id": message_id, "remark": remark})
                    else:
                        summary.counts[status] = summary.counts.get(status, 0) + count
        summary.failed_total = summary.counts.get("failed", 0)
        summary.pending = summary.total - sum(summary.counts.values())
        return summary

    @staticmethod
    def _id_filters(conn: Connection, column: Any, ids: list[str], chunked: bool) -> Iterator[Any]:
        """WHERE clauses that together match ``column`` against every id."""
        if not ids:
            return
        if not chunked and conn.dialect.name == "sqlite":
            values = func.json_each(json.dumps(ids)).table_valued("value")
            yield column.in_(select(values.c.value))
        elif not chunked and conn.dialect.name == "postgresql":
            if any(ID_SEPARATOR in message_id for message_id in ids):
                yield column == any_(bindparam("ids", ids, type_=postgresql.ARRAY(String)))
            else:
                # One text the server splits: psycopg2 quotes a list element by element, 40 ms for
                # 100k ids on loopback, about as long as the whole query takes this way.
                joined = bindparam("ids", ID_SEPARATOR.join(ids), type_=Text)
                yield column == any_(func.string_to_array(joined, ID_SEPARATOR, type_=postgresql.ARRAY(Text)))
        else:
            for chunk in _chunks(ids):
                yield column.in_(chunk)

    def summarize_task(self, task: TaskKey) -> DeliverySummary:
        """The summary of everything one task instance sent, unknown outcomes included."""
        led, st = schema.ledger, schema.message_status
        summary = DeliverySummary(total=0)
        joined = led.outerjoin(st, st.c.message_id == led.c.message_id)
        rows = (*self._task_filter(task), led.c.state.in_(("accepted", *IN_FLIGHT_STATES)))
        if task.only_unknown:
            rows += (led.c.state.in_(IN_FLIGHT_STATES) | led.c.reconciled_at.is_not(None),)
        if task.campaign is not None:
            rows += (led.c.campaign == task.campaign,)
        with self.engine.connect() as conn:
            for state, status, count in conn.execute(
                select(led.c.state, st.c.status, func.count())
                .select_from(joined)
                .where(*rows)
                .group_by(led.c.state, st.c.status)
            ):
                summary.total += count
                if state in IN_FLIGHT_STATES:
                    summary.unknown += count
                elif status is None:
                    summary.pending += count
                else:
                    summary.counts[status] = summary.counts.get(status, 0) + count
            summary.failed_total = summary.counts.get("failed", 0)
            if summary.failed_total:
                summary.failed = [
                    {"message_id": mid, "remark": remark}
                    for mid, remark in conn.execute(
                        select(st.c.message_id, st.c.remark)
                        .select_from(joined)
                        .where(*rows, st.c.status == "failed")
                        .order_by(led.c.row_index)
                        .limit(DeliverySummary.MAX_FAILED_LISTED)
                    )
                ]
        return summary

    def summarize(self, targets: Sequence[str | TaskKey]) -> DeliverySummary:
        """One summary over message ids and whole task instances together."""
        ids = [t for t in targets if isinstance(t, str)]
        parts = [self.summarize_ids(ids)] if ids else []
        parts += [self.summarize_task(t) for t in targets if isinstance(t, TaskKey)]
        return merge_summaries(parts)

    def task_keys(self, dag_id: str, run_id: str | None = None) -> list[TaskKey]:
        """The task instances of a DAG (and run) that sent messages, for a report over all of them."""
        led = schema.ledger
        query = select(led.c.dag_id, led.c.run_id, led.c.task_id, led.c.map_index).distinct()
        query = query.where(led.c.dag_id == dag_id)
        if run_id is not None:
            query = query.where(led.c.run_id == run_id)
        with self.engine.connect() as conn:
            return [TaskKey(*row) for row in conn.execute(query.order_by(led.c.run_id, led.c.task_id, led.c.map_index))]

    # -- reading back, for reports and tests -----------------------------------------------------

    def current_status(self, message_id: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(
                select(schema.message_status.c.status).where(schema.message_status.c.message_id == message_id)
            ).scalar()

    def count_rows(self, table_name: str) -> int:
        table = schema.metadata.tables[table_name]
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)

    def dead_letters(self, limit: int = 100) -> list[tuple[str, str]]:
        dl = schema.dead_letters
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(dl.c.reason, dl.c.raw).order_by(dl.c.id).limit(limit))]

    def last_report_at(self, targets: Sequence[str | TaskKey] | None = None) -> float | None:
        """When the store last received a delivery report (epoch seconds), or None if never.

        With ``targets`` (message ids and task instances, as the sensor holds them), the last report
        for any of those messages: what a sensor that timed out can say about its receiver.
        """
        ev, led = schema.events, schema.ledger
        with self.engine.connect() as conn:
            if targets is None:  # the newest row by primary key: no scan of the events
                return conn.execute(select(ev.c.received_at).order_by(ev.c.id.desc()).limit(1)).scalar()
            ids = list(dict.fromkeys(t for t in targets if isinstance(t, str)))
            queries = [
                select(func.max(ev.c.received_at)).where(m) for m in self._id_filters(conn, ev.c.message_id, ids, False)
            ]
            queries += [
                select(func.max(ev.c.received_at))
                .select_from(ev.join(led, led.c.message_id == ev.c.message_id))
                .where(*self._task_filter(task))
                for task in targets
                if isinstance(task, TaskKey)
            ]
            found = [when for query in queries if (when := conn.execute(query).scalar()) is not None]
            return max(found, default=None)


def merge_summaries(parts: Sequence[DeliverySummary]) -> DeliverySummary:
    total = DeliverySummary(total=0)
    for part in parts:
        total.total += part.total
        total.pending += part.pending
        total.unknown += part.unknown
        total.failed_total += part.failed_total
        for status, count in part.counts.items():
            total.counts[status] = total.counts.get(status, 0) + count
        total.failed.extend(part.failed[: DeliverySummary.MAX_FAILED_LISTED - len(total.failed)])
    return total


_WRITE_LOCKS: dict[str, threading.Lock] = {}


def _sqlite_write_lock(url: str) -> threading.Lock:
    with _ENGINES_LOCK:
        return _WRITE_LOCKS.setdefault(url, threading.Lock())


def parse_message_targets(value: Any) -> list[str | TaskKey]:
    """Message ids and ledger references from an XCom value, flattened.

    Takes a list of ids, a ledger reference, or a list of either (a mapped send task's XCom).
    """
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            return parse_message_targets(json.loads(text))
        return [text] if text else []
    if TaskKey.is_ref(value):
        return [TaskKey.from_ref(value)]
    if isinstance(value, Mapping):
        raise ValueError("message_ids: a dict must be a ledger reference {'pepipost_ledger': {...}}")
    targets: list[str | TaskKey] = []
    for item in value:
        targets.extend(parse_message_targets(item))
    return targets
